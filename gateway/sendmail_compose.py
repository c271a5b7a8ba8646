"""A stored sendmail message → the mail the smarthost gets (the relay's `raw` kind).

The body and attachments go out as the bytes that came in. Only the header block is
rewritten, so that a smarthost accepts the mail from the gateway's account:
- From becomes smtp.from (the display name kept, or -F's); the original From is kept
  in X-Original-From and, unless the message has one, in Reply-To, so answers reach
  whoever wrote it;
- Sender, Return-Path and Bcc go (Bcc recipients are in the envelope only);
- Message-ID is kept; a message without one gets one from its alert id, the same at
  every attempt (invariant 2: a resend is a recognisable duplicate); Date is added
  from the time of pickup if missing;
- X-Mailgw-Submitted-By says which local uid handed it in (the spool file's owner).
Line ends: SMTP wants CRLF. A message written with CRLF keeps its bytes exactly; one
with bare LF (what cron and most tools write) has each LF made CRLF. A lone CR in the
body is left here, but the SMTP client (aiosmtplib) sends it as CRLF; a lone CR inside a
header field is made a fold so the field stays whole; a message with CR line ends only
is read as lines (maildrop_parse.cr_line_ends).
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from email.utils import format_datetime, formataddr, parseaddr

from gateway.clock import Stamp
from gateway.compose import Composed
from gateway.config import Config
from gateway.maildrop_parse import field_value, header_fields, split_message
from gateway.outbox import Claimed, Outcome, State
from gateway.outbox.raw import RawMessage, load
from gateway.outbox.writer import Writer
from gateway.routing import Router

_BARE_LF = re.compile(rb"(?<!\r)\n")
_BARE_CR = re.compile(rb"\r(?!\n)")
_DROPPED = (b"bcc", b"sender", b"return-path", b"x-original-from", b"x-mailgw-submitted-by")
RETRY_AFTER = 30.0  # the outbox could not be read: try this message again after this


def message_id(alert_id: str, device_id: str) -> str:
    return f"<{alert_id}.sendmail@{device_id}.mailgw>"


def rewrite(
    raw: bytes, *, sender: str, fullname: str, message_id: str, date: str, uid: int
) -> bytes:
    """The message as sent: header block rewritten (see the module's docstring), body
    as it was (LF → CRLF where bare)."""
    head, body = split_message(raw)
    out: list[bytes] = []
    original_from = b""
    seen: set[bytes] = set()
    for name, text in header_fields(head):
        seen.add(name)
        if name == b"from":
            original_from = text.split(b":", 1)[1].strip()
            name_part = parseaddr(field_value(text))[0]
            out.append(b"From: " + _address(fullname or name_part, sender))
        elif name not in _DROPPED:
            # A CR inside a header line would become a line end on the wire (the SMTP
            # client makes a lone CR a CRLF) and cut the field: it becomes a fold.
            out.append(_BARE_CR.sub(b"\r\n ", text))
    if b"from" not in seen:
        out.insert(0, b"From: " + _address(fullname, sender))
    if original_from:
        unfolded = re.sub(rb"\r?\n[ \t]*", b" ", original_from)
        out.append(b"X-Original-From: " + unfolded)
        if b"reply-to" not in seen:
            out.append(b"Reply-To: " + unfolded)
    if b"message-id" not in seen:
        out.append(f"Message-ID: {message_id}".encode())
    if b"date" not in seen:
        out.append(f"Date: {date}".encode())
    out.append(f"X-Mailgw-Submitted-By: uid {uid}".encode())
    return b"\r\n".join(out) + b"\r\n\r\n" + _BARE_LF.sub(b"\r\n", body)


def _address(name: str, addr: str) -> bytes:
    name = "".join(c for c in name if c >= " " and c != "\x7f")[:100]
    return formataddr((name, parseaddr(addr)[1]), charset="utf-8").encode("ascii", "replace")


async def compose_raw(
    item: Claimed, config: Config, router: Router, writer: Writer
) -> Composed | Outcome:
    """The mail for a `raw` delivery, or the outcome when it cannot be made."""
    assert config.smtp is not None
    try:
        raw: RawMessage | None = await writer.run(lambda ob: load(ob.conn, item.seq))
    except Exception as exc:  # a disk that fails for a moment: not the message's fault
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
    data = rewrite(
        raw.data,
        sender=config.smtp.sender,
        fullname=str(item.alert.fields.get("fullname") or ""),
        message_id=mid,
        date=format_datetime(datetime.fromtimestamp(wall, UTC)),
        uid=raw.uid,
    )
    return Composed(data, parseaddr(config.smtp.sender)[1], rcpts, mid)
