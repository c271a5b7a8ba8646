"""smtp.rate_limit against a real smarthost (aiosmtpd): the arrival times respect the
cap, and a backlog drains in priority order. The bucket itself is in test_pace.py."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from gateway import metrics, status
from gateway.alert import Severity
from tests.parts import Gateway, Pki, SmtpServer, alert, smtp_conf, wait_for


def test_a_backlog_drains_at_the_rate_limit_criticals_first(
    pki: Pki, make_gateway: Callable[..., Gateway], tmp_path: Path
) -> None:
    """ "30/min" scaled to "5/s": 30 alerts, 6 of them critical, queued at once."""
    with SmtpServer(pki, "starttls") as server:
        gw = make_gateway(smtp_conf(server, pki, extra='rate_limit = "5/s"\n'))
        alerts = [
            alert(
                f"crit {i}" if i % 5 == 4 else f"warn {i}",
                Severity.CRITICAL if i % 5 == 4 else Severity.WARNING,
            )
            for i in range(30)
        ]
        gw.add(*alerts)
        got = server.wait_for(30, timeout=30)
        wait_for(lambda: gw.counts()["sent"] == 30, what="all sent")
        at = [r.at for r in got]
        # Any window of t seconds holds at most 1 + 5·t arrivals (a burst of one token);
        # one mail of slack: on a busy machine one reply can come late and the next on time.
        for i in range(len(at)):
            for j in range(i, len(at)):
                assert j - i + 1 <= 1 + 5 * (at[j] - at[i]) + 1, (i, j, at[j] - at[i])
        assert at[-1] - at[0] >= 29 / 5 - 0.5  # the cap held, not just the first mails
        subjects = [str(r.message["Subject"]) for r in got]
        assert all("crit" in s for s in subjects[:6]), subjects[:8]
        assert gw.runtime.pace["rate_limit"] == "5/s"
        assert gw.runtime.pace["waits"] >= 1
        # Through the status file, as `mailgw status` and the metrics read it.
        gw.runtime.write(tmp_path / "status.json")
        report = status.report(gw.config.outbox_path, tmp_path / "status.json")
        assert "pace       5/s (smtp.rate_limit), next send " in status.render(report)
        assert "mailgw_relay_paced_total " in metrics.render(report)


def test_a_critical_alert_that_arrives_during_the_backlog_is_next(
    pki: Pki, make_gateway: Callable[..., Gateway]
) -> None:
    with SmtpServer(pki, "starttls") as server:
        gw = make_gateway(smtp_conf(server, pki, extra='rate_limit = "4/s"\n'))
        gw.add(*[alert(f"warn {i}") for i in range(20)])
        server.wait_for(3, timeout=10)
        t0 = time.monotonic()
        gw.add(alert("boiler on fire", Severity.CRITICAL))
        wait_for(
            lambda: any("boiler" in str(r.message["Subject"]) for r in server.received),
            what="the critical alert",
        )
        assert time.monotonic() - t0 < 1.5  # the next token or so, not behind 17 others
        subjects = [str(r.message["Subject"]) for r in server.received]
        assert len(subjects) < 12


def test_no_rate_limit_is_todays_behaviour(pki: Pki, make_gateway: Callable[..., Gateway]) -> None:
    with SmtpServer(pki, "starttls") as server:
        gw = make_gateway(smtp_conf(server, pki))
        gw.add(*[alert(f"a{i}") for i in range(30)])
        got = server.wait_for(30, timeout=20)
        assert got[-1].at - got[0].at < 29 / 5  # far faster than the capped test above
        assert gw.runtime.pace == {}
