"""A stored sendmail message → the mail the smarthost gets (the relay's `raw` kind).

The body and attachments go out as the bytes that came in. Only the header block is
rewritten, so that a smarthost accepts the mail from the gateway's account:
- From becomes smtp.from (the display name kept, or -F's, else smtp.from's own); the
  original From is kept in X-Original-From and, unless the message has one, in
  Reply-To, so answers reach whoever wrote it;
- local names (no '@') in From, To and Cc are qualified with the host's mail name
  (/etc/mailname, else the FQDN), as Debian's exim4 and Postfix do for local mail;
  a From that was only a local name gets no Reply-To: mailgw receives no mail, so
  answers to root@<this host> would bounce; they go to smtp.from instead;
- Sender, Return-Path and Bcc go (Bcc recipients are in the envelope only);
- Message-ID is kept; a message without one gets one from its alert id, the same at
  every attempt (invariant 2: a resend is a recognisable duplicate); Date is added
  from the time of pickup if missing;
- X-Mailgw-Submitted-By says which local uid handed it in (the spool file's owner).
The relay reads the stored message once, into one buffer, and puts the new header
block in place of the old one there (rewrite_in_place): the body is not copied.
Line ends: SMTP wants CRLF. The body is not changed here either: the DATA encoder
(gateway/smtp_data.py) makes every lone LF or CR a CRLF on the wire, piece by piece,
so a 10 MiB message costs its own size once, whatever its lines. A lone CR inside a
header field is made a fold so the field stays whole; a message with CR line ends only
is read as lines (maildrop_parse.cr_line_ends).
"""

from __future__ import annotations

import re
import socket
import sqlite3
import time
from datetime import UTC, datetime
from email.utils import format_datetime, formataddr, getaddresses, parseaddr
from pathlib import Path

from gateway.clock import Stamp
from gateway.compose import Composed
from gateway.config import Config
from gateway.errors import GatewayError
from gateway.maildrop_parse import (
    BadDrop,
    cr_line_ends,
    cr_line_ends_in_place,
    field_value,
    header_fields,
    split_at,
)
from gateway.outbox import Claimed, Outcome, State
from gateway.outbox.raw import RawMessage, load
from gateway.outbox.writer import Writer
from gateway.routing import Router

_DOMAIN = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
_BARE_CR = re.compile(rb"\r(?!\n)")
_DROPPED = (b"bcc", b"sender", b"return-path", b"x-original-from", b"x-mailgw-submitted-by")
RETRY_AFTER = 30.0  # the outbox could not be read: try this message again after this


def message_id(alert_id: str, device_id: str) -> str:
    return f"<{alert_id}.sendmail@{device_id}.mailgw>"


def rewrite(
    raw: bytes,
    *,
    sender: str,
    fullname: str,
    message_id: str,
    date: str,
    uid: int,
    mailname: str = "localhost",
) -> bytes:
    """The message as sent, whole, CRLF line ends (what DATA carries before its
    transparency dots); the relay sends rewrite_head's pieces instead."""
    head, body = rewrite_head(
        raw,
        sender=sender,
        fullname=fullname,
        message_id=message_id,
        date=date,
        uid=uid,
        mailname=mailname,
    )
    return head + bytes(body).replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def rewrite_head(
    raw: bytes,
    *,
    sender: str,
    fullname: str,
    message_id: str,
    date: str,
    uid: int,
    mailname: str = "localhost",
) -> tuple[bytes, memoryview]:
    """The rewritten header block (see the module's docstring), ending with its empty
    line, and the body: a view of `raw`, not a copy. A header block past the bounds
    of maildrop_parse (stored before they were checked at pickup) is a BadDrop."""
    data = cr_line_ends(raw)
    head_end, body_start = split_at(data, bounded=True)
    head = new_head(
        data[:head_end],
        sender=sender,
        fullname=fullname,
        message_id=message_id,
        date=date,
        uid=uid,
        mailname=mailname,
    )
    return head, memoryview(data)[body_start:]


def rewrite_in_place(
    data: bytearray,
    *,
    sender: str,
    fullname: str,
    message_id: str,
    date: str,
    uid: int,
    mailname: str = "localhost",
) -> None:
    """rewrite_head's header block put in place of the message's own, in `data`: the
    body is neither copied nor moved elsewhere, so the mail the relay sends is the one
    buffer it read (a message of max_size is in the daemon once)."""
    cr_line_ends_in_place(data)
    head_end, body_start = split_at(data, bounded=True)
    with memoryview(data) as view:
        block = bytes(view[:head_end])  # (a slice of the bytearray would be one more copy)
    head = new_head(
        block,
        sender=sender,
        fullname=fullname,
        message_id=message_id,
        date=date,
        uid=uid,
        mailname=mailname,
    )
    # Moved within the buffer (a larger header grows it where it is: a large buffer
    # is an mmap of its own, gateway/heap.py, which the kernel extends).
    data[:body_start] = head


def new_head(
    head: bytes,
    *,
    sender: str,
    fullname: str,
    message_id: str,
    date: str,
    uid: int,
    mailname: str = "localhost",
) -> bytes:
    """The header block `head` (LF lines) as sent (see the module's docstring), CRLF
    line ends, ending with its empty line."""
    out: list[bytes] = []
    original_from = b""
    from_local = False
    seen: set[bytes] = set()
    for name, text in header_fields(head):
        seen.add(name)
        if name == b"from":
            original, from_local = _qualified(text, mailname)
            original_from = original.split(b":", 1)[1].strip()
            name_part = parseaddr(field_value(text))[0]
            out.append(b"From: " + _address(fullname or name_part, sender))
        elif name in (b"to", b"cc"):
            out.append(_BARE_CR.sub(b"\r\n ", _qualified(text, mailname)[0]))
        elif name not in _DROPPED:
            # A CR inside a header line would become a line end on the wire (the SMTP
            # client makes a lone CR a CRLF) and cut the field: it becomes a fold.
            out.append(_BARE_CR.sub(b"\r\n ", text))
    if b"from" not in seen:
        out.insert(0, b"From: " + _address(fullname, sender))
    if original_from:
        unfolded = re.sub(rb"\r?\n[ \t]*", b" ", original_from)
        out.append(b"X-Original-From: " + unfolded)
        if b"reply-to" not in seen and not from_local:
            out.append(b"Reply-To: " + unfolded)
    if b"message-id" not in seen:
        out.append(f"Message-ID: {message_id}".encode())
    if b"date" not in seen:
        out.append(f"Date: {date}".encode())
    out.append(f"X-Mailgw-Submitted-By: uid {uid}".encode())
    return b"\r\n".join(out) + b"\r\n\r\n"


def _qualified(field: bytes, mailname: str) -> tuple[bytes, bool]:
    """The address field with each local name (no '@') given @mailname, as Debian's
    MTAs qualify local mail; and whether every address in it was a local name. A field
    with nothing to qualify is returned as it was, byte for byte."""
    name = field.split(b":", 1)[0]
    pairs = getaddresses([field_value(field)])
    addrs = [a for _, a in pairs if a]
    local = [a for a in addrs if "@" not in a]
    if not local:
        return field, False
    try:
        parts = [
            formataddr((display, addr if "@" in addr or not addr else f"{addr}@{mailname}"))
            for display, addr in pairs
            if addr
        ]
    except (UnicodeError, ValueError):
        # An address that is not ASCII (a local name like "jérôme") has no RFC 5322 form
        # to qualify into: the field goes as it came, rather than failing the message.
        return field, len(local) == len(addrs)
    text = name + b": " + ", ".join(parts).encode("utf-8", "replace")
    return text, len(local) == len(addrs)


def mail_name(path: Path = Path("/etc/mailname")) -> str:
    """The host's mail name: /etc/mailname's first line (Debian's), else the FQDN."""
    try:
        with path.open("rb") as f:
            first = f.readline(256).decode("ascii", "replace").strip()
    except OSError:
        first = ""
    if first and _DOMAIN.fullmatch(first):
        return first
    return socket.getfqdn() or "localhost"


def _address(name: str, addr: str) -> bytes:
    name = name or parseaddr(addr)[0]  # no name of its own: smtp.from's, not none
    name = "".join(c for c in name if c >= " " and c != "\x7f")[:100]
    return formataddr((name, parseaddr(addr)[1]), charset="utf-8").encode("ascii", "replace")


async def compose_raw(
    item: Claimed, config: Config, router: Router, writer: Writer
) -> Composed | Outcome:
    """The mail for a `raw` delivery, or the outcome when it cannot be made."""
    assert config.smtp is not None
    try:
        raw: RawMessage | None = await writer.run(lambda ob: load(ob.conn, item.seq))
    except (sqlite3.Error, OSError, GatewayError) as exc:
        # A disk or lock that fails for a moment: not the message's fault. Anything else
        # is the row's own, and the relay dead-letters it (Relay._deliver).
        return Outcome(
            item.key,
            State.QUEUED,
            due=time.monotonic() + RETRY_AFTER,
            error=f"could not read the stored message: {exc}",
            count_attempt=False,
        )
    if raw is None:
        return Outcome(
            item.key,
            State.DEAD,
            count_attempt=False,
            error="its stored message is gone from the outbox (raw_message); nothing to send",
        )
    rcpts = item.rcpts
    if rcpts is None:
        route = router.by_name.get(item.route)
        if route is None:
            return Outcome(
                item.key,
                State.DEAD,
                count_attempt=False,
                error=(
                    f"route {item.route!r} is no longer in the configuration; restore it and "
                    "run `mailgw queue retry ID`"
                ),
            )
        rcpts = tuple(parseaddr(a)[1] for a in (*route.to, *route.cc))
    device = config.gateway.device_id
    mid = message_id(item.alert.id, device)
    wall, _ = item.alert.received.corrected(Stamp.now())
    # The buffer `load` read, its header rewritten in place: the mail is in the
    # daemon once; line ends are made CRLF on the wire (gateway/smtp_data.py), so
    # nothing here grows with the number of lines.
    data = raw.data if isinstance(raw.data, bytearray) else bytearray(raw.data)
    try:
        rewrite_in_place(
            data,
            sender=config.smtp.sender,
            fullname=str(item.alert.fields.get("fullname") or ""),
            message_id=mid,
            date=format_datetime(datetime.fromtimestamp(wall, UTC)),
            uid=raw.uid,
            mailname=mail_name(),
        )
    except BadDrop as exc:
        return Outcome(item.key, State.DEAD, count_attempt=False, error=f"not sendable: {exc}")
    return Composed(data, parseaddr(config.smtp.sender)[1], rcpts, mid)
