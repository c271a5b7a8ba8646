"""Parallel sessions (smtp.sessions) against a real SMTP server: every mail once, the
server's session limit respected without counting its refusals as failures, priority
order kept, smtp.rate_limit the cap of all sessions together."""

from __future__ import annotations

import time
from collections.abc import Callable

from gateway.alert import Severity
from tests.parts import Gateway, Pki, SmtpServer, alert, smtp_conf, wait_for


def _max_attempts(gw: Gateway) -> int:
    row = gw.writer.call(
        lambda ob: ob.conn.execute("SELECT max(attempts) FROM delivery").fetchone()
    ).result(10)
    return int(row[0])


def test_four_sessions_send_every_mail_once_in_parallel(
    pki: Pki, make_gateway: Callable[..., Gateway]
) -> None:
    with SmtpServer(pki, "starttls") as server:
        server.script.data_delay = 0.05  # so that sessions overlap
        gw = make_gateway(smtp_conf(server, pki, extra="sessions = 4\nbatch = 8\n"))
        alerts = [alert(f"reading {i}") for i in range(60)]
        gw.add(*alerts)
        got = server.wait_for(60)
        wait_for(lambda: gw.counts()["sent"] == 60, what="all sent")
        ids = sorted(r.message_id.split(".")[0].lstrip("<") for r in got)
        assert ids == sorted(a.id for a in alerts)  # each once
        assert server.peak_sessions >= 3
        assert _max_attempts(gw) == 1
        assert gw.runtime.hosts[0]["sent"] == 60


def test_a_server_that_allows_two_sessions_is_not_down(
    pki: Pki, make_gateway: Callable[..., Gateway]
) -> None:
    with SmtpServer(pki, "starttls") as server:
        server.max_sessions = 2
        server.script.data_delay = 0.05
        gw = make_gateway(smtp_conf(server, pki, extra="sessions = 4\nbatch = 8\n"))
        gw.add(*(alert(f"reading {i}") for i in range(60)))
        server.wait_for(60)
        wait_for(lambda: gw.counts()["sent"] == 60, what="all sent")
        assert server.turned_away >= 1  # the relay did try a third session
        assert server.peak_sessions == 2
        # Neither an uplink failure nor a charged message: the host just has 2 sessions.
        assert gw.runtime.attempts["uplink_down"] == 0
        assert gw.runtime.uplink == "up"
        assert _max_attempts(gw) == 1
        assert gw.runtime.hosts[0]["limit"] == 2
        assert len(server.received) == 60


def test_a_critical_alert_overtakes_the_backlog(
    pki: Pki, make_gateway: Callable[..., Gateway]
) -> None:
    with SmtpServer(pki, "starttls") as server:
        server.script.data_delay = 0.02
        gw = make_gateway(smtp_conf(server, pki, extra="sessions = 4\nbatch = 8\n"))
        gw.add(*(alert(f"routine {i}") for i in range(200)))
        server.wait_for(20)
        urgent = alert("fire in the cold room", Severity.CRITICAL)
        gw.add(urgent)
        committed = len(server.received)  # mails that arrived before it was in the outbox
        got = server.wait_for(201, timeout=60)
        position = next(i for i, r in enumerate(got) if r.message_id.startswith(f"<{urgent.id}."))
        # Behind at most what the four sessions had claimed then (2 rows each, batch / 4),
        # and the one each was sending.
        assert position <= committed + 4 * 2 + 4, (position, committed)


def test_the_rate_limit_caps_all_sessions_together(
    pki: Pki, make_gateway: Callable[..., Gateway]
) -> None:
    with SmtpServer(pki, "starttls") as server:
        stamps: list[float] = []
        server.on_receive = lambda _: stamps.append(time.monotonic())
        gw = make_gateway(smtp_conf(server, pki, extra='sessions = 4\nrate_limit = "10/s"\n'))
        gw.add(*(alert(f"reading {i}") for i in range(16)))
        server.wait_for(16)
        # One token to start with, then one every 0.1 s, whichever session sends.
        assert stamps[-1] - stamps[0] >= 15 * 0.1 * 0.9
        wait_for(lambda: gw.counts()["sent"] == 16, what="all sent")
        assert _max_attempts(gw) == 1


def test_a_server_that_allows_one_session_is_not_hammered(
    pki: Pki, make_gateway: Callable[..., Gateway]
) -> None:
    with SmtpServer(pki, "starttls") as server:
        server.max_sessions = 1
        server.script.data_delay = 0.02
        gw = make_gateway(smtp_conf(server, pki, extra="sessions = 4\nbatch = 8\n"))
        gw.add(*(alert(f"reading {i}") for i in range(100)))
        server.wait_for(100, timeout=60)
        wait_for(lambda: gw.counts()["sent"] == 100, what="all sent")
        assert server.peak_sessions == 1
        # Each refusal shrinks the limit or pauses that worker: a few, not hundreds.
        assert 1 <= server.turned_away <= 8, server.turned_away
        assert gw.runtime.attempts["uplink_down"] == 0 and _max_attempts(gw) == 1


def test_a_slow_down_reply_pauses_every_session_uncharged(
    pki: Pki, make_gateway: Callable[..., Gateway]
) -> None:
    with SmtpServer(pki, "starttls") as server:
        server.script.data_delay = 0.05
        gw = make_gateway(smtp_conf(server, pki, extra="sessions = 3\nbatch = 6\n"))
        gw.add(*(alert(f"reading {i}") for i in range(40)))
        server.wait_for(3)
        server.script.data_replies = ["451 4.7.500 Server busy. Please try again later"]
        wait_for(lambda: gw.runtime.attempts["throttled"] == 1, what="throttled")
        got = server.wait_for(40, timeout=30)  # the rest, after the 1 s pause
        wait_for(lambda: gw.counts()["sent"] == 40, what="all sent")
        assert len({r.message_id for r in got}) == 40
        assert _max_attempts(gw) == 1  # the throttled mail was not charged
        assert gw.runtime.attempts["uplink_down"] == 0
