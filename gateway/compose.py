"""Build the mail for one delivery: headers, Message-ID, body, clock notes.

Alert text comes from sensors and is hostile by assumption. It reaches headers
only through `_header_text`, which folds every line break and control character
into a space, so no payload can add a header line or a recipient (the
recipients come from the route alone); non-ASCII is then RFC 2047-encoded.

In the body, a value shown on one line (sensor, topic, event time, a field)
passes through `_one_line`, so it cannot add lines that pose as the gateway's
own; the message text keeps its line breaks, but `_body_lines` makes every one
of them (CR LF, a lone CR, NEL, U+2028) a plain LF before encoding, and the
encoder turns each LF into CR LF. So the bytes handed to SMTP have no bare CR
or LF, and a "." line cannot end DATA early whatever the client's dot-stuffing
(RFC 5321 §4.1.1.4, §2.3.8: the "SMTP smuggling" of 2023 relied on bare line ends).

Headers we build are folded (RFC 5322 §2.2.3) before a space, so no line passes
78 octets where a break is possible, and none passes 998 (§2.1.1).
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, formataddr, parseaddr

from gateway.alert import Alert, Severity
from gateway.clock import Stamp
from gateway.config import RouteSection
from gateway.drain import is_drain_lead
from gateway.routing import render

_FOLD = re.compile(r"[\x00-\x1f\x7f\u2028\u2029\x85]+")
MAX_SUBJECT = 200
LINE_SHOULD = 78  # RFC 5322 §2.1.1: lines SHOULD be at most 78 octets, MUST be 998

# Any line break Python or a mail reader might honour (str.splitlines' set).
_LINE_BREAK = re.compile(r"\r\n|[\n\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")
# Controls that are not line breaks, kept out of the body; tab is text.
_BODY_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1b\x1f\x7f-\x84\x86-\x9f]")


def _picture(m: re.Match[str]) -> str:
    """A control character as its Unicode control picture (U+2400...): visible, inert."""
    c = ord(m.group())
    if c < 0x20:
        return chr(0x2400 + c)
    if c == 0x7F:
        return "\u2421"  # ␡
    return "\u2424" if c in (0x85, 0x2028, 0x2029) else "\ufffd"  # ␤ for the line breaks


_ONE_LINE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _one_line(text: str) -> str:
    """A value shown on one body line: every control, CR and LF included, made a
    visible control picture, so CR LF "." CR LF "MAIL FROM:" stays one inert line."""
    return _ONE_LINE.sub(_picture, text)


def _body_lines(text: str) -> str:
    """The body with every line break a plain LF and no other control but tab."""
    return _BODY_CONTROL.sub(_picture, _LINE_BREAK.sub("\n", text))


def _header_text(text: str, limit: int = 998) -> str:
    flat = _FOLD.sub(" ", text).strip()
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


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
        f"device:     {_one_line(device_id)}",
        f"severity:   {alert.severity}",
        f"sensor:     {_one_line(alert.sensor)}",
        f"topic:      {_one_line(alert.topic)}",
        f"source:     {_one_line(alert.source)}",
        f"received:   {received}",
    ]
    if alert.event_time:
        lines.append(f"event time: {_one_line(alert.event_time)} (the sensor's clock)")
    lines.append(f"alert id:   {_one_line(alert.id)}")
    for key, value in sorted(alert.fields.items()):
        lines.append(f"{_one_line(key)}: {_one_line(str(value))}")
    if alert.notes:
        notes = ", ".join(_one_line(n) for n in alert.notes)
        lines.append(f"input notes: {notes} (the payload was sanitised)")
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def _encoded_words(text: str) -> list[str]:
    """RFC 2047 encoded-words for `text`: base64 of at most 36 bytes each (48
    encoded, a 60-character word), cut at character boundaries, so that the
    first word fits on a line after a header name of up to 16 characters
    ("X-Mailgw-Topic: ") within 78 octets. email.header does the same but took
    5 ms for a 200-character subject (its length estimates are quadratic); this
    is linear. Whitespace between encoded-words is not part of the text (§6.2).
    """
    words: list[str] = []
    chunk = b""
    for ch in text:
        raw = ch.encode("utf-8", "replace")  # a lone surrogate becomes "?"
        if len(chunk) + len(raw) > 36:
            words.append(chunk.decode("utf-8"))
            chunk = b""
        chunk += raw
    if chunk:
        words.append(chunk.decode("utf-8"))
    return [f"=?utf-8?b?{base64.b64encode(w.encode('utf-8')).decode('ascii')}?=" for w in words]


def _address_list(addresses: tuple[str, ...]) -> list[str]:
    """Each address with the comma that separates it from the next (§3.4)."""
    out = [_address(a) for a in addresses]
    return [a + "," for a in out[:-1]] + out[-1:]


def _address(text: str) -> str:
    # Config addresses are checked for line breaks; _header_text keeps it so here.
    name, addr = parseaddr(_header_text(text))
    return formataddr((name, addr), charset="utf-8") if name else addr


def _fold(name: str, words: list[str]) -> str:
    """`Name: w1 w2 ...` with CR LF + space before a word that would take the line
    past 78 octets (RFC 5322 §2.2.3: unfolding removes the CR LF, the space stays).

    A word is never cut: a line only passes 78 when one word does (an address
    with a long display name, a long run of ASCII without a space); the words we
    make stay far below 998 (subject and topic are cut at 200 characters first).
    No line is left blank (§3.2.2 forbids a folded line of only whitespace), so a
    fold follows a non-blank word.
    """
    lines = [f"{name}:"]
    for word in words:
        line = lines[-1]
        if len(line) + 1 + len(word) > LINE_SHOULD and line.strip() and line != f"{name}:":
            lines.append(f" {word}")
        else:
            lines[-1] = f"{line} {word}"
    return "\r\n".join(lines)


def _unstructured(name: str, text: str) -> str:
    """An unstructured header (Subject, X-Mailgw-Topic), folded at spaces; non-ASCII
    text becomes RFC 2047 encoded-words (which are then the fold points)."""
    if text.isascii():
        return _fold(name, text.split(" "))
    return _fold(name, _encoded_words(text))


@dataclass(frozen=True, slots=True)
class Composed:
    # The whole message, ready for DATA (a local mail: the buffer read from the outbox,
    # its line ends made CRLF on the wire).
    data: bytes | bytearray
    sender: str
    recipients: tuple[str, ...]
    message_id: str


def compose(
    alert: Alert,
    route: RouteSection,
    *,
    device_id: str,
    sender: str,
    now: Stamp | None = None,
    recipients: tuple[str, ...] | None = None,
    repeats: tuple[Alert, ...] = (),
) -> Composed:
    """The RFC 5322 message for one delivery, as bytes.

    Built directly rather than through EmailMessage: the header registry's parsing
    cost 1.8 ms a message here, most of the relay's budget at 400 mails/s. The only
    text from sensors that reaches a header passes through _header_text (no line
    breaks, no controls) and then RFC 2047 encoding; the addresses come from config.
    """
    now = now or Stamp.now()
    values = alert.template_values()
    values["device_id"] = device_id
    received, _ = receipt_text(alert, now)
    values["received"] = received
    values["repeats"] = str(len(repeats))
    subject = _header_text(render(route.subject, values), MAX_SUBJECT)
    mid = message_id(alert, route.name, device_id)
    extra = [
        _unstructured("X-Mailgw-Topic", _header_text(alert.topic, 200)),
        f"X-Mailgw-Severity: {alert.severity}",
        f"X-Mailgw-Alert-Id: {alert.id}",
    ]
    if repeats:
        extra.append(f"X-Mailgw-Repeats: {len(repeats)}")
    if alert.severity >= Severity.CRITICAL:
        extra += ["Importance: high", "X-Priority: 1"]
    if route.body:
        # A template places values where it likes; all but the message are one-liners.
        body = render(
            route.body, {k: v if k == "message" else _one_line(v) for k, v in values.items()}
        )
    else:
        body = default_body(alert, device_id, now)
    if repeats:
        last, _ = receipt_text(repeats[-1], now)
        body += (
            f"\nRepeated {len(repeats)} more times within the dedupe window, the last at "
            f"{last}: counted here instead of mailed one by one.\n"
        )
    return _message(route, sender, device_id, now, subject, mid, extra, body, recipients)


def _message(
    route: RouteSection,
    sender: str,
    device_id: str,
    now: Stamp,
    subject: str,
    mid: str,
    extra: list[str],
    body: str,
    recipients: tuple[str, ...] | None,
) -> Composed:
    headers = [
        _fold("From", [_address(sender)]),
        _fold("To", _address_list(route.to)),
    ]
    if route.cc:
        headers.append(_fold("Cc", _address_list(route.cc)))
    headers += [
        _unstructured("Subject", subject),
        f"Date: {format_datetime(datetime.fromtimestamp(now.wall, UTC))}",
        f"Message-ID: {mid}",
        "Auto-Submitted: auto-generated",
        f"X-Mailgw-Device: {_header_text(device_id, 64)}",
        *extra,
        "MIME-Version: 1.0",
        'Content-Type: text/plain; charset="utf-8"',
        "Content-Transfer-Encoding: quoted-printable",
    ]
    # b2a_qp passes a bare CR through and encodes a lone "." line as "=2E"; with
    # every break an LF first, replacing LF by CR LF leaves none bare.
    qp = binascii.b2a_qp(_body_lines(body).encode("utf-8", "replace"), istext=True)
    data = ("\r\n".join(headers) + "\r\n\r\n").encode("ascii") + qp.replace(b"\n", b"\r\n")
    rcpts = (
        recipients
        if recipients is not None
        else tuple(parseaddr(a)[1] for a in (*route.to, *route.cc))
    )
    return Composed(data, parseaddr(sender)[1], rcpts, mid)


def digest_lines(alerts: tuple[Alert, ...], key: str) -> list[tuple[int, Alert, Alert]]:
    """(count, first, last) per dedupe key, in order of first appearance."""
    groups: dict[str, list[Alert]] = {}
    for a in alerts:
        groups.setdefault(render(key, a.template_values()), []).append(a)
    return [(len(g), g[0], g[-1]) for g in groups.values()]


def compose_digest(
    alerts: tuple[Alert, ...],
    route: RouteSection,
    *,
    device_id: str,
    sender: str,
    now: Stamp | None = None,
    recipients: tuple[str, ...] | None = None,
) -> Composed:
    """One mail for the alerts storm control held back on a route: each distinct alert
    with its count, first and last seen. `alerts[0]` owns it (its Message-ID).

    A drain digest (gateway/drain.py) is owned by the gateway's own alert that says why
    the backlog was folded; it is the mail's preamble, not one of its lines, and every
    folded alert's id is listed at the end."""
    now = now or Stamp.now()
    drain = len(alerts) > 1 and is_drain_lead(alerts[0])
    shown = alerts[1:] if drain else alerts
    lines = digest_lines(shown, route.storm.key)
    top = max(a.severity for a in shown)
    if drain:
        part = alerts[0].fields.get("drain_part")
        subject = (
            f"[drain digest] {device_id}/{route.name}: {len(shown)} alerts of a backlog "
            f"({len(lines)} distinct{f', part {part}' if part else ''})"
        )
        intro = (
            f"{_one_line(alerts[0].message)}.\n\nCritical alerts keep their own mails. "
            "Each line: how many, first and last received, severity, topic, message."
        )
    else:
        subject = (
            f"[digest] {device_id}/{route.name}: {len(alerts)} alerts held back "
            f"({len(lines)} distinct)"
        )
        rules = []
        if route.storm.rate:
            count, per = route.storm.rate
            rules.append(f"rate limit {count} mails per {per:g} s")
        if route.storm.dedupe_window:
            rules.append(f"dedupe window {route.storm.dedupe_window:g} s")
        intro = (
            f"mailgw on {device_id} held back {len(alerts)} alerts on route {route.name} "
            f"({', '.join(rules) or 'storm control'}). Each line: how many, first and last "
            "received, severity, topic, message."
        )
    body = [intro, ""]
    for count, first, last in lines:
        t0, _ = receipt_text(first, now)
        t1, _ = receipt_text(last, now)
        text = _header_text(first.message, 300)
        body.append(
            f"{count:>6} x  {t0} .. {t1}  [{first.severity}] {_one_line(first.topic)}: "
            f"{_one_line(text)}"
        )
    if drain:
        body += ["", f"the {len(shown)} alert ids folded here:", *(_one_line(a.id) for a in shown)]
    else:
        body += ["", f"alert ids: {alerts[0].id} .. {alerts[-1].id}"]
    extra = [
        f"X-Mailgw-Digest: {len(shown)}",
        f"X-Mailgw-Severity: {top}",
        f"X-Mailgw-Alert-Id: {alerts[0].id}",
    ]
    if drain:
        extra.append(f"X-Mailgw-Drain: {_header_text(str(alerts[0].fields.get('drain_part')), 20)}")
    mid = f"<{alerts[0].id}.{route.name}.digest@{device_id}.mailgw>"
    subject = _header_text(subject, MAX_SUBJECT)
    return _message(
        route, sender, device_id, now, subject, mid, extra, "\n".join(body) + "\n", recipients
    )


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
