"""Writing a maildrop file: the one piece `sendmail` and `sendmail -bs` share.

The spool's contract (read by gateway/maildrop.py):
- the directory is mode 3733 owned by mailgw:mailgw: anyone may create a file, nobody
  but mailgw may list it, and the setgid bit gives each new file the group mailgw;
- a file is written under its final random name with mode 0600 (not yet readable by
  the daemon), fsynced, then fchmod'ed to 0640: the group read bit says "complete";
- its content: the line `MAILGW-DROP 1`, envelope lines `<letter> <value>`, an empty
  line, then the message bytes exactly as read from stdin.
- `<maildrop>/.max_size` (written by the daemon) holds the size limit in bytes. Anyone
  may create files in the spool, so it is believed only if it is a regular file owned
  by root or the spool's owner (read_limit).
Standard library `os` only: this runs once per mail.
"""

from __future__ import annotations

import os
import stat  # already loaded by os: no start-up cost

DEFAULT_MAX_SIZE = 10 * 1024 * 1024
MAGIC = b"MAILGW-DROP 1\n"
MAX_ARG = 998  # an envelope value longer than a header line is not an address
MAX_RCPTS = 256  # the daemon's bound too (gateway/maildrop_parse.py): refused here first


class Invocation:
    """What the command line asks for (a plain class: dataclasses cost an import)."""

    __slots__ = ("dot_ends", "extract", "fullname", "ignored", "mode", "recipients", "sender")

    def __init__(self) -> None:
        self.mode = "m"  # -bm deliver (default), -bp list, -bs SMTP, -bi newaliases
        self.sender = ""  # -f / -r
        self.fullname = ""  # -F
        self.extract = False  # -t: recipients from To/Cc/Bcc too
        self.dot_ends = True  # a line of one '.' ends the message, unless -i / -oi
        self.recipients: list[str] = []
        self.ignored: list[str] = []  # options accepted and ignored, for -v users

    def __repr__(self) -> str:
        return (
            f"Invocation(mode={self.mode!r}, sender={self.sender!r}, extract={self.extract}, "
            f"dot_ends={self.dot_ends}, recipients={self.recipients!r})"
        )


def has_controls(value: str) -> bool:
    """True if the value holds a character an envelope line cannot carry."""
    return any(c < " " or c == "\x7f" for c in value)


def _clean(value: str) -> str:
    """An envelope value as one safe line: no controls (a newline would forge an
    envelope line), bounded. Bytes that were not UTF-8 stay as surrogate escapes."""
    return "".join(c for c in value if c >= " " and c != "\x7f")[:MAX_ARG]


def envelope(inv: Invocation, user: str) -> bytes:
    """The spool file's head: magic, envelope lines, an empty line."""
    lines = [f"U {_clean(user)}", f"F {inv.sender}", f"N {inv.fullname}"]
    if inv.extract:
        lines.append("T 1")
    lines.extend(f"R {r}" for r in inv.recipients)
    text = "\n".join(lines) + "\n\n"
    return MAGIC + text.encode("utf-8", "surrogateescape")


def read_limit(path: str, owners: tuple[int, ...]) -> int | None:
    """The number in a .max_size file, or None if it is anything but a regular file
    owned by one of `owners` holding a positive number. Never blocks, never follows a
    link, never reads more than 32 bytes: a local user may have put a FIFO, a link to
    /dev/zero or their own file there."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
    try:
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid not in owners:
            return None
        value = int(os.read(fd, 32).strip())
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    return value if value > 0 else None


def max_size(maildrop: str) -> int:
    """The limit the daemon published ([sendmail] max_size); the default without it.
    The daemon checks again at pickup: this is to refuse early, with an exit code."""
    try:
        owners: tuple[int, ...] = (0, os.stat(maildrop).st_uid)
    except OSError:
        owners = (0,)
    value = read_limit(os.path.join(maildrop, ".max_size"), owners)
    return DEFAULT_MAX_SIZE if value is None else value


def drop(maildrop: str, data: bytes) -> str:
    """Write one spool file durably; its name. Raises OSError."""
    name = os.urandom(16).hex()
    path = os.path.join(maildrop, name)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        # Complete: the daemon (group mailgw, from the directory's setgid bit) may read
        # it now. Explicit, whatever the caller's umask.
        os.fchmod(fd, 0o640)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        try:  # noqa: SIM105 (contextlib is an import this command does without)
            os.unlink(path)
        except OSError:
            pass
        raise
    os.close(fd)
    _sync_dir(maildrop)
    return name


def _sync_dir(maildrop: str) -> None:
    # Only the directory's owner (and root) may open it to fsync it: others cannot read
    # a 1733 directory. For them the file's own fsync carries its name on journalling
    # filesystems (ext4, xfs, btrfs commit the new entry with the inode).
    try:
        fd = os.open(maildrop, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def user() -> str:
    # Informational only: the daemon trusts the file's owner (set by the kernel).
    for key in ("LOGNAME", "USER"):
        if name := os.environ.get(key):
            return name
    return str(os.getuid())
