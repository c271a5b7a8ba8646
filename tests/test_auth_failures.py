"""A refused login (gateway/smtp.py, gateway/relay.py, gateway/uplink.py): one AUTH per
session, then nothing before smtp.auth_retry, so a wrong password cannot walk the
account into a lockout; the queue kept whole; `auth_failed` in status and metrics; and
delivery as soon as the password is fixed and the operator flushes or reloads."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway import metrics, status
from gateway.uplink import Uplink
from tests.parts import Gateway, Pki, SmtpServer, alert, smtp_conf, wait_for


def logins_within(window: float, auth_retry: float, probe_max: float = 60.0) -> int:
    """Session attempts (each one AUTH) in `window` s when every login is refused."""
    up = Uplink(probe_max, random.Random(3))
    now, logins = 0.0, 0
    while now < window:
        logins += 1
        up.hold(auth_retry, now)
        now = up.probe_at
    return logins


def test_a_refused_login_is_retried_once_per_auth_retry() -> None:
    # The default, 15 min: one AUTH in the first ten minutes, at most 2 in any 30 minutes
    # (AD's common lockout: 5 in 30 min) and 10 in well over two hours (M365: 10).
    assert logins_within(600, 900) == 1
    assert logins_within(1800, 900) == 2
    assert logins_within(2 * 3600, 900) <= 8


def test_while_held_network_nudges_do_not_open_sessions_but_flush_does() -> None:
    up = Uplink(60, random.Random(1))
    delay = up.hold(900, now=100.0)
    assert 900 <= delay <= 945 and up.holding(100.0 + 899)
    assert not up.nudge()  # a link change does not fix a password
    assert not up.tcp_probe_due(200.0)
    up.flush()
    assert not up.holding(101.0)
    up.up(101.0)
    assert not up.held


def _bad_password(path: Path) -> Path:
    path.write_text("wrong\n")
    path.chmod(0o600)
    return path


@pytest.mark.parametrize("retry", ["flush", "reload"])
def test_wrong_password_holds_the_queue_then_delivers_after_the_fix(
    pki: Pki, make_gateway: Callable[..., Gateway], tmp_path: Path, retry: str
) -> None:
    """auth_retry scaled down to 2 s (15 min in production): over 7 s, at most 4 AUTHs,
    one per session, where every mechanism was tried every probe_max before."""
    pw = _bad_password(tmp_path / "pw-file")
    with SmtpServer(pki, "starttls") as server:  # offers CRAM-MD5, PLAIN and LOGIN
        gw = make_gateway(smtp_conf(server, pki) + f'password_file = "{pw}"\nauth_retry = "2s"\n')
        gw.add(*[alert(f"a{i}") for i in range(5)])
        wait_for(lambda: gw.runtime.uplink == "auth_failed", what="auth_failed")
        t0 = time.monotonic()
        time.sleep(7)
        # One AUTH per session (no second mechanism after a refused one), one session
        # per auth_retry.
        assert set(server.auth_attempts) == {"CRAM-MD5"}
        assert len(server.auth_attempts) <= 2 + int((time.monotonic() - t0) / 2)
        counts = gw.counts()
        assert counts["queued"] == 5 and counts["dead"] == 0 and server.received == []
        assert gw.runtime.attempts["auth_failed"] == len(server.auth_attempts)
        assert gw.runtime.attempts["deferred"] == 0  # no message was charged

        snap = gw.runtime.snapshot()
        report = status.report(gw.config.outbox_path, tmp_path / "none.json", live=snap)
        assert report["uplink"] == "auth_failed"
        text = status.render(report)
        assert "uplink     auth_failed, next try in" in text
        assert "refused the login for gw@example.com" in text and "wrong" not in text
        prom = metrics.render(report)
        assert 'mailgw_relay_held{reason="auth_failed"} 1.0' in prom
        assert "mailgw_uplink_up 0.0" in prom

        pw.write_text("s3cret\n")  # the operator fixes the password
        before = len(server.auth_attempts)
        if retry == "flush":
            gw.flush()
        else:
            gw._loop.call_soon_threadsafe(gw.relay.reload, gw.config, gw.router)
        server.wait_for(5, timeout=10)
        wait_for(lambda: gw.counts()["sent"] == 5, what="all sent")
        assert len(server.auth_attempts) == before + 1
        assert gw.runtime.uplink == "up" and gw.runtime.relay_hold is None


def test_a_mechanism_the_server_only_advertises_does_not_count_as_a_failure(
    pki: Pki, make_gateway: Callable[..., Gateway]
) -> None:
    """504 to AUTH (RFC 4954: mechanism not supported) moves on to the next mechanism."""
    with SmtpServer(pki, "starttls") as server:
        server.broken_mechanisms = ("CRAM-MD5",)
        gw = make_gateway(smtp_conf(server, pki))
        gw.add(alert())
        server.wait_for(1)
        assert server.auth_attempts[:2] == ["CRAM-MD5", "PLAIN"]


def test_the_daemon_shows_auth_failed_and_a_flush_delivers_after_the_fix(
    tmp_path: Path, pki: Pki
) -> None:
    """The whole path: the daemon's status file, `mailgw status --json`, `mailgw flush`."""
    import json

    from tests.conftest import run_cli
    from tests.parts import DaemonProcess, daemon_config

    with SmtpServer(pki, "starttls") as smtp:
        cfg = daemon_config(tmp_path, pki, smtp.port)
        # No self-alerts: the queue is to hold just the one alert this test sends.
        cfg.write_text(
            cfg.read_text().replace(
                "[[route]]", 'auth_retry = "1h"\n[selfalerts]\nenabled = false\n[[route]]', 1
            )
        )
        pw = _bad_password(tmp_path / "pw")  # the file daemon_config wrote, now wrong
        gw = DaemonProcess(cfg, tmp_path / "daemon.log").start()
        try:
            gw.wait_ready()
            run_cli("send", "-c", str(cfg), "--sensor", "s", "--severity", "info", "waiting")
            wait_for(lambda: (gw.status() or {}).get("uplink") == "auth_failed", what="held")
            r = run_cli("status", "--json", "-c", str(cfg))
            report = json.loads(r.stdout)
            assert report["uplink"] == "auth_failed" and report["queued"] == 1
            assert "refused the login" in report["relay_hold"] and report["dead"] == 0
            assert "refused the login" in gw.log_text()
            assert len(smtp.auth_attempts) == 1  # the next one would be in an hour

            pw.write_text("s3cret\n")
            assert run_cli("flush", "-c", str(cfg)).returncode == 0
            smtp.wait_for(1, timeout=10)
            wait_for(lambda: (gw.status() or {}).get("uplink") == "up", what="up again")
            assert len(smtp.auth_attempts) == 2
        finally:
            gw.terminate()
