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
# A key commented out (`# password = "..."`): no setting, but the secret is there all
# the same, and a commented line is never a value's continuation, so it goes alone.
_COMMENTED = re.compile(rb"^[ \t]*#[# \t]*(" + _DOTTED + rb")[ \t]*=")
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

    codec: str  # "utf-8", "utf-16-le", "utf-16-be", "utf-32-le" or "utf-32-be"
    bom: bytes

    @property
    def unit(self) -> int:
        """Bytes per code unit: what a body is cut to before it is decoded."""
        return 4 if "32" in self.codec else 2 if "16" in self.codec else 1

    def encode(self, text: str) -> bytes:
        return self.bom + text.encode(self.codec, "surrogatepass")

    def text(self, raw: bytes) -> str:
        """`raw` (after the BOM) read this way; any bytes decode (lone surrogates passed
        through, what UTF-32 cannot hold replaced), a partial last unit is left out."""
        body = raw[len(self.bom) :]
        body = body[: len(body) // self.unit * self.unit]
        errors = "replace" if self.unit == 4 else "surrogatepass"
        return body.decode(self.codec, errors)


UTF8 = Encoding("utf-8", b"")
# UTF-32 LE's BOM begins with UTF-16 LE's: it is looked for first.
_BOMS = (
    (Encoding("utf-8", BOM), BOM),
    (Encoding("utf-32-le", b"\xff\xfe\0\0"), b"\xff\xfe\0\0"),
    (Encoding("utf-32-be", b"\0\0\xfe\xff"), b"\0\0\xfe\xff"),
    (Encoding("utf-16-le", b"\xff\xfe"), b"\xff\xfe"),
    (Encoding("utf-16-be", b"\xfe\xff"), b"\xfe\xff"),
)
_WIDE = tuple(Encoding(c, b"") for c in ("utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"))


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
    if len(raw) >= 4 and len(raw) % 4 == 0:
        # UTF-32 puts three NULs beside each ASCII byte: one lane of four holds the text.
        lanes = [raw[k::4].count(0) for k in range(4)]
        units = len(raw) // 4
        if min(lanes[1:]) * 4 >= units * 3 and lanes[0] * 8 <= units:
            return Encoding("utf-32-le", b"")
        if min(lanes[:3]) * 4 >= units * 3 and lanes[3] * 8 <= units:
            return Encoding("utf-32-be", b"")
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
    if enc.codec == "utf-8":
        return enc, raw[len(enc.bom) :]
    return enc, enc.text(raw).encode("utf-8", "surrogatepass")


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
    # Lines where a password was commented out: removed too, but no password given.
    commented: tuple[int, ...] = ()


def _names(dotted: bytes) -> list[str]:
    """The names of a dotted key, its escapes undone as TOML undoes them: the daemon's
    parser reads `"pass\\u0077ord"` as password, and so must the scan."""
    if b"\\" in dotted:
        try:
            data: Any = tomllib.loads(dotted.decode("utf-8") + " = 0")
        except (UnicodeDecodeError, tomllib.TOMLDecodeError):
            pass
        else:
            names = []
            while isinstance(data, dict) and len(data) == 1:
                name, data = next(iter(data.items()))
                names.append(name)
            return names
    return [
        p.strip().strip(b"\"'").decode("utf-8", "replace") for p in dotted.split(b".") if p.strip()
    ]


def _value(snippet: bytes) -> tuple[bool, str | None]:
    """(complete, the string) for a TOML value's text; complete is False while a
    multi-line value still lacks its end. A value that is not UTF-8 is no string we
    install, but where it ends is still judged: a value in Windows-1252 that opens a
    multi-line string runs on to its end."""
    try:
        text, utf8 = snippet.decode("utf-8"), True
    except UnicodeDecodeError:
        text, utf8 = snippet.decode("utf-8", "replace"), False
    try:
        parsed = tomllib.loads("v = " + text)
    except tomllib.TOMLDecodeError:
        return not snippet.lstrip().startswith(_OPENS), None
    value = parsed.get("v")
    return True, value if utf8 and isinstance(value, str) else None


def _is_password(dotted: bytes) -> bool:
    return [n.lower() for n in _names(dotted)[-1:]] == ["password"]


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
    commented: list[int] = []
    table: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        bom = BOM if i == 0 and line.startswith(BOM) else b""
        body = line[len(bom) :]
        head = _HEADER.match(body)
        # A key after a header on the same line (`[smtp] password = "..."`) is no TOML,
        # but an installer writes it: the header is kept, the key goes.
        keep = body[: head.end()] + b" " if head else b""
        key = _KEY.match(body[len(keep) :] if head else body)
        if head:
            table = _names(head.group(1))
        if any(_is_password(m.group(1)) for m in _INLINE_KEY.finditer(body)):
            inline.append(i + 1)
        hidden = _COMMENTED.match(body)
        if key is None and hidden is not None and _is_password(hidden.group(1)):
            lines[i] = bom + comment
            commented.append(i + 1)
            i += 1
            continue
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
            lines[j] = bom + keep + comment if j == i else b"#"
        found.append(Found(where, i + 1, value))
        i = end + 1
    text = b"".join(body + eol for body, (_, eol) in zip(lines, parts, strict=True))
    return Stripped(text, tuple(found), tuple(inline), tuple(commented))


def _strip_as(raw: bytes, enc: Encoding, comment: bytes) -> Stripped:
    """`strip_passwords` on `raw` read as UTF-16 or UTF-32 `enc` (after its BOM, if any).
    When nothing is found the bytes come back exactly as they were; a partial last unit
    is kept as it was."""
    body = raw[len(enc.bom) :]
    whole = len(body) // enc.unit * enc.unit
    utf8 = enc.text(raw).encode("utf-8", "surrogatepass")
    s = strip_passwords(utf8, comment)
    if not (s.found or s.inline or s.commented):
        return Stripped(raw, ())
    text = enc.encode(s.text.decode("utf-8", "surrogatepass")) + body[whole:]
    return Stripped(text, s.found, s.inline, s.commented)


def strip_card(raw: bytes, comment: str) -> Stripped:
    """`strip_passwords` on a card's file in whatever encoding it was saved (UTF-8 with or
    without BOM, UTF-16 or UTF-32 LE/BE with or without BOM): each line scanned as UTF-8,
    the file written back in its own encoding. Every plausible reading is scanned, not
    only the one `sniff` picks: a UTF-8 line after a stray BOM, or UTF-16 without a BOM
    whose NULs fall on both sides, must give its password up all the same. What even
    this misses, `remains` finds afterwards."""
    found: tuple[Found, ...] = ()
    inline: tuple[int, ...] = ()
    commented: tuple[int, ...] = ()
    text = raw
    readings = [e for e, bom in _BOMS[1:] if raw.startswith(bom)]
    if not readings and 0 in raw:
        readings = list(_WIDE)
    for enc in readings:
        s = _strip_as(text, enc, comment.encode())
        text, found, inline = s.text, found + s.found, inline + s.inline
        commented += s.commented
    s = strip_passwords(text, comment.encode())
    return Stripped(s.text, found + s.found, inline + s.inline, commented + s.commented)


# The word password as a key would spell it: any letter in capitals or as a TOML escape
# (\u0077, \U00000077), not inside a longer bare key (password_file, smtp-password), and
# followed by what comes after a key (an optional closing quote, then `=` or `.`).
_ESCAPES = rb"|\\u00%02x|\\U000000%02x"
_SPELLED = b"".join(
    b"(?:" + bytes([c]) + b"".join(_ESCAPES % (x, x) for x in (c, c - 32)) + b")"
    for c in b"password"
)
_PASSWORD_KEY = re.compile(
    rb"(?<![A-Za-z0-9_-])" + _SPELLED + rb"(?![A-Za-z0-9_-])[\"']?[ \t]*[=.]", re.IGNORECASE
)


def readings(raw: bytes) -> list[str]:
    """The file read every way a card's file may be written: UTF-8 (after a BOM or not),
    UTF-16 and UTF-32 either way and from every byte offset (a stray byte before them
    shifts all that follows). Nothing fails: what does not decode is replaced."""
    texts = [raw.decode("utf-8", "replace")]
    if 0 in raw or raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        for enc in _WIDE:
            texts += [enc.text(raw[k:]) for k in range(enc.unit)]
    return texts


def _outside_strings(text: str) -> str:
    """`text`, a file that parses as TOML, with the inside of every string blanked out:
    what is left are keys, values other than strings, and comments. A string value is
    never a key (`subject = "password = reset"` is none); a comment may hide one."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "#":
            end = text.find("\n", i)
            end = n if end < 0 else end
            out.append(text[i:end])
            i = end
            continue
        if c not in "\"'":
            out.append(c)
            i += 1
            continue
        quote = text[i : i + 3] if text[i : i + 3] in ('"""', "'''") else c
        i += len(quote)
        while i < n and not text.startswith(quote, i):
            i += 2 if c == '"' and text[i] == "\\" else 1
        i += len(quote)
        # TOML lets a multi-line string end in up to two more quotes than its delimiter.
        while len(quote) == 3 and i < n and text[i] == c:
            i += 1
        out.append(" ")
    return "".join(out)


def has_password_key(data: Any) -> bool:
    """Whether parsed TOML holds a key named password (in any case), at any depth."""
    if isinstance(data, dict):
        return any(str(k).lower() == "password" or has_password_key(v) for k, v in data.items())
    if isinstance(data, list):
        return any(has_password_key(v) for v in data)
    return False


def remains(raw: bytes) -> bool:
    """Whether a password may still be in `raw` (the card's file, after stripping). A
    file the daemon could parse is judged by its parse (any key named password, at any
    depth) and by its comments and keys; any other file by a search of every reading
    for the word spelled as a key. When in doubt, yes: the caller then takes the whole
    file off the card."""
    text, _ = decode(raw)
    if text is not None:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError:
            pass
        else:
            outside = _outside_strings(text).encode("utf-8", "surrogatepass")
            return has_password_key(data) or bool(_PASSWORD_KEY.search(outside))
    return any(_PASSWORD_KEY.search(t.encode("utf-8", "surrogatepass")) for t in readings(raw))


def leaks(raw: bytes, password: str) -> bool:
    """Whether `raw` still holds `password` in any encoding a card's file may use."""
    return any(
        password.encode(codec, "surrogatepass") in raw
        for codec in ("utf-8", "utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be")
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
    if enc.unit == 4 and not enc.bom:
        enc = UTF8  # a password is too short for the NULs to tell UTF-32 reliably
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
