"""Invariant 10 as a property: whatever `config.load` accepts, the daemon runs.

Configs are generated with the values that used to slip through check-config and
stop the daemon later (non-ASCII and odd addresses, helo names, rates, durations,
ports, topic filters, secret files that are not UTF-8). Each one is either refused
with a ConfigError, or every part the daemon builds from it builds, composes and
sends. The fast property does that in-process against a real aiosmtpd; the slow test
runs `mailgw run` itself on a few accepted configs and has it relay an alert.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st

from gateway.alert import Alert, Draft, Severity, normalize
from gateway.compose import compose, compose_digest
from gateway.config import SEVERITIES, Config, ConfigError, load
from gateway.routing import Router
from gateway.service import Daemon
from gateway.smtp import SmtpSession, read_secret
from gateway.storm import decide, describe, refill
from tests.conftest import run_cli
from tests.parts import (
    DaemonProcess,
    Mosquitto,
    SmtpServer,
    free_port,
    mosquitto_binary,
    wait_for,
)

# --- generating configs --------------------------------------------------------------
#
# Each example breaks a field or a few (drawn from BAD, which includes arbitrary text)
# and draws the rest from GOOD, which still holds the edge cases that must be accepted
# and work: IDNA domains, display names, address literals, extreme but legal values.
# Breaking everything at once would have nearly every config refused.


def pick(good: st.SearchStrategy[object], *bad: object) -> tuple[st.SearchStrategy[object], ...]:
    """(good, bad) strategies for one field."""
    return good, st.sampled_from(list(bad))


LOCAL_GOOD = st.sampled_from(["ops", "alarm", "a.b+tag", "o'brien", "x_y", "x" * 64])
LOCAL_BAD = (
    LOCAL_GOOD
    | st.sampled_from(["jürgen", "a..b", ".a", "a b", '"q"', "", "x" * 65])
    | st.text(max_size=6)
)
DOMAIN_GOOD = st.sampled_from(
    [
        "example.com",
        "müller-kälte.de",
        "bäckerei.example",
        "ÉCOLE.fr",
        "xn--mller-klte-w5a5z.de",
        "[192.0.2.1]",
        "[IPv6:2001:db8::1]",
        "localhost",
    ]
)
DOMAIN_BAD = (
    DOMAIN_GOOD
    | st.sampled_from(
        ["straße.de", "[300.1.1.1]", "exa mple.com", "a..b", "ä" * 70 + ".de", "-bad.com", "x.de."]
    )
    | st.text(max_size=8)
)
NAME_GOOD = st.sampled_from(["Ops", "Kühlraum Süd", '"Ops, Night"', "Jörg (Nacht)"]) | st.text(
    alphabet=st.characters(categories=["L"]), min_size=1, max_size=8
)
NAME_BAD = NAME_GOOD | st.sampled_from(["Ops, Night", 'Q"uote', "a\\b", "\u2028", "<x@y>"])
NAME_BAD = NAME_BAD | st.text(max_size=8)


@st.composite
def addresses(draw: st.DrawFn, bad: bool = False) -> str:
    addr = f"{draw(LOCAL_BAD if bad else LOCAL_GOOD)}@{draw(DOMAIN_BAD if bad else DOMAIN_GOOD)}"
    forms = ["plain", "named", "comment"] + (["two", "raw"] if bad else [])
    form = draw(st.sampled_from(forms))
    name = draw(NAME_BAD if bad else NAME_GOOD)
    if form == "named":
        return f"{name} <{addr}>"
    if form == "comment":
        return f"{addr} ({name})"
    if form == "two":
        return f"{addr}, {draw(LOCAL_BAD)}@{draw(DOMAIN_BAD)}"
    if form == "raw":
        return draw(st.text(max_size=20))
    return addr


def durations(*good: str) -> tuple[st.SearchStrategy[object], ...]:
    """(good, bad) for a duration key whose legal values include `good`."""
    bad = ["0s", "1s", "500ms", "30s", "1h", "8d", "3650d", "3651d", "9" * 30 + "w", ""]
    bad += ["-5s", "5", "1x", "0.0001ms"]
    return pick(st.sampled_from(list(good)), *bad)


RATES = pick(
    st.sampled_from(["20/h", "5/10m", "1/s", "1000000/s", "1/365d"])
    | st.from_regex(r"\A[1-9][0-9]{0,2}/(?:[1-9][0-9]?)?[smhd]\Z"),
    *["1/0s", "0/s", "1000001/s", "1/366d", "9" * 20 + "/d", "1/" + "9" * 20 + "s", "x/h"],
)
HELOS = pick(
    st.sampled_from(["gw.example.com", "[127.0.0.1]", "[IPv6:::1]", "xn--hst-hoa", "gw-1"]),
    *["my host", "hüst", "[300.1.1.1]", "-x", "a_b", "", "gw."],
)
FILTERS = pick(
    st.sampled_from(["#", "alerts/#", "local/+", "a/+/c", "$SYS/#", "kühl/+/#"]),
    *["a/#/b", "a+/b", "", "x/\u0001", "x/\ufffe", "x/\x85"],
)
HOSTS = pick(
    st.sampled_from(["127.0.0.1", "localhost", "smtp.example.com", "müller.de", "::1"]),
    *["mx.example.com:587", "", "[::1]", "my host", "ä" * 70],
)
PORTS = pick(st.integers(1, 65535), -1, 0, 65536)
SECRETS = pick(
    st.sampled_from([b"s3cret\n", "pässwort\n".encode()]),
    *[b"", b"\n", "pässwort".encode("latin-1"), b"\xff\xfe"],
)
SEVERITY = pick(st.sampled_from(SEVERITIES), "loud", "")

# The fields an example may break (one strategy pair each, or built in `configs`).
FIELDS = {
    "max_messages": pick(st.integers(10, 10**6), -5, 0, 2**63),
    "max_age": durations("1m", "5d", "3650d"),
    "sent_retention": durations("0s", "7d"),
    "commit_interval": durations("0s", "1ms", "5ms", "1s"),
    "smtp_host": HOSTS,
    "smtp_port": PORTS,
    "helo_name": HELOS,
    "timeout": durations("1s", "2s", "10m", "1h"),
    "min_backoff": durations("1s", "5m"),
    "max_backoff": durations("1h", "2h"),
    "probe_max": durations("1s", "60s"),
    "secret": SECRETS,
    "mqtt_host": HOSTS,
    "mqtt_port": PORTS,
    "client_id": pick(st.sampled_from(["gw-prop-x", "", "kühl"]), "a\u0001", "\ufdd0"),
    "max_payload": pick(st.integers(1, 10**6), -1, 0, 10**9),
    "serial_name": pick(st.sampled_from(["tty0", "cab-1", "kühl"]), "a/b", "", "cab+1"),
    "line_regex": pick(st.just(r"(?P<sensor>\w+) (?P<message>.*)"), "(?P<sensr>x)", "("),
    "baudrate": pick(st.integers(50, 4_000_000), 0, 49, 5_000_000),
    "serial_severity": SEVERITY,
    "match": FILTERS,
    "min_severity": SEVERITY,
    "priority": pick(st.integers(0, 9), -1, 10),
    "rate_limit": RATES,
    "dedupe_window": durations("0s", "1s", "10m"),
    "digest_every": durations("1s", "1h", "7d"),
}
ADDRESS_FIELDS = ("from", "to", "cc")


def toml_str(text: str) -> str:
    """A TOML basic string: JSON's escapes are TOML's, except that TOML wants DEL escaped."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _lines(table: str, values: dict[str, object]) -> str:
    out = [table]
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            out.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, int):
            out.append(f"{key} = {value}")
        elif isinstance(value, str):
            out.append(f"{key} = {toml_str(value)}")
        else:
            assert isinstance(value, list)
            out.append(f"{key} = [{', '.join(toml_str(v) for v in value)}]")
    return "\n".join(out) + "\n"


@dataclasses.dataclass(frozen=True)
class Case:
    """A generated config. `text` holds {STATE}, {SECRET}, {SMTP_PORT}, {MQTT_PORT}."""

    text: str
    secret: bytes

    def write(self, directory: Path, smtp_port: int = 25, mqtt_port: int = 1883) -> Path:
        secret = directory / "secret"
        secret.write_bytes(self.secret)
        secret.chmod(0o600)
        path = directory / "gw.toml"
        path.write_text(
            self.text.replace("{STATE}", str(directory))
            .replace("{SECRET}", str(secret))
            .replace('"{SMTP_PORT}"', str(smtp_port))
            .replace('"{MQTT_PORT}"', str(mqtt_port))
        )
        return path


@st.composite
def configs(draw: st.DrawFn, deliverable: bool = False) -> Case:
    """A config; `deliverable` points SMTP (plain, no AUTH) and MQTT at the test's own
    servers and makes route 0 take every alert, so an accepted one must relay."""
    names = st.sampled_from([*FIELDS, *ADDRESS_FIELDS])
    one = names.map(lambda name: {name})
    # Mostly one broken field, so that its value alone decides whether it is refused.
    broken = draw(st.one_of(st.just(set()), one, one, one, st.sets(names, max_size=3)))

    def value(name: str, optional: bool = True) -> object:
        good, bad = FIELDS[name]
        if name in broken:
            return draw(bad)
        return draw(st.none() | good if optional else good)

    def address(name: str) -> str:
        return draw(addresses(bad=name in broken))

    parts = [
        _lines(
            "[gateway]",
            {"device_id": "gw-prop", "state_dir": "{STATE}/state", "runtime_dir": "{STATE}/run"},
        ),
        _lines(
            "[outbox]",
            {"allow_volatile": True}
            | {k: value(k) for k in ("max_messages", "max_age", "sent_retention")}
            | {"commit_interval": value("commit_interval")},
        ),
    ]
    uses_secret = not deliverable and draw(st.booleans())
    smtp: dict[str, object] = {
        "host": "127.0.0.1" if deliverable else value("smtp_host", optional=False),
        "port": "{SMTP_PORT}" if deliverable else value("smtp_port"),
        "tls": "none" if deliverable else draw(st.sampled_from(["starttls", "implicit"])),
        "from": address("from"),
        "username": "gw@example.com" if uses_secret else None,
    }
    if uses_secret:
        smtp[draw(st.sampled_from(["password_file", "oauth_token_file"]))] = "{SECRET}"
    for key in ("helo_name", "timeout", "min_backoff", "max_backoff", "probe_max"):
        smtp[key] = value(key)
    parts.append(_lines("[smtp]", smtp))
    if draw(st.booleans()):
        good, bad = FILTERS
        # An empty list is refused; a missing one means the default.
        topics = st.lists(bad, max_size=3) if "match" in broken else st.lists(good, min_size=1)
        mqtt: dict[str, object] = {
            "host": "127.0.0.1" if deliverable else value("mqtt_host"),
            "port": "{MQTT_PORT}" if deliverable else value("mqtt_port"),
            "topics": draw(st.none() | topics),
            "client_id": value("client_id"),
            "max_payload": value("max_payload"),
        }
        if draw(st.booleans()):
            mqtt["username"] = "gw"
            mqtt["password_file"] = "{SECRET}"
        parts.append(_lines("[mqtt]", mqtt))
    if draw(st.booleans()):
        serial = {
            "port": "/dev/mailgw-test-no-such-port",
            "name": value("serial_name"),
            "protocol": draw(st.sampled_from(["framed", "lines"])),
            "baudrate": value("baudrate"),
            "line_regex": value("line_regex"),
            "severity": value("serial_severity"),
        }
        parts.append(_lines("[[serial]]", serial))
    for i in range(draw(st.integers(1, 2))):
        first = deliverable and i == 0
        route: dict[str, object] = {
            "name": f"r{i}",
            "match": "#" if first else value("match"),
            "min_severity": "debug" if first else value("min_severity"),
            "to": [address("to") for _ in range(draw(st.integers(0 if "to" in broken else 1, 3)))],
            "cc": [address("cc") for _ in range(draw(st.integers(0, 2)))],
        }
        for key in ("priority", "rate_limit", "dedupe_window", "digest_every"):
            route[key] = value(key)
        parts.append(_lines("[[route]]", route))
    good, bad = FIELDS["secret"]
    secret = draw(bad if "secret" in broken else good)
    assert isinstance(secret, bytes)
    return Case("\n".join(parts), secret)


# --- using an accepted config as the daemon does --------------------------------------


def _alert(topic: str, severity: Severity, message: str = "door open") -> Alert:
    return normalize(message, Draft(topic=topic, source="local", sensor="door", severity=severity))


async def _send(cfg: Config, port: int, data: bytes, sender: str, rcpts: tuple[str, ...]) -> None:
    """The relay's SMTP session (its helo_name, its timeout) against the test server;
    TLS and AUTH are the relay tests' business."""
    assert cfg.smtp is not None
    plain = dataclasses.replace(
        cfg.smtp,
        host="127.0.0.1",
        port=port,
        tls="none",
        username=None,
        password_file=None,
        oauth_token_file=None,
    )
    session = SmtpSession(plain, "gw.example.com")
    await session.open()
    try:
        refused, _ = await session.send(data, sender, rcpts)
        assert not refused
    finally:
        await session.close()


def exercise(cfg: Config, smtp: SmtpServer) -> None:
    sender = cfg.smtp.sender if cfg.smtp else "gw@example.com"
    if cfg.smtp and cfg.smtp.username:
        assert read_secret(cfg.smtp) is not None  # the secret check-config saw is usable
    router = Router(cfg.routes, cfg.gateway.default_route)
    for topic in ("local/door", "alerts/cold/room", "serial/tty0/door"):
        for severity in Severity:
            for name, prio in router.route(_alert(topic, severity)):
                assert name in router.by_name and 0 <= prio <= 9
    for route in cfg.routes:
        alert = _alert("local/door", Severity.CRITICAL, "Tür offen\r\nBcc: x@evil.example")
        mails = [
            compose(alert, route, device_id=cfg.gateway.device_id, sender=sender),
            compose_digest(
                (alert, _alert("local/door", Severity.INFO)),
                route,
                device_id=cfg.gateway.device_id,
                sender=sender,
            ),
        ]
        for mail in mails:
            assert mail.data.isascii() and all(r.isascii() for r in mail.recipients)
            assert len(mail.recipients) == len(route.to) + len(route.cc)
        policy = route.storm
        describe(policy, Severity.WARNING)
        bucket = None
        for now in (1000.0, 1000.5, 5000.0):
            d = decide(policy, Severity.WARNING, now, None, bucket)
            bucket = d.bucket or bucket
            if policy.rate is not None:
                refill(bucket, policy.rate, now + 1)
        if cfg.smtp is not None:
            before = len(smtp.received)
            asyncio.run(_send(cfg, smtp.port, mails[0].data, mails[0].sender, mails[0].recipients))
            got = smtp.wait_for(before + 1, timeout=10)[before]
            assert got.recipients == list(mails[0].recipients)
            assert "x@evil.example" not in str(got.message["Bcc"] or "")
    daemon = Daemon(cfg)
    # Outbox, writer, relay, the MQTT client (secret, TLS), serial sources.
    daemon.open(daemon._open_outbox())
    try:
        assert daemon.writer is not None and daemon.writer.alive
    finally:
        for component in daemon.components:
            component.close()
        assert daemon.writer is not None and daemon.outbox is not None
        daemon.writer.stop()
        daemon.outbox.close()


def known(
    smtp: str = "",
    route: str = "",
    outbox: str = "",
    other: str = "",
    sender: str = "gw@example.com",
    secret: bytes = b"s3cret\n",
) -> Case:
    """A hand-written case: the values that used to pass check-config and stop the daemon."""
    return Case(
        '[gateway]\ndevice_id = "gw-prop"\nstate_dir = "{STATE}/state"\n'
        f'runtime_dir = "{{STATE}}/run"\n[outbox]\nallow_volatile = true\n{outbox}'
        f'[smtp]\nhost = "127.0.0.1"\nfrom = {toml_str(sender)}\n{smtp}'
        f'[[route]]\nname = "r0"\nto = ["ops@example.com"]\n{route}{other}',
        secret,
    )


@pytest.fixture(scope="module")
def smarthost() -> Iterator[SmtpServer]:
    with SmtpServer(None, "none") as server:
        yield server


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("configs")


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(case=configs())
@example(case=known(route='rate_limit = "1/0s"\n'))
@example(case=known(route='digest_every = "0s"\n'))
@example(case=known(route=f'dedupe_window = "{"9" * 400}s"\n'))
@example(case=known(smtp='helo_name = "my host"\n'))
@example(case=known(smtp='helo_name = "hüst"\n'))
@example(case=known(sender="Kühlraum Süd <gw@bäckerei.example>"))
@example(case=known(route='cc = ["alarm@müller-kälte.de", "Jörg <j@[192.0.2.1]>"]\n'))
@example(case=known(route='cc = ["a@example.com, b@example.com"]\n'))
@example(case=known(outbox='commit_interval = "99999999999999999999w"\n'))
@example(
    case=known(smtp='username = "gw"\npassword_file = "{SECRET}"\n', secret="pä".encode("latin-1"))
)
@example(
    case=known(other='[mqtt]\nusername = "gw"\npassword_file = "{SECRET}"\n', secret=b"\xff\xfe")
)
def test_what_load_accepts_the_daemon_builds_and_uses(
    case: Case, smarthost: SmtpServer, workdir: Path
) -> None:
    directory = Path(tempfile.mkdtemp(dir=workdir))
    try:
        path = case.write(directory)
        try:
            cfg = load(path)
        except ConfigError as exc:
            event("refused")
            assert exc.problems and all(f"{path}" in p for p in exc.problems)
            return
        event("accepted")
        exercise(cfg, smarthost)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# --- the slow one: the real daemon on a few accepted configs ---------------------------


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto | None]:
    if mosquitto_binary() is None:
        yield None
        return
    b = Mosquitto(tmp_path_factory.mktemp("mosquitto")).start()
    yield b
    b.stop()


@settings(
    max_examples=4,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
    ],
)
@given(case=configs(deliverable=True))
def test_accepted_configs_run_the_daemon_and_relay(
    case: Case, smarthost: SmtpServer, broker: Mosquitto | None, workdir: Path
) -> None:
    """check-config accepts → `mailgw run` starts, takes an alert and relays it."""
    directory = Path(tempfile.mkdtemp(dir=workdir))
    try:
        mqtt_port = broker.port if broker else free_port()  # no broker: offline is normal
        path = case.write(directory, smtp_port=smarthost.port, mqtt_port=mqtt_port)
        checked = run_cli("check-config", "-c", str(path))
        assume(checked.returncode == 0)
        cfg = load(path)
        gw = DaemonProcess(path, directory / "daemon.log").start()
        try:
            gw.wait_ready(("mqtt",) if cfg.mqtt and broker else ())
            before = len(smarthost.received)
            sent = run_cli(
                "send", "-c", str(path), "--sensor", "door", "--severity", "critical", "open"
            )
            assert sent.returncode == 0, sent.stderr
            route = cfg.routes[0]
            want = {a.rpartition("<")[2].rstrip(">") for a in (*route.to, *route.cc)}
            wait_for(
                lambda: any(set(m.recipients) == want for m in smarthost.received[before:]),
                timeout=15,
                what=f"the alert relayed to {sorted(want)}",
            )
            if cfg.mqtt and broker:
                # The broker took every subscription (it drops a client that sends one
                # it refuses).
                status = gw.status()
                assert status is not None and status["sources"]["mqtt"] == "connected"
            assert gw.alive, gw.log_text()[-2000:]
        finally:
            rc = gw.terminate()
        assert rc == 0, gw.log_text()[-2000:]
    finally:
        shutil.rmtree(directory, ignore_errors=True)
