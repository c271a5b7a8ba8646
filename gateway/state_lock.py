"""One daemon per state_dir: an exclusive lock held for the process's life.

Two daemons on one outbox would each claim its rows, take the MQTT session from each
other (the same client id) and mail what the other is mailing. `mailgw run` takes an
flock(2) on the state directory itself before anything touches the outbox or the
network; the kernel drops the lock when the process ends, however it ends (kill -9, a
crash), so nothing stale ever keeps a daemon out.

The directory, not a file in it: a lock on a file is lost for good when the file is
deleted or replaced (the next daemon locks the new file beside the first), and a file
left by another user (a one-off `sudo mailgw run`) or replaced by a symlink or a FIFO
would make the lock open someone else's file, block, or refuse. A directory that is
renamed or removed takes the outbox with it. It is opened read-only, which flock needs
no more than.

`state_dir/daemon.lock` holds the holder's PID, for the refusal's message only: the
lock, not the PID, is what decides. It is written to a new file renamed over the old
name, so whatever was there (a symlink to another file, a FIFO, a file of another
owner) is replaced, never followed or written into; and it is read without following a
symlink, without blocking, and only if it is a regular file.

The CLI's readers (`mailgw status`, `mailgw queue`, `mailgw send`) do not take it: they
go through SQLite's own locking and keep working while the daemon runs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from pathlib import Path

from gateway.errors import GatewayError, StoreUnavailable

NAME = "daemon.lock"
_PID_BYTES = 16  # a PID and its newline, with room; more is not a PID note


class AlreadyRunning(GatewayError):
    """Another daemon holds the state directory's lock."""


class StateLock:
    """The held lock; `release` (or the process's end) gives it up."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the only descriptor drops the flock

    # A lock nobody holds any more (a Daemon built and dropped in one process) is
    # released with it, rather than keeping its descriptor and the state_dir to the end.
    __del__ = release


def holder(path: Path) -> int | None:
    """The PID the note at `path` names, if it is a regular file that names one. Never
    blocks (a FIFO) and never follows a symlink."""
    with contextlib.suppress(OSError, ValueError):
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            text = os.read(fd, _PID_BYTES).decode("ascii").strip()
        finally:
            os.close(fd)
        if text.isdigit() and len(text) <= 10:
            return int(text)
    return None


def take(state_dir: Path, runtime_dir: Path | None = None) -> StateLock:
    """Lock `state_dir` for this process. AlreadyRunning if another process holds it;
    StoreUnavailable if the directory cannot be made or opened (a read-only file system:
    the caller waits for it as it waits for the outbox)."""
    path = state_dir / NAME
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # O_CLOEXEC: a child process must not inherit the lock. A state_dir that is a
        # symlink is followed, as the outbox's path is: the lock is where the outbox is.
        fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise StoreUnavailable(
            f"cannot open the state directory {state_dir} to lock it: {exc.strerror or exc}"
        ) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
            raise StoreUnavailable(f"cannot lock {state_dir}: {exc.strerror or exc}") from exc
        pid = holder(path)
        who = f"PID {pid}" if pid is not None else "another process"
        # The status file and `mailgw flush` find a daemon by runtime_dir: two daemons
        # given one runtime_dir would answer for each other.
        runtime = f" (and runtime_dir {runtime_dir})" if runtime_dir is not None else ""
        raise AlreadyRunning(
            f"another mailgw daemon ({who}) is already running on state_dir {state_dir} (it "
            f"holds the lock on that directory); two would mail the same alerts and take "
            "the MQTT session from each other. Stop it first (`systemctl stop mailgw`, or "
            f"end that process), or give this one a state_dir{runtime} of its own"
        ) from None
    _note_pid(path)
    return StateLock(path, fd)


def _note_pid(path: Path) -> None:
    """Write our PID to `path` for another daemon's refusal; best effort (the lock is
    held whatever happens here)."""
    tmp = path.with_name(f".{NAME}.{os.getpid()}")
    with contextlib.suppress(OSError):
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # left by a process of ours that had this PID and died
        fd = os.open(tmp, flags, 0o600)
        try:
            os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        finally:
            os.close(fd)
        os.replace(tmp, path)  # replaces the name, whatever it was, never its target
    with contextlib.suppress(OSError):
        os.unlink(tmp)  # only there if the rename failed
