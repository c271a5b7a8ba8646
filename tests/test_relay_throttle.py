""" "Slow down" replies against a real smarthost (aiosmtpd): a 421 or 451 4.7.x pauses
the whole relay and charges no message; the queue is delivered once the server
recovers. Which reply is a throttle is in test_replies.py; the backoff in test_uplink.py.
throttle_max is scaled down to 1 s by smtp_conf (10 min by default)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway import metrics, status
from gateway import outbox as ob_mod
from tests.parts import Gateway, Pki, SmtpServer, alert, smtp_conf, wait_for


@pytest.mark.parametrize(
    "reply",
    [
        "421 4.7.0 Too many connections, slow down",
        "451 4.7.500 Server busy. Please try again later",
    ],
)
def test_a_throttle_then_recovery_charges_no_message(
    pki: Pki, make_gateway: Callable[..., Gateway], reply: str
) -> None:
    with SmtpServer(pki, "starttls") as server:
        server.script.data_replies = [reply, reply]
        gw = make_gateway(smtp_conf(server, pki))
        alerts = [alert(f"a{i}") for i in range(10)]
        gw.add(*alerts)
        got = server.wait_for(10, timeout=30)
        wait_for(lambda: gw.counts()["sent"] == 10, what="all sent")
        assert len({r.message_id for r in got}) == 10
        counts = gw.counts()
        assert counts["dead"] == 0 and counts["queued"] == 0
        assert gw.runtime.attempts["throttled"] == 2
        assert gw.runtime.attempts["deferred"] == 0
        for a in alerts:  # each charged for its one accepted attempt, never the throttles
            found = gw.writer.call(lambda ob, i=a.id: ob_mod.find(ob.conn, i)).result(5)
            assert found is not None and found[1][0]["attempts"] == 1


def test_a_throttle_that_goes_on_pauses_instead_of_hammering(
    pki: Pki, make_gateway: Callable[..., Gateway], tmp_path: Path
) -> None:
    with SmtpServer(pki, "starttls") as server:
        server.script.mail_reply = "421 4.7.0 Too many connections, try again later"
        gw = make_gateway(smtp_conf(server, pki))
        gw.add(*[alert(f"a{i}") for i in range(20)])
        wait_for(lambda: gw.runtime.uplink == "throttled", what="throttled")
        assert "slow down" in (gw.runtime.relay_hold or "")
        snap = gw.runtime.snapshot()
        report = status.report(gw.config.outbox_path, tmp_path / "none.json", live=snap)
        text = status.render(report)
        assert "uplink     throttled, next try in" in text
        assert "HELD       the smarthost asked the gateway to slow down" in text
        assert 'mailgw_relay_held{reason="throttled"} 1.0' in metrics.render(report)
        time.sleep(3)
        # One message asks per pause (1 s here): a handful, never the queue.
        assert 2 <= server.script.refused <= 5
        assert gw.counts()["queued"] == 20 and gw.counts()["dead"] == 0
        server.script.mail_reply = None
        server.wait_for(20, timeout=20)
        wait_for(lambda: gw.counts()["sent"] == 20, what="all sent")
        assert gw.runtime.attempts["deferred"] == 0
        assert gw.runtime.uplink == "up"
