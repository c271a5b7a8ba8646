"""Reading a maildrop file (sans-IO): the envelope, the header block, where it goes.

Everything here is untrusted input from any local user: a file is parsed within
bounds, never evaluated, and whatever is wrong with it is a BadDrop with a reason the
pickup counts (gateway/maildrop.py). The message bytes themselves are not changed
here, nor copied: the envelope and the header block are copied out (each bounded), the
message stays a view of the file as read, so a max_size message is in the daemon once.
The relay sends its bytes as they came, after a few header rewrites
(gateway/sendmail_compose.py).

The file's layout is written by gateway/sendmail.py: `MAILGW-DROP 1`, envelope lines
`<letter> <value>` (U user, F -f sender, N -F name, T -t, R recipient), an empty
line, the message.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from email.header import decode_header
from email.utils import getaddresses

from gateway.config.sendmail import Alias, SendmailSection
from gateway.outbox.raw import RawPlan
from gateway.sendmail_drop import MAX_RCPTS

MAGIC = b"MAILGW-DROP 1\n"
MAX_ENVELOPE = 256 * 1024  # ~ 250 recipients of 998 bytes: more is not a cron mail
# The header block's bounds, checked at pickup before anything is stored: parsing a
# header costs memory per field (a list entry, the name, the text), so a block of
# millions of "a:" lines would cost the daemon hundreds of MiB at every compose. Real
# mail is far inside both: a cron mail's header is a few hundred bytes; a long Received
# chain or DKIM-signed list mail a few dozen fields and tens of KiB.
MAX_HEADER = 1024 * 1024
MAX_FIELDS = 1000
_FIELD = re.compile(rb"[!-9;-~]+[ \t]*:")
# Searches by regex work on any buffer (a memoryview of the file read at pickup, the
# bytearray read at relay) without a copy of it.
_LF = re.compile(rb"\n")
_CR = re.compile(rb"\r")
_BLANK = re.compile(rb"[\r\n]*")
_NOT_SPACE = re.compile(rb"[^ \t\n\r\x0b\x0c]")
_LOCAL = re.compile(r"[A-Za-z0-9._+-]{1,64}")


class BadDrop(ValueError):
    """A maildrop file that can never become a mail; its text is the counted reason."""


@dataclass(frozen=True, slots=True)
class Drop:
    user: str  # as the client said (informational: the file's owner is what counts)
    sender: str
    fullname: str
    extract: bool
    recipients: tuple[str, ...]
    # The message: a view of the file's bytes, not a copy (a 10 MiB message is in the
    # daemon once, as read).
    message: memoryview
    head: bytes  # its header block (within MAX_HEADER), lines ending in LF


def parse_drop(data: bytes | bytearray) -> Drop:
    """The file's envelope and message. Only the envelope and the header block are
    copied out of `data` (each bounded); the message is a view of it."""
    if not data.startswith(MAGIC):
        raise BadDrop("not a mailgw maildrop file (no MAILGW-DROP 1 line)")
    end = data.find(b"\n\n", len(MAGIC) - 1)
    if end < 0 or end > MAX_ENVELOPE:
        raise BadDrop("its envelope has no end within 256 KiB")
    values: dict[str, str] = {}
    rcpts: list[str] = []
    for line in data[len(MAGIC) : end].split(b"\n"):
        text = line.decode("utf-8", "replace")
        letter, _, value = text.partition(" ")
        if len(letter) != 1 or any(c < " " or c == "\x7f" for c in value):
            raise BadDrop(f"its envelope has a malformed line {text[:60]!r}")
        if letter == "R":
            rcpts.append(value)
        else:
            values[letter] = value
    if len(rcpts) > MAX_RCPTS:
        raise BadDrop(f"{len(rcpts)} recipients (at most {MAX_RCPTS})")
    if _NOT_SPACE.search(data, end + 2) is None:
        raise BadDrop("the message is empty")
    message = memoryview(data)[end + 2 :]
    return Drop(
        user=values.get("U", "")[:64],
        sender=values.get("F", ""),
        fullname=values.get("N", ""),
        extract=values.get("T") == "1",
        recipients=tuple(rcpts),
        message=message,
        head=header_block(message),
    )


def cr_line_ends(data: bytes) -> bytes:
    """A message with CR line ends and no LF at all (old Mac style) as LF lines: each
    CR was a line end (the SMTP client would make each one a CRLF anyway). Any other
    message is returned as it is."""
    if cr_only(data):
        return data.replace(b"\r", b"\n")
    return data


def cr_only(data: bytes | bytearray | memoryview) -> bool:
    """Whether the message's lines end in CR alone (no LF anywhere): see cr_line_ends."""
    return _LF.search(data) is None and _CR.search(data) is not None


def cr_line_ends_in_place(data: bytearray, piece: int = 1 << 16) -> None:
    """cr_line_ends on a buffer, changed where it is (the same length): no second copy
    of a 10 MiB message."""
    if not cr_only(data):
        return
    for i in range(0, len(data), piece):
        data[i : i + piece] = data[i : i + piece].replace(b"\r", b"\n")


def header_block(message: bytes | bytearray | memoryview) -> bytes:
    """The header block as split_message cuts it (lines ending in LF, as through
    cr_line_ends), copied out of the message; a BadDrop when it goes past MAX_HEADER
    bytes or MAX_FIELDS fields. Nothing past the block is copied."""
    eol = b"\r" if cr_only(message) else b"\n"
    head_end, _ = split_at(message, bounded=True, eol=eol)
    head = bytes(message[:head_end])
    return head.replace(b"\r", b"\n") if eol == b"\r" else head


def _mbox_line(line: bytes) -> bool:
    # "From " begins an mbox separator, but "From : x" or "From  :x" is a header field.
    return line.startswith(b"From ") and _FIELD.match(line) is None


def split_message(data: bytes | memoryview) -> tuple[bytes, memoryview]:
    """(header block, body). The body is every byte after the empty line, untouched: a
    view of `data`, not a copy (pickup wants only the header of a 10 MiB message).

    Lines end at LF only (a CR inside a line is part of it). A line that is neither a
    field nor a continuation ends the header block there (the body begins with it, as
    Postfix reads it); a leading mbox "From " line is kept in the block for
    header_fields to drop. A message with CR line ends only: see cr_line_ends.
    """
    if cr_only(data):
        data = bytes(data).replace(b"\r", b"\n")
    head_end, body_start = split_at(data)
    return bytes(data[:head_end]), memoryview(data)[body_start:]


def split_at(
    data: bytes | bytearray | memoryview, bounded: bool = False, eol: bytes = b"\n"
) -> tuple[int, int]:
    """Where split_message cuts `data` (already through cr_line_ends, or with `eol`
    b"\r" for a message whose lines end in CR alone): the end of the header block and
    the start of the body. `bounded`: a BadDrop when the block goes past MAX_HEADER
    bytes or MAX_FIELDS fields, found without reading further. Nothing is copied:
    each line is looked at where it is."""
    pos, n, fields = 0, len(data), 0
    limit = MAX_HEADER + 1 if bounded else n
    end_of_line = _LF if eol == b"\n" else _CR
    while pos < n:
        # Bounded, a line is looked at no further than the limit: past it is enough.
        found = end_of_line.search(data, pos, pos + limit)
        line_end = found.end() if found is not None else min(n, pos + limit)
        if _BLANK.fullmatch(data, pos, line_end) is not None:
            return pos, line_end
        # The line's CRs and LFs never change what _FIELD matches (it takes neither).
        folded = pos > 0 and data[pos : pos + 1] in (b" ", b"\t")
        mbox = pos == 0 and _mbox_at(data, line_end)
        if not (folded or mbox or _FIELD.match(data, pos, line_end)):
            return pos, pos
        fields += not folded
        if bounded and (line_end > MAX_HEADER or fields > MAX_FIELDS):
            what = f"{MAX_FIELDS} fields" if fields > MAX_FIELDS else f"{MAX_HEADER} bytes"
            raise BadDrop(f"its header block is larger than {what}, more than mail ever needs")
        pos = line_end
    return n, n


def _mbox_at(data: bytes | bytearray | memoryview, line_end: int) -> bool:
    # _mbox_line for the first line of `data`, without copying it.
    return bytes(data[:5]) == b"From " and _FIELD.match(data, 0, line_end) is None


def check_header(message: bytes | bytearray | memoryview) -> None:
    """A BadDrop when the message's header block is past its bounds (MAX_HEADER)."""
    header_block(message)


def header_fields(head: bytes) -> list[tuple[bytes, bytes]]:
    """(lower-case name, the whole field with its folds, line ends stripped).

    Lines are split at LF, as split_message does, so a CR inside a line stays in it.
    A line that is not a field (only a header block from elsewhere has one) is kept
    verbatim under the name b"": nothing is dropped but the mbox separator.
    """
    fields: list[tuple[bytes, bytes]] = []
    lines = head.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for raw_line in lines:
        line = raw_line[:-1] if raw_line.endswith(b"\r") else raw_line
        if line[:1] in (b" ", b"\t") and fields:
            name, text = fields[-1]
            fields[-1] = (name, text + b"\r\n" + line)
        elif not fields and _mbox_line(line):
            continue  # mbox separator, not a header
        elif (m := _FIELD.match(line)) is not None:
            fields.append((m.group(0)[:-1].rstrip(b" \t").lower(), line))
        else:
            fields.append((b"", line))
    return fields


def field_value(field: bytes) -> str:
    """The value, unfolded, as text (bytes that are not UTF-8 replaced)."""
    value = field.split(b":", 1)[1]
    return re.sub(rb"\r\n[ \t]", b" ", value).strip().decode("utf-8", "replace")


def header_recipients(head: bytes) -> list[str]:
    """The addresses in To, Cc and Bcc (sendmail -t), each once, in order. More than
    MAX_RCPTS distinct ones is a BadDrop, as on the envelope."""
    if len(head) > MAX_HEADER:
        raise BadDrop(f"a header block over {MAX_HEADER} bytes")
    values = [field_value(f) for n, f in header_fields(head) if n in (b"to", b"cc", b"bcc")]
    found = dict.fromkeys(addr for _, addr in getaddresses(values) if addr)
    if len(found) > MAX_RCPTS:
        raise BadDrop(f"{len(found)} recipients in To/Cc/Bcc (at most {MAX_RCPTS})")
    return list(found)


MAX_SUBJECT = 4096  # encoded bytes decoded for a listing that shows 200 characters
# Codecs that are not a way of writing text but a way of writing code points (escapes,
# punycode): "=?unicode-escape?q?=5Cud800?=" would make a lone surrogate, which no
# UTF-8 column can hold. A Subject in one of them is shown as it was written.
_NOT_MAIL_CHARSETS = frozenset({"unicode-escape", "raw-unicode-escape", "punycode", "idna"})


def _decoded(text: str) -> str:
    """RFC 2047 words decoded with real text charsets only; never raises."""
    out: list[str] = []
    try:
        parts = decode_header(text)
    except Exception:  # a hostile header must not end the pickup: keep it as written
        return text
    for part, charset in parts:
        if isinstance(part, str):
            out.append(part)
            continue
        if charset is None:  # text between encoded words, as decode_header gives it back
            try:
                out.append(part.decode("raw-unicode-escape"))
            except Exception:
                return text
            continue
        try:
            info = codecs.lookup(charset)
        except LookupError:
            info = None
        if info is None or not info._is_text_encoding or info.name in _NOT_MAIL_CHARSETS:
            return text
        try:
            out.append(part.decode(info.name, "replace"))
        except Exception:
            return text
    return "".join(out)


def subject(head: bytes) -> str:
    """The Subject as text, for `mailgw queue` listings; never raises, and is always
    text a UTF-8 column can store (no surrogates, no controls)."""
    for name, f in header_fields(head[:MAX_HEADER]):
        if name == b"subject":
            text = _decoded(field_value(f)[:MAX_SUBJECT])
            return "".join(c for c in text if c >= " " and not "\ud800" <= c <= "\udfff")[:200]
    return ""


# Characters an addr-spec of ours never holds, and around which a parser would find a
# different address than a glob over the raw text: a display name, a comment, a route,
# a quoted local part, a list.
_NOT_BARE = frozenset(' \t()<>,;:"\\[]')


def bare_address(rcpt: str) -> str:
    """A recipient as the one address mail will go to: the same string sendmail.allow_to
    is checked against. `<a@x>` is taken as a@x; anything else that is not a bare
    addr-spec (a name, a comment, a second address around it) is a BadDrop: a parser's
    leniency would read another address out of it than the one that was checked."""
    from gateway.config.addresses import normalize_address

    text = rcpt.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    if not text or any(c in _NOT_BARE for c in text):
        raise BadDrop(f"{rcpt[:80]!r} is not a bare address (no name, comment or <> around it)")
    try:
        return normalize_address(text)
    except ValueError as exc:
        raise BadDrop(str(exc)[:200]) from None


def clean_recipients(rcpts: list[str]) -> list[str]:
    """Addresses through bare_address, local names (no '@') as they are; each once."""
    return list(dict.fromkeys(bare_address(r) if "@" in r else r for r in rcpts))


def plan(
    recipients: list[str], section: SendmailSection, default_route: str | None = None
) -> tuple[RawPlan, list[str]]:
    """Where the mail goes: addresses as they are, local names (no '@') through the
    alias table, else to `default_route` (gateway.default_route) when there is one.
    Returns the plan and the recipients it could not place (reasons); with no
    recipient at all the mail goes where `root`'s does."""
    from gateway.config.addresses import normalize_address

    # dicts as ordered sets: a -t message may name MAX_RCPTS addresses, many repeated
    routes: dict[str, None] = {}
    addresses: dict[str, None] = {}
    problems: list[str] = []
    for rcpt in dict.fromkeys(recipients or ["root"]):
        rcpt = rcpt.strip().strip("<>")
        if "@" not in rcpt:
            local = rcpt.lower()
            alias = section.alias(local) if _LOCAL.fullmatch(local) else None
            if alias is None and default_route:
                alias = Alias(routes=(default_route,))
            if alias is None:
                problems.append(
                    f"{rcpt!r}: no [sendmail.aliases] entry, no '*', no gateway.default_route"
                )
                continue
            routes.update(dict.fromkeys(alias.routes))
            addresses.update(dict.fromkeys(alias.addresses))
            continue
        try:
            addr = normalize_address(rcpt)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        addresses[addr] = None
    return RawPlan(tuple(routes), tuple(addresses), section.priority), problems
