"""Reading a maildrop file (sans-IO): the envelope, the header block, where it goes.

Everything here is untrusted input from any local user: a file is parsed within
bounds, never evaluated, and whatever is wrong with it is a BadDrop with a reason the
pickup counts (gateway/maildrop.py). The message bytes themselves are not changed
here: the relay sends them as they came, after a few header rewrites
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
    message: bytes


def parse_drop(data: bytes) -> Drop:
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
    message = data[end + 2 :]
    if not message or message.isspace():  # (not strip(): that copies the message)
        raise BadDrop("the message is empty")
    check_header(message)
    return Drop(
        user=values.get("U", "")[:64],
        sender=values.get("F", ""),
        fullname=values.get("N", ""),
        extract=values.get("T") == "1",
        recipients=tuple(rcpts),
        message=message,
    )


def cr_line_ends(data: bytes) -> bytes:
    """A message with CR line ends and no LF at all (old Mac style) as LF lines: each
    CR was a line end (the SMTP client would make each one a CRLF anyway). Any other
    message is returned as it is."""
    if b"\n" not in data and b"\r" in data:
        return data.replace(b"\r", b"\n")
    return data


def _mbox_line(line: bytes) -> bool:
    # "From " begins an mbox separator, but "From : x" or "From  :x" is a header field.
    return line.startswith(b"From ") and _FIELD.match(line) is None


def split_message(data: bytes) -> tuple[bytes, memoryview]:
    """(header block, body). The body is every byte after the empty line, untouched: a
    view of `data`, not a copy (pickup wants only the header of a 10 MiB message).

    Lines end at LF only (a CR inside a line is part of it). A line that is neither a
    field nor a continuation ends the header block there (the body begins with it, as
    Postfix reads it); a leading mbox "From " line is kept in the block for
    header_fields to drop. A message with CR line ends only: see cr_line_ends.
    """
    data = cr_line_ends(data)
    head_end, body_start = split_at(data)
    return data[:head_end], memoryview(data)[body_start:]


def split_at(data: bytes, bounded: bool = False) -> tuple[int, int]:
    """Where split_message cuts `data` (already through cr_line_ends): the end of the
    header block and the start of the body. `bounded`: a BadDrop when the block goes
    past MAX_HEADER bytes or MAX_FIELDS fields, found without reading further."""
    pos, n, fields = 0, len(data), 0
    limit = MAX_HEADER + 1 if bounded else n
    while pos < n:
        # Bounded, a line is looked at no further than the limit: past it is enough.
        nl = data.find(b"\n", pos, pos + limit)
        line_end = nl + 1 if nl >= 0 else min(n, pos + limit)
        line = data[pos:line_end].rstrip(b"\r\n")
        if not line:
            return pos, line_end
        folded = pos > 0 and line[:1] in (b" ", b"\t")
        mbox = pos == 0 and _mbox_line(line)
        if not (folded or mbox or _FIELD.match(line)):
            return pos, pos
        fields += not folded
        if bounded and (line_end > MAX_HEADER or fields > MAX_FIELDS):
            what = f"{MAX_FIELDS} fields" if fields > MAX_FIELDS else f"{MAX_HEADER} bytes"
            raise BadDrop(f"its header block is larger than {what}, more than mail ever needs")
        pos = line_end
    return n, n


def check_header(message: bytes) -> None:
    """A BadDrop when the message's header block is past its bounds (MAX_HEADER)."""
    split_at(cr_line_ends(message), bounded=True)


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
