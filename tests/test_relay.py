"""The relay worker against a real SMTP server (aiosmtpd) on loopback with a throwaway CA:
what it does with each reply, a dropped or stalled session, an outage, an expired alert.
Reply classification alone is in test_replies.py, the schedules in test_uplink.py."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from gateway import outbox as ob_mod
from gateway import uplink
from gateway.alert import Draft, Severity, normalize
from gateway.clock import Stamp
from tests.parts import Gateway, Pki, SmtpServer, alert, smtp_conf, wait_for


# A 4xx about the message (a "slow down" 421 or 451 4.7.x is test_relay_throttle.py's).
@pytest.mark.parametrize("reply", ["451 4.3.0 Temporary local problem", "450 4.2.1 busy"])
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
    with SmtpServer(pki, "starttls") as server:
        gw = make_gateway(smtp_conf(server, pki, extra="batch = 1\n"))
        poison = alert("poison")
        server.script.drop_when = b"poison"
        gw.add(poison, *[alert(f"ok{i}") for i in range(6)])
        wait_for(lambda: len(server.received) == 6, timeout=40, what="the others sent")
        wait_for(lambda: gw.runtime.attempts["deferred"] >= 1, timeout=30, what="poison deferred")
        assert gw.runtime.attempts["session_broke"] == uplink.POISON_BREAKS - 1


def test_the_uplinks_return_is_noticed_by_tcp_probes(
    pki: Pki, make_gateway: Callable[..., Gateway], monkeypatch: pytest.MonkeyPatch
) -> None:
    """probe_max 60 s: after an outage, sessions would wait up to a minute; a cheap TCP
    probe (every second here, TCP_PROBE_EVERY in production) notices the return."""
    monkeypatch.setattr(uplink, "TCP_PROBE_EVERY", 1.0)
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
        assert gw.relay.uplink.tcp_probes >= 5
        assert gw.runtime.attempts["uplink_down"] == 1  # one full session attempt only
    finally:
        server.stop()
