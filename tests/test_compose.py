"""Composition against hostile alerts: the bytes handed to SMTP, parsed back; and, at the
end, what a real smarthost receives from the relay."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import getaddresses

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.alert import Alert, Draft, Severity, normalize
from gateway.clock import Stamp
from gateway.compose import Composed, compose, compose_digest
from gateway.config import RouteSection
from tests.parts import Gateway, Pki, SmtpServer, alert, smtp_conf

SMUGGLE = "\r\n.\r\nMAIL FROM:<x>\r\n"
HOSTILE = [SMUGGLE, "a\rb", "nul\x00here", "ls\u2028here", "esc\x1b[2Jhere", "nel\x85x"]
STAMP = Stamp(wall=1_790_000_000.0, boottime=10.0, boot_id="b", synced=True)
ROUTE = RouteSection(name="ops", match="#", to=("ops@example.com",))
OUR_HEADERS = [
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "Auto-Submitted",
    "X-Mailgw-Device",
    "X-Mailgw-Topic",
    "X-Mailgw-Severity",
    "X-Mailgw-Alert-Id",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
]


def hostile_alert(message: str = "alarm", event_time: str | None = None, **fields: str) -> Alert:
    return Alert(
        id="01a22bf6-0000-7000-8000-000000000001",
        topic="alerts/room",
        source="mqtt",
        sensor="temp",
        severity=Severity.WARNING,
        message=message,
        received=STAMP,
        event_time=event_time,
        fields=fields,
    )


def parse(mail: Composed) -> EmailMessage:
    msg = BytesParser(policy=policy.default).parsebytes(mail.data)
    assert isinstance(msg, EmailMessage)
    return msg


def assert_canonical(data: bytes) -> None:
    """No bare CR, no LF without its CR, no line an SMTP server could take for the end
    of DATA, and no line over 998 octets."""
    assert re.search(rb"\r(?!\n)", data) is None, "bare CR"
    assert re.search(rb"(?<!\r)\n", data) is None, "bare LF"
    assert data.endswith(b"\r\n")
    lines = data.split(b"\r\n")
    assert b"." not in lines
    assert all(len(line) <= 998 for line in lines)


def body_text(mail: Composed) -> str:
    body = parse(mail).get_body()
    assert isinstance(body, EmailMessage)
    text = body.get_content()
    assert isinstance(text, str)
    return text


def test_hostile_one_line_values_stay_on_their_line() -> None:
    fields = {f"f{i}": v for i, v in enumerate(HOSTILE)}
    for bad in HOSTILE:
        mail = compose(
            hostile_alert("alarm", event_time=bad, **fields),
            ROUTE,
            device_id="gw",
            sender="gw@example.com",
            now=STAMP,
        )
        assert_canonical(mail.data)
        msg = parse(mail)
        assert [k for k, _ in msg.items()] == OUR_HEADERS
        assert msg["To"] == "ops@example.com" and mail.recipients == ("ops@example.com",)
        lines = body_text(mail).splitlines()
        assert sum(line.startswith("event time: ") for line in lines) == 1
        for i in range(len(HOSTILE)):
            (line,) = [x for x in lines if x.startswith(f"f{i}: ")]
            assert "\r" not in line and "\x00" not in line and "\x1b" not in line
        # The smuggled command is shown, inert, on the line of the value that held it.
        assert not any(line.startswith("MAIL FROM") for line in lines)
        assert "f0: ␍␊.␍␊MAIL FROM:<x>␍␊" in lines
        assert "." not in lines


def test_message_keeps_its_lines_with_canonical_breaks() -> None:
    text = "first\r\nsecond\rthird\nfourth\u2028fifth\r\n.\r\nMAIL FROM:<x>\r\nend\x00"
    mail = compose(hostile_alert(text), ROUTE, device_id="gw", sender="gw@example.com", now=STAMP)
    assert_canonical(mail.data)
    lines = body_text(mail).splitlines()
    assert lines[:8] == [
        "first",
        "second",
        "third",
        "fourth",
        "fifth",
        ".",
        "MAIL FROM:<x>",
        "end␀",
    ]
    # The "." line travels quoted-printable encoded: no line of the DATA is a lone dot.
    assert b"\r\n=2E\r\n" in mail.data
    assert [k for k, _ in parse(mail).items()] == OUR_HEADERS


def test_custom_body_template_cannot_add_lines_through_values() -> None:
    route = RouteSection(
        name="ops",
        match="#",
        to=("ops@example.com",),
        body="{message}\nat {event_time} on {sensor}\nroom={room}\n",
    )
    mail = compose(
        hostile_alert("one\rtwo", event_time=SMUGGLE, room="a\r\nBcc: x@y"),
        route,
        device_id="gw",
        sender="gw@example.com",
        now=STAMP,
    )
    assert_canonical(mail.data)
    assert body_text(mail).splitlines()[:4] == [
        "one",
        "two",
        "at ␍␊.␍␊MAIL FROM:<x>␍␊ on temp",
        "room=a␍␊Bcc: x@y",
    ]


def test_digest_is_canonical_whatever_the_alerts_hold() -> None:
    route = RouteSection(name="ops", match="#", to=("ops@example.com",))
    alerts = tuple(
        Alert(
            id=f"01a22bf6-0000-7000-8000-00000000000{i}",
            topic=f"alerts/{bad}",
            source="mqtt",
            sensor="s",
            severity=Severity.WARNING,
            message=bad,
            received=STAMP,
        )
        for i, bad in enumerate(HOSTILE)
    )
    mail = compose_digest(alerts, route, device_id="gw", sender="gw@example.com", now=STAMP)
    assert_canonical(mail.data)
    lines = body_text(mail).splitlines()
    assert sum(" x  " in line for line in lines) == len(HOSTILE)
    assert not any(line.startswith(("MAIL", ".")) for line in lines)


def test_forty_recipients_are_folded_and_all_kept() -> None:
    to = tuple(f"recipient{i:02d}@example.com" for i in range(40))
    cc = ("Jöhn Dœ <john@example.com>", '"Ops, night shift" <night@example.com>')
    route = RouteSection(name="ops", match="#", to=to, cc=cc)
    mail = compose(hostile_alert(), route, device_id="gw", sender="gw@example.com", now=STAMP)
    head = mail.data.split(b"\r\n\r\n", 1)[0]
    assert all(len(line) <= 78 for line in head.split(b"\r\n")), head
    assert_canonical(mail.data)
    to_lines = re.search(rb"^To:.*?(?=\r\n\S)", head, re.M | re.S)
    assert to_lines is not None and to_lines.group().count(b"\r\n ") >= 10  # folded
    msg = parse(mail)
    assert [a for _, a in getaddresses([str(msg["To"])])] == list(to)
    assert getaddresses([str(msg["Cc"])]) == [
        ("Jöhn Dœ", "john@example.com"),
        ("Ops, night shift", "night@example.com"),
    ]
    assert mail.recipients == (*to, "john@example.com", "night@example.com")


def test_long_subjects_fold_at_spaces_and_encoded_words() -> None:
    for text in ["word " * 60, "Kühlraum über 8 °C ❄ " * 12, "x" * 150]:
        mail = compose(
            hostile_alert(text), ROUTE, device_id="gw", sender="gw@example.com", now=STAMP
        )
        head = mail.data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
        # Only an unbreakable 150-character word may pass 78 octets.
        assert all(len(line) <= 78 or b"x" * 79 in line for line in head)
        assert_canonical(mail.data)
        full = f"[warning] gw/temp: {text}".strip()
        assert parse(mail)["Subject"] == (full if len(full) <= 200 else full[:197] + "...")


text_st = st.text(max_size=80)


@settings(max_examples=300, deadline=None)
@given(
    message=text_st,
    event_time=st.one_of(st.none(), text_st),
    topic=text_st,
    sensor=text_st,
    fields=st.dictionaries(st.from_regex(r"[a-z]{1,8}", fullmatch=True), text_st, max_size=4),
)
def test_property_headers_are_ours_and_values_stay_one_line(
    message: str, event_time: str | None, topic: str, sensor: str, fields: dict[str, str]
) -> None:
    alert = Alert(
        id="01a22bf6-0000-7000-8000-000000000001",
        topic=topic,
        source="mqtt",
        sensor=sensor,
        severity=Severity.INFO,
        message=message,
        received=STAMP,
        event_time=event_time,
        fields=fields,
    )
    mail = compose(alert, ROUTE, device_id="gw", sender="gw@example.com", now=STAMP)
    assert_canonical(mail.data)
    msg = parse(mail)
    assert [k for k, _ in msg.items()] == OUR_HEADERS
    assert msg.defects == []
    assert msg["To"] == "ops@example.com"
    lines = body_text(mail).splitlines()
    # The gateway's facts close the body, one line each, whatever the values held:
    # a value that split would shift every label below it.
    tail = 7 + bool(event_time) + len(fields)
    labels = [line.split(":", 1)[0] for line in lines[-tail:]]
    assert labels == [
        "device",
        "severity",
        "sensor",
        "topic",
        "source",
        "received",
        *(["event time"] if event_time else []),
        "alert id",
        *sorted(fields),
    ]
    assert lines[-tail + 2].startswith("sensor:     ")


# --- as a smarthost receives it from the relay ------------------------------------------


def test_header_injection_cannot_add_headers_or_recipients(
    pki: Pki, make_gateway: Callable[..., Gateway]
) -> None:
    evil = [
        "alarm\r\nBcc: thief@evil.example",
        "alarm\nTo: thief@evil.example\n\nbody",
        '{"message": "x\\r\\nCc: thief@evil.example", "sensor": "s\\r\\nBcc: a@b.c"}',
        "alarm\u2028Bcc: thief@evil.example",
    ]
    with SmtpServer(pki, "starttls") as server:
        gw = make_gateway(smtp_conf(server, pki))
        gw.add(*[alert(m) for m in evil])
        got = server.wait_for(len(evil))
        for r in got:
            assert r.recipients == ["ops@example.com"]
            assert r.message["Bcc"] is None and r.message["Cc"] is None
            assert r.message["To"] == "ops@example.com"
            assert "thief" not in "".join(f"{k}{v}" for k, v in r.message.items() if k != "Subject")
            assert "\n" not in str(r.message["Subject"])


def test_utf8_subject_is_encoded(pki: Pki, make_gateway: Callable[..., Gateway]) -> None:
    with SmtpServer(pki, "starttls") as server:
        gw = make_gateway(smtp_conf(server, pki))
        gw.add(alert("Kühlraum über 8 °C ❄"))
        (got,) = server.wait_for(1)
        assert b"=?utf-8?" in got.data.split(b"\r\n\r\n")[0]
        assert got.message["Subject"] == "[warning] gw-1/temp: Kühlraum über 8 °C ❄"


def test_clock_note_when_receipt_time_is_uncertain(
    pki: Pki, make_gateway: Callable[..., Gateway]
) -> None:
    with SmtpServer(pki, "starttls") as server:
        gw = make_gateway(smtp_conf(server, pki))
        unsynced = normalize(
            b"no rtc",
            Draft("alerts/x", "mqtt", "s"),
            Stamp(wall=time.time(), boottime=1.0, boot_id="another-boot", synced=False),
        )
        gw.add(unsynced)
        (got,) = server.wait_for(1)
        assert "could not be corrected" in got.message.get_body().get_content()
