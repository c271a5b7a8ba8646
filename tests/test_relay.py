"""The relay against a real SMTP server (aiosmtpd) on loopback with a throwaway CA."""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiosmtplib
import pytest

from gateway import outbox as ob_mod
from gateway.alert import Alert, Draft, Severity, normalize
from gateway.clock import Stamp
from gateway.config import Config, parse
from gateway.outbox import Outbox, Routed
from gateway.relay import Relay, judge_exception, judge_refusals, probe_delay, retry_delay
from gateway.routing import Router
from gateway.status import Runtime
from gateway.writer import Writer
from tests.parts import Pki, SmtpServer, make_pki, wait_for


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("other-pki"), ca_name="someone else's CA")


class Gateway:
    """Outbox + writer + relay, the relay in its own thread's event loop."""

    def __init__(
        self, tmp: Path, smtp_toml: str, routes: str | None = None, extra: str = ""
    ) -> None:
        routes = routes or '[[route]]\nname = "ops"\nmatch = "#"\nto = ["ops@example.com"]\n'
        text = (
            f'[gateway]\ndevice_id = "gw-1"\nstate_dir = "{tmp}/state"\n'
            f'runtime_dir = "{tmp}/run"\n{extra}\n[smtp]\n{smtp_toml}\n{routes}'
        )
        self.config: Config = parse(text)
        self.outbox = Outbox(self.config.outbox_path, max_messages=10**6)
        self.writer = Writer(self.outbox)
        self.writer.start()
        self.runtime = Runtime()
        self.router = Router(self.config.routes)
        self.relay = Relay(
            self.config, self.writer, self.router, self.runtime, rng=random.Random(7)
        )
        self.writer.on_commit = self.relay.wake_threadsafe
        self._loop = asyncio.new_event_loop()
        self._task: asyncio.Task[None] | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._task = self._loop.create_task(self.relay.run())
        with contextlib.suppress(asyncio.CancelledError):
            self._loop.run_until_complete(self._task)

    def start(self) -> Gateway:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(15)
        self.writer.stop()

    def add(self, *alerts: Alert) -> None:
        self.writer.call(
            lambda ob: ob.add([Routed(a, self.router.route(a)) for a in alerts])
        ).result(10)
        self.relay.wake_threadsafe()

    def counts(self) -> dict[str, object]:
        return self.writer.call(lambda ob: ob_mod.counts(ob.conn)).result(10)

    def flush(self) -> None:
        self._loop.call_soon_threadsafe(self.relay.flush)


def alert(
    msg: str = "cold room above 8 C",
    sev: Severity = Severity.WARNING,
    topic: str = "alerts/cold/temp",
) -> Alert:
    return normalize(msg.encode(), Draft(topic, "mqtt", "temp", sev))


def smtp_conf(
    server: SmtpServer, pki: Pki, tls: str = "starttls", auth: bool = True, extra: str = ""
) -> str:
    lines = [
        'host = "127.0.0.1"',
        f"port = {server.port}",
        f'tls = "{tls}"',
        'from = "Gateway <gw@example.com>"',
        f'ca_file = "{pki.ca_file}"',
        'timeout = "3s"',
        'min_backoff = "1s"',
        'max_backoff = "2s"',
        'probe_max = "2s"',
    ]
    if auth:
        lines += ['username = "gw@example.com"']
    return "\n".join(lines) + "\n" + extra


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    p = tmp_path / "pw"
    p.write_text("s3cret\n")
    p.chmod(0o600)
    return p


@pytest.fixture
def make_gateway(tmp_path: Path, password_file: Path) -> Iterator[Callable[..., Gateway]]:
    made: list[Gateway] = []

    def make(smtp_toml: str, **kw: str) -> Gateway:
        if (
            "username" in smtp_toml
            and "password_file" not in smtp_toml
            and "token" not in smtp_toml
        ):
            smtp_toml += f'password_file = "{password_file}"\n'
        gw = Gateway(tmp_path, smtp_toml, **kw).start()
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.stop()


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_starttls_and_each_auth_mechanism(
    pki: Pki, make_gateway: Callable[..., Gateway], mechanism: str
) -> None:
    others = tuple(m for m in ("PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2") if m != mechanism)
    with SmtpServer(pki, "starttls", exclude_auth=others) as server:
        gw = make_gateway(smtp_conf(server, pki))
        a = alert("fridge 3 at 11.2 C", Severity.CRITICAL)
        gw.add(a)
        (got,) = server.wait_for(1)
        assert got.tls and got.auth_user == "gw@example.com"
        assert got.message_id == f"<{a.id}.ops@gw-1.mailgw>"
        assert got.recipients == ["ops@example.com"] and got.sender == "gw@example.com"
        msg = got.message
        assert msg["Auto-Submitted"] == "auto-generated"
        assert msg["X-Mailgw-Severity"] == "critical" and msg["X-Mailgw-Alert-Id"] == a.id
        assert msg["X-Mailgw-Topic"] == "alerts/cold/temp" and msg["X-Mailgw-Device"] == "gw-1"
        assert msg["Subject"] == "[critical] gw-1/temp: fridge 3 at 11.2 C"
        body = msg.get_body().get_content()
        assert "fridge 3 at 11.2 C" in body and a.id in body
        wait_for(lambda: gw.counts()["sent"] == 1, what="row marked sent")


def test_xoauth2_token(pki: Pki, make_gateway: Callable[..., Gateway], tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("ya29.token\n")
    token.chmod(0o600)
    with SmtpServer(pki, "starttls") as server:
        server.tokens["gw@example.com"] = "ya29.token"
        gw = make_gateway(smtp_conf(server, pki) + f'oauth_token_file = "{token}"\n')
        gw.add(alert())
        (got,) = server.wait_for(1)
        assert got.auth_user == "gw@example.com"


def test_implicit_tls(pki: Pki, make_gateway: Callable[..., Gateway]) -> None:
    with SmtpServer(pki, "implicit") as server:
        gw = make_gateway(smtp_conf(server, pki, tls="implicit"))
        gw.add(alert())
        (got,) = server.wait_for(1)
        assert got.tls and got.auth_user == "gw@example.com"


def test_plain_loopback_without_auth(pki: Pki, make_gateway: Callable[..., Gateway]) -> None:
    with SmtpServer(None, "none", users={}) as server:
        gw = make_gateway(smtp_conf(server, pki, tls="none", auth=False))
        gw.add(alert())
        (got,) = server.wait_for(1)
        assert not got.tls


def test_untrusted_certificate_sends_nothing_and_no_credentials(
    pki: Pki, other_pki: Pki, make_gateway: Callable[..., Gateway]
) -> None:
    with SmtpServer(other_pki, "starttls") as server:
        gw = make_gateway(smtp_conf(server, pki))  # trusts `pki`, server shows `other_pki`
        gw.add(alert())
        wait_for(lambda: gw.runtime.uplink == "down", what="uplink down")
        assert "certificate" in (gw.runtime.last_error or "")
        assert server.received == [] and server.auth_attempts == []
        counts = gw.counts()
        # (the probe that failed puts its claimed row back just after reporting the uplink)
        wait_for(lambda: gw.counts()["queued"] == 1, what="the row back in the queue")
        assert counts["sent"] == 0
        rows = gw.writer.call(lambda ob: ob_mod.listing(ob.conn, ["queued", "sending"])).result(5)
        assert rows[0]["attempts"] == 0  # the uplink's fault, not the message's


def test_missing_starttls_is_refused_not_downgraded(
    pki: Pki, make_gateway: Callable[..., Gateway]
) -> None:
    with SmtpServer(pki, "starttls", offer_starttls=False) as server:
        gw = make_gateway(smtp_conf(server, pki))
        gw.add(alert())
        wait_for(lambda: gw.runtime.uplink == "down", what="uplink down")
        assert "does not offer STARTTLS" in (gw.runtime.last_error or "")
        assert "downgrade" in (gw.runtime.last_error or "")
        assert server.received == [] and server.auth_attempts == []


def test_wrong_password_is_an_uplink_problem(
    pki: Pki, make_gateway: Callable[..., Gateway], tmp_path: Path
) -> None:
    bad = tmp_path / "bad-pw"
    bad.write_text("wrong")
    bad.chmod(0o600)
    with SmtpServer(pki, "starttls") as server:
        gw = make_gateway(smtp_conf(server, pki) + f'password_file = "{bad}"\n')
        gw.add(alert())
        wait_for(lambda: gw.runtime.uplink == "down", what="uplink down")
        assert "refused the login" in (gw.runtime.last_error or "")
        wait_for(lambda: gw.counts()["queued"] == 1, what="the row back in the queue")


@pytest.mark.parametrize("reply", ["421 4.3.2 shutting down", "451 4.3.0 try again later"])
def test_temporary_reply_then_success_delivers_once(
    pki: Pki, make_gateway: Callable[..., Gateway], reply: str
) -> None:
    with SmtpServer(pki, "starttls") as server:
        server.script.data_replies = [reply]
        gw = make_gateway(smtp_conf(server, pki))
        a = alert()
        gw.add(a)
        (got,) = server.wait_for(1, timeout=20)
        assert got.message_id.startswith(f"<{a.id}.")
        wait_for(lambda: gw.counts()["sent"] == 1, what="sent")
        time.sleep(0.5)
        assert len(server.received) == 1
        found = gw.writer.call(lambda ob: ob_mod.find(ob.conn, a.id)).result(5)
        assert found is not None and found[1][0]["attempts"] == 2


def test_permanent_reply_dead_letters_with_the_reply(
    pki: Pki, make_gateway: Callable[..., Gateway]
) -> None:
    with SmtpServer(pki, "starttls") as server:
        server.script.data_replies = ["554 5.7.1 message content rejected"]
        gw = make_gateway(smtp_conf(server, pki))
        a, b = alert("first"), alert("second")
        gw.add(a, b)
        (got,) = server.wait_for(1)
        assert got.message_id.startswith(f"<{b.id}.")
        wait_for(lambda: gw.counts()["dead"] == 1, what="dead letter")
        dead = gw.writer.call(lambda ob: ob_mod.listing(ob.conn, ["dead"])).result(5)
        assert dead[0]["id"] == a.id and dead[0]["last_error"].startswith("554 5.7.1")


def test_one_of_two_recipients_rejected(pki: Pki, make_gateway: Callable[..., Gateway]) -> None:
    routes = '[[route]]\nname = "ops"\nmatch = "#"\nto = ["ops@example.com", "gone@example.com"]\n'
    with SmtpServer(pki, "starttls") as server:
        server.script.rcpt_replies["gone@example.com"] = "550 5.1.1 no such user"
        gw = make_gateway(smtp_conf(server, pki), routes=routes)
        a = alert()
        gw.add(a)
        (got,) = server.wait_for(1)
        assert got.recipients == ["ops@example.com"]
        wait_for(lambda: gw.counts()["sent"] == 1, what="sent")
        found = gw.writer.call(lambda ob: ob_mod.find(ob.conn, a.id)).result(5)
        assert found is not None
        assert "gone@example.com: 550 5.1.1 no such user" in found[1][0]["last_error"]


def test_temporary_rejection_of_one_recipient_retries_only_that_one(
    pki: Pki, make_gateway: Callable[..., Gateway]
) -> None:
    routes = '[[route]]\nname = "ops"\nmatch = "#"\nto = ["ops@example.com", "busy@example.com"]\n'
    with SmtpServer(pki, "starttls") as server:
        server.script.rcpt_replies["busy@example.com"] = "450 4.2.1 mailbox busy"
        gw = make_gateway(smtp_conf(server, pki), routes=routes)
        gw.add(alert())
        (first,) = server.wait_for(1)
        assert first.recipients == ["ops@example.com"]
        del server.script.rcpt_replies["busy@example.com"]
        _, second = server.wait_for(2, timeout=20)
        assert second.recipients == ["busy@example.com"]  # the accepted one is not resent to
        assert second.message_id == first.message_id
        wait_for(lambda: gw.counts()["sent"] == 1, what="sent")


def test_connection_dropped_mid_data_is_retried(
    pki: Pki, make_gateway: Callable[..., Gateway]
) -> None:
    with SmtpServer(pki, "starttls") as server:
        server.script.drop_in_data = 1
        gw = make_gateway(smtp_conf(server, pki))
        gw.add(alert())
        server.wait_for(1, timeout=20)
        wait_for(lambda: gw.counts()["sent"] == 1, what="sent")
        assert len(server.received) == 1 and server.connections >= 2


def test_stalled_server_times_out_and_is_retried(
    pki: Pki, make_gateway: Callable[..., Gateway]
) -> None:
    with SmtpServer(pki, "starttls") as server:
        server.script.stall_in_data = 6.0  # longer than smtp.timeout = 3s
        gw = make_gateway(smtp_conf(server, pki))
        gw.add(alert())
        wait_for(lambda: "session failed" in (gw.runtime.last_error or ""), what="timeout")
        wait_for(lambda: gw.counts()["sent"] == 1, what="sent")
        # Had the stalled server kept the first copy after the client gave up, the retry
        # would be a duplicate with the same Message-ID (at-least-once, identifiable).
        got = server.wait_for(1)
        assert len({r.message_id for r in got}) == 1


def test_outage_during_backlog(pki: Pki, make_gateway: Callable[..., Gateway]) -> None:
    server = SmtpServer(pki, "starttls")  # not started: the smarthost is down
    gw = make_gateway(
        smtp_conf(server, pki, extra="batch = 100\n").replace(
            'probe_max = "2s"', 'probe_max = "60s"'
        )
    )
    severities = [Severity.INFO, Severity.WARNING, Severity.CRITICAL]
    alerts = [alert(f"a{i}", severities[i % 3]) for i in range(1000)]
    gw.add(*alerts)
    t0 = time.monotonic()
    wait_for(lambda: gw.runtime.uplink == "down", what="uplink down")
    time.sleep(12)
    attempts = gw.runtime.attempts["uplink_down"]
    # Probes at about 0, 2, 6 s (then 14, 30, 62): 5 in the first minute, never 10.
    assert attempts <= 4, f"{attempts} connection attempts in {time.monotonic() - t0:.0f} s"
    wait_for(lambda: gw.counts()["queued"] == 1000, what="all 1000 back in the queue")
    server.start()
    try:
        gw.flush()  # an operator's `mailgw flush`; without it the next probe comes within 16 s
        got = server.wait_for(1000, timeout=60)
        wait_for(lambda: gw.counts()["sent"] == 1000, what="all sent")
        ids = [r.message["X-Mailgw-Severity"] for r in got]
        # Priority order: every critical before any warning before any info.
        assert ids == sorted(ids, key=lambda s: {"critical": 0, "warning": 1, "info": 2}[s])
        assert len({r.message_id for r in got}) == 1000
        assert server.connections <= 3  # drained over a reused session
    finally:
        server.stop()


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


def test_expired_messages_are_dead_lettered(pki: Pki, make_gateway: Callable[..., Gateway]) -> None:
    with SmtpServer(pki, "starttls") as server:
        gw = make_gateway(smtp_conf(server, pki))
        old = normalize(
            b"ancient",
            Draft("alerts/x", "mqtt", "s"),
            Stamp(wall=time.time() - 6 * 86400, boottime=0.0, boot_id="old", synced=True),
        )
        gw.add(old, alert("fresh"))
        (got,) = server.wait_for(1)
        assert "fresh" in got.message["Subject"]
        wait_for(lambda: gw.counts()["dead"] == 1, what="expired")
        dead = gw.writer.call(lambda ob: ob_mod.listing(ob.conn, ["dead"])).result(5)
        assert dead[0]["last_error"].startswith("expired")


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


# --- the pure policy --------------------------------------------------------------


def test_retry_delay_doubles_with_jitter_and_cap() -> None:
    rng = random.Random(1)
    delays = [retry_delay(n, 300, 3600, rng) for n in range(1, 8)]
    assert 240 <= delays[0] <= 300 and 480 <= delays[1] <= 600
    assert all(d <= 3600 for d in delays) and delays[-1] >= 2880


def test_probe_delay_is_capped() -> None:
    rng = random.Random(1)
    t, first_minute = 0.0, 1
    while (t := t + probe_delay(first_minute, 60, rng)) < 60:
        first_minute += 1
    assert first_minute < 10
    assert [round(probe_delay(n, 60, rng) / 2) * 2 for n in (1, 2, 3)] == [2, 4, 8]
    assert probe_delay(20, 60, rng) <= 60


def test_judgements() -> None:
    r = ("a@x", "b@x")
    assert judge_refusals({}, r, True).state == "sent"
    v = judge_refusals({"b@x": (550, "no")}, r, True)
    assert v.state == "sent" and "b@x: 550 no" in (v.error or "")
    v = judge_refusals({"b@x": (452, "full")}, r, True)
    assert v.state == "queued" and v.rcpts == ("b@x",)
    assert judge_exception(aiosmtplib.SMTPDataError(451, "later"), r).state == "queued"
    assert judge_exception(aiosmtplib.SMTPDataError(552, "too big"), r).state == "dead"
    assert judge_exception(aiosmtplib.SMTPSenderRefused(553, "bad", "s"), r).state == "dead"
    all_refused = aiosmtplib.SMTPRecipientsRefused(
        [
            aiosmtplib.SMTPRecipientRefused(550, "no", "a@x"),
            aiosmtplib.SMTPRecipientRefused(550, "no", "b@x"),
        ]
    )
    assert judge_exception(all_refused, r).state == "dead"
    v = judge_exception(aiosmtplib.SMTPServerDisconnected("gone"), r)
    assert v.state == "queued" and v.reconnect
    assert judge_exception(aiosmtplib.SMTPDataError(421, "bye"), r).reconnect


def test_smtp_test_command(pki: Pki, tmp_path: Path, password_file: Path) -> None:
    from tests.conftest import run_cli

    with SmtpServer(pki, "starttls") as server:
        cfg = tmp_path / "gw.toml"
        cfg.write_text(
            f'[gateway]\nstate_dir = "{tmp_path}/s"\n[smtp]\n'
            + smtp_conf(server, pki)
            + f'password_file = "{password_file}"\n'
        )
        r = run_cli("smtp-test", "-c", str(cfg), "--send-to", "me@example.com")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "TLSv1.3" in r.stdout or "TLSv1.2" in r.stdout
        assert "certificate verified" in r.stdout and "logged in as gw@example.com" in r.stdout
        (got,) = server.wait_for(1)
        assert got.recipients == ["me@example.com"]
    with SmtpServer(pki, "starttls", offer_starttls=False) as server:
        cfg.write_text(
            f'[gateway]\nstate_dir = "{tmp_path}/s"\n[smtp]\n'
            + smtp_conf(server, pki)
            + f'password_file = "{password_file}"\n'
        )
        r = run_cli("smtp-test", "-c", str(cfg))
        assert r.returncode == 1 and "does not offer STARTTLS" in r.stdout
    r = run_cli("smtp-test", "-c", str(cfg))  # the server is gone now
    assert r.returncode == 1 and "[FAIL] connect" in r.stdout


def test_a_stalled_session_does_not_penalise_the_alert_in_flight(
    pki: Pki, make_gateway: Callable[..., Gateway]
) -> None:
    """The session stalls on the first alert: it goes out with the rest, not minutes later."""
    with SmtpServer(pki, "starttls") as server:
        server.script.stall_in_data = 5.0  # longer than smtp.timeout = 3s
        conf = smtp_conf(server, pki).replace('min_backoff = "1s"', 'min_backoff = "10m"')
        gw = make_gateway(conf.replace('max_backoff = "2s"', 'max_backoff = "1h"'))
        gw.add(*[alert(f"a{i}") for i in range(10)])
        t0 = time.monotonic()
        wait_for(lambda: gw.counts()["sent"] == 10, timeout=30, what="all 10 sent")
        assert time.monotonic() - t0 < 15  # the stalled one was not deferred for 10 min
        assert gw.runtime.attempts["session_broke"] == 1
        assert gw.runtime.attempts["deferred"] == 0


def test_a_message_that_breaks_sessions_while_others_go_is_deferred(
    pki: Pki, make_gateway: Callable[..., Gateway]
) -> None:
    """A poison message: after POISON_BREAKS broken sessions with others sent between."""
    from gateway import relay as relay_mod

    with SmtpServer(pki, "starttls") as server:
        gw = make_gateway(smtp_conf(server, pki, extra="batch = 1\n"))
        poison = alert("poison")
        server.script.drop_when = b"poison"
        gw.add(poison, *[alert(f"ok{i}") for i in range(6)])
        wait_for(lambda: len(server.received) == 6, timeout=40, what="the others sent")
        wait_for(lambda: gw.runtime.attempts["deferred"] >= 1, timeout=30, what="poison deferred")
        assert gw.runtime.attempts["session_broke"] == relay_mod.POISON_BREAKS - 1


def test_the_uplinks_return_is_noticed_by_tcp_probes(
    pki: Pki, make_gateway: Callable[..., Gateway], monkeypatch: pytest.MonkeyPatch
) -> None:
    """probe_max 60 s: after an outage, sessions would wait up to a minute; a cheap TCP
    probe (every second here, TCP_PROBE_EVERY in production) notices the return."""
    from gateway import relay as relay_mod

    monkeypatch.setattr(relay_mod, "TCP_PROBE_EVERY", 1.0)
    server = SmtpServer(pki, "starttls")  # down at first: connections refused
    gw = make_gateway(smtp_conf(server, pki).replace('probe_max = "2s"', 'probe_max = "60s"'))
    gw.add(*[alert(f"a{i}") for i in range(5)])
    wait_for(lambda: gw.runtime.uplink == "down", what="uplink down")
    time.sleep(8)  # exponential session probes would be at 2, 6, 14 s
    server.start()
    try:
        t0 = time.monotonic()
        server.wait_for(5, timeout=30)
        assert time.monotonic() - t0 < 3.5
        assert gw.relay.tcp_probes >= 5
        assert gw.runtime.attempts["uplink_down"] == 1  # one full session attempt only
    finally:
        server.stop()
