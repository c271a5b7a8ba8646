"""Writing a maildrop file: the one piece `sendmail` and `sendmail -bs` share.

The spool's contract (read by gateway/maildrop.py):
- the directory is mode 3733 owned by mailgw:mailgw: anyone may create a file, nobody
  but mailgw may list it, and the setgid bit gives each new file the group mailgw;
- a file is written under its final random name with mode 0600 (not yet readable by
  the daemon), fsynced, then fchmod'ed to 0640: the group read bit says "complete";
- its content: the line `MAILGW-DROP 1`, envelope lines `<letter> <value>`, an empty
  line, then the message bytes exactly as read from stdin.
- `<maildrop>/.max_size` (written by the daemon) holds the size limit in bytes, and
  `<maildrop>/.allow_to` the address patterns local mail may name, one a line (empty:
  any). Anyone may create files in the spool, so each is believed only if it is a
  regular file owned by root or the spool's owner (read_published).
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


ALLOW_FILE = ".allow_to"
MAX_PUBLISHED = 32 * 1024  # .allow_to: at most 100 patterns of 254 bytes


def read_published(path: str, owners: tuple[int, ...], cap: int) -> bytes | None:
    """Up to `cap` bytes of a file the daemon published in the spool, or None if it
    is anything but a regular file owned by one of `owners`. Never blocks, never
    follows a link, never reads more than `cap`: a local user may have put a FIFO, a
    link to /dev/zero or their own file there."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
    try:
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid not in owners:
            return None
        return os.read(fd, cap)
    except OSError:
        return None
    finally:
        os.close(fd)


def read_limit(path: str, owners: tuple[int, ...]) -> int | None:
    """The number in a .max_size file, or None if it is not a published positive
    number (read_published)."""
    data = read_published(path, owners, 32)
    try:
        value = int(data.strip()) if data is not None else 0
    except ValueError:
        return None
    return value if value > 0 else None


def _owners(maildrop: str) -> tuple[int, ...]:
    try:
        return (0, os.stat(maildrop).st_uid)
    except OSError:
        return (0,)


def allow_to(maildrop: str) -> tuple[str, ...]:
    """The address patterns the daemon published; () for any address (or none known:
    the daemon checks again at pickup)."""
    data = read_published(os.path.join(maildrop, ALLOW_FILE), _owners(maildrop), MAX_PUBLISHED)
    if not data:
        return ()
    text = data.decode("ascii", "replace")
    return tuple(line.strip().lower() for line in text.splitlines() if line.strip())


def allowed(address: str, patterns: tuple[str, ...]) -> bool:
    """Whether an address matches one of the lower-case patterns, '*' standing for
    any run of characters (a local glob, without fnmatch's import or its [] sets).
    No patterns: every address is allowed."""
    if not patterns:
        return True
    addr = address.strip().strip("<>").lower()
    # Only a bare address can be matched: around a name, a comment or a route the
    # daemon would find another address than the one the glob saw.
    if any(c in _NOT_BARE for c in addr):
        return False
    return any(_glob(p, addr) for p in patterns)


_NOT_BARE = frozenset(' \t()<>,;:"\\[]')


def _glob(pattern: str, text: str) -> bool:
    # Greedy-free matching of '*' pieces: linear in len(text) per piece, so a hostile
    # address cannot make it exponential.
    parts = pattern.split("*")
    if len(parts) == 1:
        return pattern == text
    first, last = parts[0], parts[-1]
    if len(first) + len(last) > len(text):
        return False
    if not text.startswith(first) or not text.endswith(last):
        return False
    pos, end = len(first), len(text) - len(last)
    for piece in parts[1:-1]:
        k = text.find(piece, pos, end)
        if k < 0:
            return False
        pos = k + len(piece)
    return True


def header_addresses(message: bytes, cap: int) -> list[str] | None:
    """The addresses of To, Cc and Bcc in a message's header block, as `-t` takes
    them, for an early count (the daemon parses them properly at pickup). Commas
    inside quotes, comments and <...> do not separate. None if there are over `cap`
    (stops reading there)."""
    end = message.find(b"\n\n")
    crlf = message.find(b"\r\n\r\n")
    if crlf >= 0 and (end < 0 or crlf < end):
        end = crlf
    head = (message if end < 0 else message[:end]).decode("utf-8", "replace")
    fields: list[str] = []
    for line in head.replace("\r\n", "\n").split("\n"):
        if line[:1] in (" ", "\t") and fields:
            fields[-1] += " " + line.strip()
        else:
            fields.append(line)
    found: list[str] = []
    for f in fields:
        name, sep, value = f.partition(":")
        if not sep or name.strip().lower() not in ("to", "cc", "bcc"):
            continue
        for item in _split_list(value, cap + 1 - len(found)):
            lt, gt = item.rfind("<"), item.rfind(">")
            addr = item[lt + 1 : gt] if 0 <= lt < gt else item
            addr = addr.strip()
            if addr.endswith(";"):  # the end of a group: "friends: a@x, b@y;"
                addr = addr[:-1].strip()
            if ":" in addr and "@" not in addr.split(":", 1)[0]:
                addr = addr.split(":", 1)[1].strip()  # a group's name
            if addr:
                found.append(addr)
                if len(found) > cap:
                    return None
    return found


def _split_list(value: str, most: int) -> list[str]:
    """The comma-separated items of an address list; stops after `most` of them."""
    items: list[str] = []
    cur: list[str] = []
    quoted = False
    depth = 0  # comments nest (RFC 5322 3.2.2)
    angle = False
    escaped = False
    for c in value:
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif quoted:
            quoted = c != '"'
        elif c == '"':
            quoted = True
        elif c == "(":
            depth += 1
        elif c == ")" and depth:
            depth -= 1
        elif depth:
            continue  # a comment is not part of the address
        elif c == "<":
            angle = True
        elif c == ">":
            angle = False
        elif c == "," and not angle:
            if "".join(cur).strip():
                items.append("".join(cur))
                if len(items) >= most:
                    return [i.strip() for i in items]
            cur = []
            continue
        if not depth and c != ")":
            cur.append(c)
    items.append("".join(cur))
    return [i.strip() for i in items if i.strip()]


class SpoolBroken(OSError):
    """The spool would take the file but the daemon could never read it."""


def _check_group(maildrop: str, fd: int) -> None:
    # The file's group must be the spool's, which the directory's setgid bit gives
    # every new file: it is how the daemon (group mailgw) reads a file owned by anyone.
    # Without the bit the file gets the caller's group and would be refused at pickup.
    spool = os.stat(maildrop)
    if os.fstat(fd).st_gid != spool.st_gid:
        raise SpoolBroken(
            f"{maildrop} has lost its setgid bit or its group (mode "
            f"{stat.S_IMODE(spool.st_mode):04o}; it must be 3733, group mailgw): the daemon "
            "could not read the message"
        )


def max_size(maildrop: str) -> int:
    """The limit the daemon published ([sendmail] max_size); the default without it.
    The daemon checks again at pickup: this is to refuse early, with an exit code."""
    value = read_limit(os.path.join(maildrop, ".max_size"), _owners(maildrop))
    return DEFAULT_MAX_SIZE if value is None else value


def drop(maildrop: str, data: bytes) -> str:
    """Write one spool file durably; its name. Raises OSError."""
    name = os.urandom(16).hex()
    path = os.path.join(maildrop, name)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags, 0o600)
    try:
        _check_group(maildrop, fd)
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
