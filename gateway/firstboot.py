"""`mailgw firstboot`: take a configuration dropped on the boot partition ("flash and go").

An installer writes `mailgw.toml` (and perhaps `mailgw-smtp-password`) onto the card's
FAT boot partition from any computer; on the next boot this module checks it and
installs it as /etc/mailgw/gateway.toml. What it guarantees:

- **The password leaves the card first, whatever happens next.** FAT has no owners or
  modes: anyone holding the card reads it. So the SMTP password is written to
  /etc/mailgw/smtp-password (0600 root, the unit's `LoadCredential=`) and removed from
  the card before the configuration is even checked; a rejected configuration never
  leaves a readable password behind. Any `password = ...` line is removed, whatever its
  table and even commented out, so a password is never kept on the card by a mistake in
  where it was written. What is left is then checked, not trusted (`remains`): if a
  password may still be in it, the whole file leaves the card for root's /etc.
- **What check-config accepts is taken, nothing else.** The text that would be installed
  goes through `gateway.config.parse`, the same code as `mailgw check-config`, with the
  daemon's working directory (`/`, so relative paths mean what they will mean). Firstboot
  adds only the checks about the password it was handed.
- **Every other byte is kept** on the card: the password line becomes a comment (line
  numbers in problems still match the file the operator edits).
- **A power cut at any point is safe**: every file is replaced by a temporary file,
  fsync and rename; the card's own rewrite is rolled forward on the next run, and a
  file left zeroed but not yet unlinked (all NULs, or zeroed from the start while the
  marker written before the zeroing is there) is known as that leftover and removed.
- **Any encoding, any syntax**: the password is found by a line scan of every plausible
  reading of the bytes (UTF-8, UTF-16 and UTF-32 either way, any line ends), not by the
  TOML parser, and the file is written back in its own encoding.
- **No link is followed**: the card's names are opened with O_NOFOLLOW and must be
  regular files; a link is refused, and neither it nor its target is touched.

The text work (`strip_passwords`, `decode`, `choose_password`, `password_problems`) is
pure, in `gateway.firstboot_text`; `take` does the file operations in the order above:
`hand_over` (step 1), `judge` (step 2), then install or reject. Limits, said plainly: a
file over MAX_SCAN is not read (so not cleaned); zeroing a FAT file reaches its
clusters, not the copies an SD card's wear levelling may keep in flash.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.firstboot_text import (
    MAX_PASSWORD_FILE,
    MAX_SCAN,
    PASSWORD_NAME,
    Stripped,
    check,
    choose_password,
    decode,
    password_problems,
    read_password_file,
    remains,
    strip_card,
)

CONFIG_NAME = "mailgw.toml"
TAKEN_SUFFIX = ".taken"
REJECTED_SUFFIX = ".rejected"
SECRET_NAME = "smtp-password"
INSTALLED_NAME = "gateway.toml"
BEFORE_NAME = "gateway.toml.before-firstboot"
FROM_CARD_NAME = "mailgw.toml.from-card"

# --- files ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Owner:
    """Who owns what is installed: None leaves it to the running user (tests run
    unprivileged); `mailgw firstboot` as root passes root and the mailgw group."""

    uid: int | None = None
    gid: int | None = None

    @property
    def root_gid(self) -> int | None:
        """The group of root's own files (the secret), when ownership is set at all."""
        return None if self.uid is None else 0

    @classmethod
    def system(cls) -> Owner:
        if os.geteuid() != 0:
            return cls()
        import grp

        try:
            return cls(0, grp.getgrnam("mailgw").gr_gid)
        except KeyError:
            # Never a reason to leave the password on the card: install as root's, say so.
            return cls(0, None)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems (vfat on old kernels) refuse a directory fsync
    finally:
        os.close(fd)


def write_file(
    path: Path, data: bytes, mode: int | None, uid: int | None = None, gid: int | None = None
) -> None:
    """Replace `path` atomically: a temporary file created with `mode` (never wider for
    a moment), fsync, rename, fsync the directory. `mode` None: on the card, where FAT
    has no modes (vfat refuses a chmod it cannot represent)."""
    tmp = path.with_name(f".{path.name}.firstboot-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644 if mode is None else mode)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        if uid is not None or gid is not None:
            os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink()
        raise
    os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class NotAFile(OSError):
    """A name on the card that is not a regular file (a symbolic link, a directory),
    found while opening it (swapped in after `card_file` looked): an OSError, so that
    `mailgw firstboot` reports it like any other file error, in words."""


def _open_regular(path: Path, flags: int) -> int:
    """Open a file on the card without ever following a symbolic link: `mailgw
    firstboot` runs as root, and a link named mailgw-smtp-password pointing at
    /etc/shadow must not get that file read, zeroed or removed. O_NOFOLLOW refuses the
    link itself; fstat on what was opened refuses a FIFO or a device."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotAFile(f"{path}: is a symbolic link; firstboot never follows one") from exc
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotAFile(f"{path}: is not a regular file")
    return fd


def card_file(path: Path) -> str | None:
    """None when `path` is a regular file (not a link to one), "" when there is nothing
    at that name, else why it is refused (said to the operator)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return ""
    if stat.S_ISREG(st.st_mode):
        return None
    what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
    return (
        f"{path}: is {what}; firstboot never follows a link on the card (nor reads, "
        "zeroes or removes what it points to): put the file itself on the card"
    )


def read_card(path: Path, limit: int) -> tuple[bytes | None, int]:
    """(the file's bytes, its size); the bytes are None when it is over `limit`."""
    fd = _open_regular(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            return None, size
        chunks = []
        while chunk := os.read(fd, 64 * 1024):
            chunks.append(chunk)
        return b"".join(chunks), size
    finally:
        os.close(fd)


def _zero(path: Path) -> None:
    """Overwrite a file's bytes with zeros where they lie. On FAT (no copy-on-write) this
    reaches the same clusters, the best a program can do; an SD card's wear levelling
    may still keep an old copy in flash no file system can reach."""
    fd = _open_regular(path, os.O_WRONLY)
    try:
        size = os.fstat(fd).st_size
        chunk = bytes(min(size, 64 * 1024))
        left = size
        while left:
            left -= os.write(fd, chunk[:left])
        os.fsync(fd)
    finally:
        os.close(fd)


def _shredding(path: Path) -> Path:
    return path.with_name(path.name + ".firstboot-shred")


def shred(path: Path) -> None:
    """Zero, then unlink. A power cut between the two leaves a file of NULs (or, cut
    during the zeroing, one that begins with NULs) at the same name; the marker written
    first tells the next run that such a file is a leftover of this, to finish removing.
    Without the marker only a file of NULs alone is one: a file merely beginning with
    NULs may be a configuration (UTF-32 big endian without a BOM does)."""
    marker = _shredding(path)
    write_file(marker, b"", None)
    _zero(path)
    path.unlink()
    _fsync_dir(path.parent)
    marker.unlink()
    _fsync_dir(path.parent)


def is_zeroed(data: bytes, shredding: bool = False) -> bool:
    """A leftover of `shred`: all NULs, or (while its marker says a shred was under way)
    zeroed from the first byte on."""
    if shredding:
        return data[:1] == b"\0"
    return bool(data) and data.count(0) == len(data)


def _pending(card: Path) -> Path:
    return card.with_name(card.name + ".firstboot-new")


def rewrite_card(card: Path, data: bytes) -> None:
    """Replace the card's file by `data` so that the old bytes are gone from the medium:
    new copy written and synced, old one zeroed in place, then renamed over it. A power
    cut leaves either the old file (done again next time) or zeros and the new copy
    (rolled forward by `recover_card`)."""
    pending = _pending(card)
    write_file(pending, data, None)
    _zero(card)
    os.replace(pending, card)
    _fsync_dir(card.parent)


def recover_card(card: Path) -> None:
    """Finish what a power cut interrupted: the card's rewrite (`rewrite_card`), rolled
    forward once the old copy is zeroed; a zeroed file whose unlink was cut (`shred`)."""
    pending = _pending(card)
    if card_file(pending) is None:
        try:
            old, _ = read_card(card, MAX_SCAN)
            done = old is not None and old.count(0) == len(old)
        except FileNotFoundError:
            done = True
        except NotAFile:
            done = False
        if done:
            os.replace(pending, card)
        else:
            pending.unlink()
        _fsync_dir(card.parent)
        return
    _finish_shred(card)


def _finish_shred(path: Path) -> bool:
    """Remove a zeroed leftover of `shred` at `path`; True when there was one. A marker
    left without such a leftover (the cut fell before the zeroing began, or after the
    unlink) goes: the file, if any, is then handled like any other."""
    marker = _shredding(path)
    shredding = card_file(marker) is None
    leftover = False
    if card_file(path) is None:
        data, _ = read_card(path, MAX_SCAN)
        leftover = data is not None and is_zeroed(data, shredding)
    if leftover:
        shred(path)
    elif shredding:
        marker.unlink()
        _fsync_dir(path.parent)
    return leftover


# --- the whole job -------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    code: int  # 0 taken / nothing to do / password only; 1 rejected
    summary: str  # one line for the journal ("" when there was nothing to do)
    problems: tuple[str, ...] = field(default=())


def rejection_note(card: Path, problems: Iterable[str], handover: str, now: float) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now))
    if card.name == PASSWORD_NAME:
        todo = f"write the password alone on one line, UTF-8, in {PASSWORD_NAME} on this card"
    else:
        todo = (
            f"fix {card.name} on this card (`mailgw check-config -c {card.name}` on any "
            "machine with mailgw shows the same problems)"
        )
    lines = [
        f"mailgw firstboot did not take {card.name} ({when}; before the network time is set "
        "the clock may be wrong).",
        "The configuration in /etc/mailgw was left as it was.",
        "",
        "Problems:",
        *(f"  {p}" for p in problems),
        "",
        *([handover, ""] if handover else []),
        f"What to do: {todo}, and start the device again: the next boot takes it and "
        "deletes this note. Or, on the device: sudo mailgw firstboot.",
        "",
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class Handover:
    """What step 1 (every password off the card) found and did."""

    raw: bytes | None  # the card's mailgw.toml as read; None: absent or too large to read
    stripped: Stripped
    password: str | None  # the SMTP password, now installed in /etc/mailgw
    given: bool  # a password was given, in any form
    problems: tuple[str, ...]
    note: str  # for the .rejected file: what became of the password
    moved: Path | None = None  # the whole file, moved off the card to root's /etc


def hand_over(card: Path, beside: Path, secret: Path, owner: Owner) -> Handover:
    """Step 1: the password to `secret`, then off the card (never the other way round: a
    failed write leaves it on the card rather than nowhere). Neither name is followed if
    it is a link (`take` has refused it already)."""
    problems: list[str] = []
    raw: bytes | None = None
    stripped = Stripped(b"", ())
    if card_file(card) is None:
        raw, size = read_card(card, MAX_SCAN)
        if raw is None:
            problems.append(f"{card}: is {size} bytes: not a configuration; it was not read")
        else:
            stripped = strip_card(raw, f"# password moved to {secret} by mailgw firstboot")
    pw_file = None
    if card_file(beside) is None:
        pw_raw, _ = read_card(beside, MAX_PASSWORD_FILE + 1)
        pw_file = read_password_file(pw_raw if pw_raw is not None else bytes(MAX_PASSWORD_FILE + 1))
    password, why = choose_password(str(card), stripped.found, pw_file)
    problems += why
    if password is not None:
        _etc_dir(secret.parent, owner)
        write_file(secret, password.encode() + b"\n", 0o600, owner.uid, owner.root_gid)
    moved = None
    if raw is not None and remains(stripped.text):
        # What is left after the line scan is checked, not trusted: a password it could
        # not separate (an inline table, two keys on a line, a spelling it missed) means
        # nothing of the file may stay on the card. Root keeps it, for the operator.
        moved = secret.parent / FROM_CARD_NAME
        _etc_dir(moved.parent, owner)
        write_file(moved, raw, 0o600, owner.uid, owner.root_gid)
        shred(card)
        problems.append(
            f"{card}: holds a password that is not on a line of its own "
            f'(password = "..." under [smtp]), or what may be one; the file was moved to '
            f"{moved} (root only); write it again"
        )
    elif raw is not None and (stripped.found or stripped.commented):
        rewrite_card(card, stripped.text)
    if pw_file is not None:
        shred(beside)
    # The note says what is true of the card now: the file is gone (moved), or what is
    # left of it passed `remains`, and the password file was shredded.
    if moved is not None:
        note = (
            f"The file held a password (or what may be one), so it was moved off this card "
            f"to {moved} (readable by root only); nothing of it is left here."
        )
        if password is not None:
            note += f" The SMTP password was installed as {secret}."
    elif password is not None:
        note = f"The SMTP password was moved to {secret} and removed from this card."
    elif stripped.found or stripped.commented or pw_file is not None:
        note = "The password was removed from this card and not installed."
    else:
        note = ""
    given = bool(stripped.found) or pw_file is not None or moved is not None
    return Handover(raw, stripped, password, given, tuple(problems), note, moved)


def judge(h: Handover, card: Path, etc: Path) -> tuple[str | None, list[str]]:
    """Step 2: (the text to install, every problem): check-config's and the password's."""
    problems = list(h.problems)
    if h.raw is None or h.moved is not None:
        return None, problems
    text, why = decode(h.stripped.text)
    if text is None:
        return None, [*problems, f"{card}: {why}"]
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        data = {}  # check() says why
    secret = etc / SECRET_NAME
    problems += check(text, str(card), etc / INSTALLED_NAME)
    secret_ok = h.password is not None or _holds_secret(secret)
    problems += password_problems(data, h.given, secret, secret_ok)
    return text, problems


def take(boot: Path, etc: Path, owner: Owner | None = None, now: float | None = None) -> Outcome:
    """Do the whole job on `boot` (the card) and `etc` (/etc/mailgw); see the module."""
    owner = owner or Owner()
    boot, etc = boot.absolute(), etc.absolute()
    now = time.time() if now is None else now
    card, beside = boot / CONFIG_NAME, boot / PASSWORD_NAME
    secret, installed = etc / SECRET_NAME, etc / INSTALLED_NAME
    refused = [why for why in (card_file(card), card_file(beside)) if why]
    if not refused:
        recover_card(card)
        _finish_shred(beside)
    if card_file(card) == "" and card_file(beside) == "":
        return Outcome(0, "")

    h = hand_over(card, beside, secret, owner)
    if refused:
        # A link on the card is left as it is, and so is what it points to; whatever
        # regular file is beside it has given its password up all the same.
        name = card if card_file(card) else beside
        return _reject(name, [*refused, *h.problems], h.note, installed, now)
    if h.raw is None and h.moved is None and card_file(card) == "":
        # A password alone: for a device already configured.
        if h.problems:
            return _reject(beside, list(h.problems), h.note, installed, now)
        return Outcome(0, f"moved the SMTP password from {beside} to {secret}")
    text, problems = judge(h, card, etc)
    if problems or text is None:
        return _reject(card, problems, h.note, installed, now)

    # 3. Accepted: install, then retire the card's file so the next boot leaves it be.
    before = _install(text.encode(), installed, owner)
    os.replace(card, card.with_name(card.name + TAKEN_SUFFIX))
    with contextlib.suppress(FileNotFoundError):
        card.with_name(card.name + REJECTED_SUFFIX).unlink()
    _fsync_dir(boot)
    parts = [f"took {card}: installed as {installed}"]
    if before:
        parts.append(f"the previous one kept as {etc / BEFORE_NAME}")
    if h.password is not None:
        parts.append(f"the SMTP password moved to {secret}")
    parts.append(f"the card's copy is now {card.name}{TAKEN_SUFFIX}")
    if owner.uid is not None and owner.gid is None:
        parts.append(
            f"but there is no mailgw group, so {installed} is root's alone: install the "
            "package (or systemd-sysusers deploy/sysusers-mailgw.conf) and chgrp it to mailgw"
        )
    return Outcome(0, ", ".join(parts))


def _etc_dir(etc: Path, owner: Owner) -> None:
    """/etc/mailgw as the package makes it (root:mailgw 0750), if it is not there yet."""
    if etc.is_dir():
        return
    etc.mkdir(mode=0o750, parents=True)
    if owner.uid is not None:
        os.chown(etc, owner.uid, -1 if owner.gid is None else owner.gid)


def _holds_secret(secret: Path) -> bool:
    try:
        return bool(secret.read_bytes().strip())
    except OSError:
        return False


def _install(data: bytes, installed: Path, owner: Owner) -> bool:
    """Install the config (root:mailgw 0640); True when a different previous one was
    kept as gateway.toml.before-firstboot."""
    _etc_dir(installed.parent, owner)
    kept = False
    try:
        old = installed.read_bytes()
        st = installed.stat()
    except FileNotFoundError:
        old = None
    if old is not None and old != data:
        before = installed.with_name(BEFORE_NAME)
        keep_owner = (st.st_uid, st.st_gid) if owner.uid is not None else (None, None)
        write_file(before, old, stat.S_IMODE(st.st_mode), *keep_owner)
        kept = True
    write_file(installed, data, 0o640, owner.uid, owner.gid)
    return kept


def _reject(
    card: Path, problems: list[str], secret_note: str, installed: Path, now: float
) -> Outcome:
    note = rejection_note(card, problems, secret_note, now)
    write_file(card.with_name(card.name + REJECTED_SUFFIX), note.encode(), None)
    return Outcome(
        1,
        f"rejected {card} ({len(problems)} problem(s); {installed} left as it was; "
        f"see {card.name}{REJECTED_SUFFIX} beside it)",
        tuple(problems),
    )
