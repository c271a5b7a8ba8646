"""Build the mail for one delivery: headers, Message-ID, body, clock notes.

Alert text comes from sensors and is hostile by assumption. It reaches headers
only through `_header_text`, which folds every line break and control character
into a space, so no payload can add a header line or a recipient (the
recipients come from the route alone). policy.SMTP then encodes non-ASCII
per RFC 2047 and refuses any header value that still held CR or LF.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, parseaddr

from gateway.alert import Alert, Severity
from gateway.clock import Stamp
from gateway.config import RouteSection
from gateway.routing import render

_FOLD = re.compile(r"[\x00-\x1f\x7f\u2028\u2029\x85]+")
MAX_SUBJECT = 200


def _header_text(text: str, limit: int = 998) -> str:
    flat = _FOLD.sub(" ", text).strip()
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def message_id(alert: Alert, route: str, device_id: str) -> str:
    """The same on every retry of this delivery: duplicates are identifiable."""
    return f"<{alert.id}.{route}@{device_id}.mailgw>"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def receipt_text(alert: Alert, now: Stamp) -> tuple[str, str | None]:
    """The receipt time to print, and a note about the clock when one is due."""
    when, trusted = alert.received.corrected(now)
    if alert.received.synced:
        return _iso(when), None
    if trusted:
        return _iso(when), (
            f"The gateway's clock was not synchronised when this alert arrived (it read "
            f"{_iso(alert.received.wall)}); the receipt time was corrected after it synchronised."
        )
    return _iso(when), (
        "The gateway's clock was not synchronised when this alert arrived and could not be "
        "corrected since (no time sync yet, or a reboot in between): the receipt time may be "
        "wrong."
    )


def default_body(alert: Alert, device_id: str, now: Stamp) -> str:
    received, note = receipt_text(alert, now)
    lines = [
        alert.message,
        "",
        f"device:     {device_id}",
        f"severity:   {alert.severity}",
        f"sensor:     {alert.sensor}",
        f"topic:      {alert.topic}",
        f"source:     {alert.source}",
        f"received:   {received}",
    ]
    if alert.event_time:
        lines.append(f"event time: {alert.event_time} (the sensor's clock)")
    lines.append(f"alert id:   {alert.id}")
    for key, value in sorted(alert.fields.items()):
        lines.append(f"{key}: {value}")
    if alert.notes:
        lines.append(f"input notes: {', '.join(alert.notes)} (the payload was sanitised)")
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class Composed:
    message: EmailMessage
    sender: str
    recipients: tuple[str, ...]


def compose(
    alert: Alert,
    route: RouteSection,
    *,
    device_id: str,
    sender: str,
    now: Stamp | None = None,
    recipients: tuple[str, ...] | None = None,
) -> Composed:
    now = now or Stamp.now()
    values = alert.template_values()
    values["device_id"] = device_id
    received, _ = receipt_text(alert, now)
    values["received"] = received
    msg = EmailMessage(policy=SMTP)
    msg["From"] = sender
    msg["To"] = ", ".join(route.to)
    if route.cc:
        msg["Cc"] = ", ".join(route.cc)
    msg["Subject"] = _header_text(render(route.subject, values), MAX_SUBJECT)
    msg["Date"] = format_datetime(datetime.fromtimestamp(now.wall, UTC))
    msg["Message-ID"] = message_id(alert, route.name, device_id)
    msg["Auto-Submitted"] = "auto-generated"
    msg["X-Mailgw-Device"] = _header_text(device_id)
    msg["X-Mailgw-Topic"] = _header_text(alert.topic)
    msg["X-Mailgw-Severity"] = str(alert.severity)
    msg["X-Mailgw-Alert-Id"] = alert.id
    if alert.severity >= Severity.CRITICAL:
        msg["Importance"] = "high"
        msg["X-Priority"] = "1"
    body = render(route.body, values) if route.body else default_body(alert, device_id, now)
    msg.set_content(body, charset="utf-8", cte="quoted-printable")
    envelope_from = parseaddr(sender)[1]
    rcpts = (
        recipients
        if recipients is not None
        else tuple(parseaddr(a)[1] for a in (*route.to, *route.cc))
    )
    return Composed(msg, envelope_from, rcpts)


def test_message(sender: str, to: str, device_id: str) -> EmailMessage:
    msg = EmailMessage(policy=SMTP)
    msg["From"] = sender
    msg["To"] = str(Address(addr_spec=parseaddr(to)[1]))
    msg["Subject"] = f"mailgw smtp-test from {device_id}"
    msg["Date"] = format_datetime(datetime.now(UTC))
    msg["Message-ID"] = f"<smtp-test.{int(time.time())}@{device_id}.mailgw>"
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(f"This is a test mail from the mailgw gateway {device_id}.\n", charset="utf-8")
    return msg
