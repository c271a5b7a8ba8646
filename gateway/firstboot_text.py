"""The text work of `mailgw firstboot`, pure (bytes and text in, values out): find and
strip `password = ...` lines from a card's file whatever its table, decode what Windows
editors write (BOM, CRLF), choose between a password in the file and one beside it, and
check the result exactly as `mailgw check-config` does. The file operations, in their
crash-safe order, are in `gateway.firstboot`.
"""

from __future__ import annotations

import contextlib
import os
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.config import parse
from gateway.errors import ConfigError

PASSWORD_NAME = "mailgw-smtp-password"  # the password beside the config, on the card

# A configuration is a few KiB; anything much larger is not one (a wrong file copied).
MAX_CONFIG = 64 * 1024
# Files up to this size are still searched for password lines (so even a refused file
# gives its password up); a larger one is not read at all.
MAX_SCAN = 16 * 1024 * 1024
MAX_PASSWORD_FILE = 4096
BOM = b"\xef\xbb\xbf"  # Windows Notepad's UTF-8 signature

_HEADER = re.compile(rb"^[ \t]*\[\[?([^\]]*)\]")
_PART = rb"""(?:[A-Za-z0-9_-]+|"[^"\n]*"|'[^'\n]*')"""
_DOTTED = _PART + rb"(?:[ \t]*\.[ \t]*" + _PART + rb")*"
_KEY = re.compile(rb"^[ \t]*(" + _DOTTED + rb")[ \t]*=(.*)$")
# A key inside an inline table (`smtp = { password = "..." }`): after `{` or `,`. A
# string value holding ", password =" matches too; that costs a refusal, never a leak.
_INLINE_KEY = re.compile(rb"[{,][ \t]*(" + _DOTTED + rb")[ \t]*=")
# A value that may continue on the next lines: a multi-line string, an array, a table.
_OPENS = (b'"""', b"'''", b"[", b"{")
# Every line end an editor may write: Windows CRLF, Unix LF, classic Mac CR.
_LINE = re.compile(rb"([^\r\n]*)(\r\n|\r|\n|$)")


@dataclass(frozen=True)
class Encoding:
    """How the card's file was written, so that it can be written back the same way."""

    codec: str  # "utf-8", "utf-16-le" or "utf-16-be"
    bom: bytes

    def encode(self, text: str) -> bytes:
        return self.bom + text.encode(self.codec, "surrogatepass")


UTF8 = Encoding("utf-8", b"")
_BOMS = (
    (Encoding("utf-8", BOM), BOM),
    (Encoding("utf-16-le", b"\xff\xfe"), b"\xff\xfe"),
    (Encoding("utf-16-be", b"\xfe\xff"), b"\xfe\xff"),
)


def sniff(raw: bytes) -> Encoding:
    """The encoding of a card's file: by its BOM (Notepad's "UTF-8 with BOM", "Unicode",
    "Unicode big endian"), else UTF-16 without a BOM when its NULs say so, else UTF-8.

    UTF-16 without a BOM is told by its NUL bytes: a TOML file is mostly ASCII, so UTF-16
    puts a NUL in every other byte, nearly all on one side; UTF-8 text has no NUL at all
    (TOML forbids it). Only the install depends on this guess: `strip_card` scans every
    reading whatever it says.
    """
    for enc, bom in _BOMS:
        if raw.startswith(bom):
            return enc
    if len(raw) >= 2 and len(raw) % 2 == 0:
        even, odd = raw[0::2].count(0), raw[1::2].count(0)
        units = len(raw) // 2
        if odd * 4 >= units and even * 8 <= odd:
            return Encoding("utf-16-le", b"")
        if even * 4 >= units and odd * 8 <= even:
            return Encoding("utf-16-be", b"")
    return UTF8


def as_utf8(raw: bytes) -> tuple[Encoding, bytes]:
    """(the encoding, the file's bytes as UTF-8 without a BOM), for the install."""
    enc = sniff(raw)
    body = raw[len(enc.bom) :]
    if enc.codec == "utf-8":
        return enc, body
    even = body[: len(body) // 2 * 2]
    return enc, even.decode(enc.codec, "surrogatepass").encode("utf-8", "surrogatepass")


@dataclass(frozen=True)
class Found:
    """One `password = ...` found on the card (its value, never shown)."""

    table: str  # "smtp", or where else it was written
    line: int
    value: str | None  # None when it was not a one-line string we could read


@dataclass(frozen=True)
class Stripped:
    text: bytes  # the file with every password line replaced by a comment
    found: tuple[Found, ...]
    # Lines with a password key inside an inline table (`smtp = { password = "..." }`):
    # the line scan cannot take the password out of them alone.
    inline: tuple[int, ...] = ()


def _names(dotted: bytes) -> list[str]:
    return [
        p.strip().strip(b"\"'").decode("utf-8", "replace") for p in dotted.split(b".") if p.strip()
    ]


def _value(snippet: bytes) -> tuple[bool, str | None]:
    """(complete, the string) for a TOML value's text; complete is False while a
    multi-line value still lacks its end."""
    try:
        parsed = tomllib.loads("v = " + snippet.decode("utf-8"))
    except UnicodeDecodeError:
        return True, None
    except tomllib.TOMLDecodeError:
        return not snippet.lstrip().startswith(_OPENS), None
    value = parsed.get("v")
    return True, value if isinstance(value, str) else None


def _is_password(dotted: bytes) -> bool:
    return _names(dotted)[-1:] == ["password"]


def strip_passwords(raw: bytes, comment: bytes) -> Stripped:
    """Replace every `password = ...` line (and the lines a multi-line value continues
    on) by `comment`, keeping every other byte. Works on bytes, so a file that is not
    UTF-8, or not TOML at all, still gives its password lines up. Lines end in LF, CRLF
    or a lone CR (each is kept as it was). `raw` is UTF-8 (see `strip_card` for others).

    A light scan, not a parser: a table header inside a multi-line string can mislead
    the table name, never the removal (any key named password goes, wherever it is).
    """
    parts = [(m.group(1), m.group(2)) for m in _LINE.finditer(raw)]
    if parts and parts[-1] == (b"", b""):
        parts.pop()  # finditer's empty match at the very end
    lines = [body for body, _ in parts]
    found: list[Found] = []
    inline: list[int] = []
    table: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        body = line[len(BOM) :] if i == 0 and line.startswith(BOM) else line
        head = _HEADER.match(body)
        key = None if head else _KEY.match(body)
        if head:
            table = _names(head.group(1))
        if any(_is_password(m.group(1)) for m in _INLINE_KEY.finditer(body)):
            inline.append(i + 1)
        if key is None or not _is_password(key.group(1)):
            i += 1
            continue
        where = ".".join(table + _names(key.group(1))[:-1])
        snippet, end = key.group(2), i
        complete, value = _value(snippet)
        while not complete and end + 1 < len(lines):
            if len(snippet) > MAX_PASSWORD_FILE:
                # No password is this long: a broken file. Everything to its end goes,
                # so that nothing of a secret can stay behind (and the scan stays linear).
                end, value = len(lines) - 1, None
                break
            end += 1
            snippet += b"\n" + lines[end]
            complete, value = _value(snippet)
        for j in range(i, end + 1):
            bom = BOM if j == 0 and lines[j].startswith(BOM) else b""
            lines[j] = bom + (comment if j == i else b"#")
        found.append(Found(where, i + 1, value))
        i = end + 1
    text = b"".join(body + eol for body, (_, eol) in zip(lines, parts, strict=True))
    return Stripped(text, tuple(found), tuple(inline))


def _strip_as(raw: bytes, enc: Encoding, comment: bytes) -> Stripped:
    """`strip_passwords` on `raw` read as UTF-16 `enc` (after its BOM, if any). Any bytes
    decode as UTF-16 with lone surrogates passed through, so when nothing is found the
    bytes come back exactly as they were; an odd last byte is kept as it was."""
    body = raw[len(enc.bom) :]
    even = body[: len(body) // 2 * 2]
    utf8 = even.decode(enc.codec, "surrogatepass").encode("utf-8", "surrogatepass")
    s = strip_passwords(utf8, comment)
    if not (s.found or s.inline):
        return Stripped(raw, ())
    text = enc.encode(s.text.decode("utf-8", "surrogatepass")) + body[len(even) :]
    return Stripped(text, s.found, s.inline)


def strip_card(raw: bytes, comment: str) -> Stripped:
    """`strip_passwords` on a card's file in whatever encoding it was saved (UTF-8 with or
    without BOM, UTF-16 LE/BE with or without BOM): each line scanned as UTF-8, the file
    written back in its own encoding. Every plausible reading is scanned, not only the
    one `sniff` picks: a UTF-8 line after a stray BOM, or UTF-16 without a BOM whose
    NULs fall on both sides, must give its password up all the same."""
    found: tuple[Found, ...] = ()
    inline: tuple[int, ...] = ()
    text = raw
    readings = [e for e, bom in _BOMS[1:] if raw.startswith(bom)]
    if not readings and 0 in raw:
        readings = [Encoding("utf-16-le", b""), Encoding("utf-16-be", b"")]
    for enc in readings:
        s = _strip_as(text, enc, comment.encode())
        text, found, inline = s.text, found + s.found, inline + s.inline
    s = strip_passwords(text, comment.encode())
    return Stripped(s.text, found + s.found, inline + s.inline)


def leaks(raw: bytes, password: str) -> bool:
    """Whether `raw` still holds `password` in any encoding a card's file may use."""
    return any(
        password.encode(codec, "surrogatepass") in raw
        for codec in ("utf-8", "utf-16-le", "utf-16-be")
    )


def decode(raw: bytes) -> tuple[str | None, str | None]:
    """(the text to install, or None; the problem). What Windows and old Mac editors
    write is undone (a BOM, UTF-16, CRLF or CR line ends): the daemon reads
    /etc/mailgw/gateway.toml as plain UTF-8 with LF."""
    _, utf8 = as_utf8(raw)
    if len(utf8) > MAX_CONFIG:
        return None, (
            f"is {len(utf8)} bytes: too large for a configuration (at most {MAX_CONFIG}); "
            "is it the right file?"
        )
    try:
        text = utf8.removeprefix(BOM).decode("utf-8")
    except UnicodeDecodeError as exc:
        line = utf8.count(b"\n", 0, exc.start) + 1
        return None, f"line {line}: not UTF-8 text; save the file as UTF-8"
    return text.replace("\r\n", "\n").replace("\r", "\n"), None


def read_password_file(raw: bytes) -> tuple[str | None, str | None]:
    """(the password, the problem) from `mailgw-smtp-password`: one line, UTF-8 (or
    UTF-16 with its BOM, as Notepad's "Unicode" writes it)."""
    if len(raw) > MAX_PASSWORD_FILE:
        return None, f"is {len(raw)} bytes: not a password (one line)"
    enc = sniff(raw)
    try:
        text = raw.removeprefix(enc.bom).decode(enc.codec)
    except UnicodeDecodeError:
        return None, "is not UTF-8 text; save the password as UTF-8"
    lines = text.replace("\r\n", "\n").replace("\r", "\n").rstrip("\n").split("\n")
    if len(lines) > 1:
        return None, "holds more than one line; write the password alone on one line"
    return lines[0], None


def choose_password(
    card: str, found: Iterable[Found], beside: tuple[str | None, str | None] | None
) -> tuple[str | None, list[str]]:
    """The SMTP password to install (or None) and the problems with what was given.
    Two different passwords install neither: guessing would fail AUTH much later,
    quietly; a rejection says it now."""
    problems: list[str] = []
    given: list[str] = []
    for f in found:
        if f.table != "smtp":
            problems.append(
                f"{card}:{f.line}: {'.'.join(filter(None, (f.table, 'password')))}: not a "
                "setting; it was removed from the card and not kept (only [smtp] may carry "
                "a password here; other secrets go in files named by password_file)"
            )
        elif f.value is None:
            problems.append(
                f"{card}:{f.line}: smtp.password: could not be read; write it on one line "
                'as password = "..." (or in mailgw-smtp-password beside this file)'
            )
        else:
            given.append(f.value)
    if beside is not None:
        value, why = beside
        if why:
            problems.append(f"{PASSWORD_NAME}: {why}")
        elif value is not None:
            given.append(value)
    if len(set(given)) > 1:
        problems.append(
            "two different SMTP passwords were given (in mailgw.toml and beside it, or twice):"
            " neither was installed; give it once"
        )
        return None, problems
    if not given:
        return None, problems
    password = given[0]
    if not password.strip():
        problems.append("the SMTP password is empty")
        return None, problems
    if any(c in password for c in "\r\n\0"):
        problems.append("the SMTP password must be one line (no line break, no NUL)")
        return None, problems
    return password, problems


def password_problems(
    data: dict[str, Any], given: bool, secret: Path, secret_ok: bool
) -> list[str]:
    """What check-config cannot know: how the password handed over fits the config (its
    TOML data, so that these come with check-config's problems, not after a fix).
    `secret_ok`: `secret` holds a password (installed now or before)."""
    smtp = data.get("smtp")
    smtp = smtp if isinstance(smtp, dict) else {}
    username, pwf = smtp.get("username"), smtp.get("password_file")
    problems = []
    if given and not username:
        problems.append(
            "smtp.username: not set, so the SMTP password given would never be used; set it "
            f"(the password itself was moved to {secret})"
        )
    if isinstance(pwf, str) and os.path.normpath(pwf) == os.path.normpath(secret):
        problems.append(
            f"smtp.password_file: {secret} is root's alone (0600): the service reads it as "
            "its credential smtp-password, not as a file; remove password_file"
        )
    elif given and pwf is not None:
        problems.append(
            "smtp.password_file: set, and a password was given on the card too; give one "
            f"(the card's password is installed as {secret}: remove password_file)"
        )
    elif username and pwf is None and not smtp.get("oauth_token_file") and not secret_ok:
        problems.append(
            f"smtp.username: set, but no password was given and {secret} holds none; write "
            'password = "..." under [smtp], or the password alone in mailgw-smtp-password '
            "beside mailgw.toml"
        )
    return problems


def check(text: str, source: str, installed: Path) -> list[str]:
    """`mailgw check-config` on `text` as the daemon will read it from `installed`: the
    same parse, from the daemon's working directory (systemd's default, `/`)."""
    try:
        with contextlib.chdir("/"):
            parse(text, source=source, path=installed)
    except ConfigError as exc:
        return list(exc.problems)
    return []
