"""One daemon per state_dir: an exclusive lock held for the process's life.

Two daemons on one outbox would each claim its rows, take the MQTT session from each
other (the same client id) and mail what the other is mailing. `mailgw run` takes
`state_dir/daemon.lock` with flock(2) before anything touches the outbox or the network;
the kernel drops the lock when the process ends, however it ends (kill -9, a crash), so
a stale file never keeps a daemon out. The file holds the holder's PID, for the
refusal's message only: the lock, not the PID, is what decides.

The CLI's readers (`mailgw status`, `mailgw queue`, `mailgw send`) do not take it: they
go through SQLite's own locking and keep working while the daemon runs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

from gateway.errors import GatewayError, StoreUnavailable

NAME = "daemon.lock"


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
    """The PID the lock file names, if it names one."""
    with contextlib.suppress(OSError, ValueError):
        text = path.read_text(encoding="ascii").strip()
        if text.isdigit() and len(text) <= 10:
            return int(text)
    return None


def take(state_dir: Path) -> StateLock:
    """Lock `state_dir` for this process. AlreadyRunning if another process holds it;
    StoreUnavailable if the directory or the file cannot be made (a read-only file
    system: the caller waits for it as it waits for the outbox)."""
    path = state_dir / NAME
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # O_CLOEXEC (Python's default): a child process must not inherit the lock.
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StoreUnavailable(
            f"cannot create the lock file {path}: {exc.strerror or exc}"
        ) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
            raise StoreUnavailable(f"cannot lock {path}: {exc.strerror or exc}") from exc
        pid = holder(path)
        who = f"PID {pid}" if pid is not None else "another process"
        raise AlreadyRunning(
            f"another mailgw daemon ({who}) is already running on state_dir {state_dir} (it "
            f"holds {path}); two would mail the same alerts and take the MQTT session from "
            "each other. Stop it first (`systemctl stop mailgw`, or end that process), or "
            "give this one a state_dir of its own"
        ) from None
    # Ours now: say who holds it. Written in place, after the lock: a reader that sees a
    # half-written PID only gets a vaguer message.
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    return StateLock(path, fd)
