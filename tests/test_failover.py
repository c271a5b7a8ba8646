"""Failover between smarthosts ([smtp] then [[smtp.fallback]]) with real servers: a
primary that is down, then back (mail returns to it); a refused login moves to the
fallback; a refusal of one message does not."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from gateway import outbox as ob_mod
from tests.conftest import run_cli
from tests.parts import (
    DaemonProcess,
    Gateway,
    Pki,
    SmtpServer,
    alert,
    daemon_config,
    smtp_conf,
    wait_for,
    write_password,
)


def _conf(primary: SmtpServer, fallback: SmtpServer, pki: Pki, pw: Path) -> str:
    return smtp_conf(
        primary,
        pki,
        extra=(
            f'password_file = "{pw}"\n'
            "[[smtp.fallback]]\n"
            f'host = "127.0.0.1"\nport = {fallback.port}\nca_file = "{pki.ca_file}"\n'
            f'username = "gw@example.com"\npassword_file = "{pw}"\n'
        ),
    )


def _attempts(gw: Gateway, alert_id: str) -> int:
    found = gw.writer.call(lambda ob: ob_mod.find(ob.conn, alert_id)).result(5)
    assert found is not None
    return int(found[1][0]["attempts"])


def test_primary_down_then_back(
    pki: Pki, make_gateway: Callable[..., Gateway], password_file: Path
) -> None:
    primary = SmtpServer(pki, "starttls")  # not started: its port refuses connections
    with SmtpServer(pki, "starttls") as fallback:
        gw = make_gateway(_conf(primary, fallback, pki, password_file))
        first = alert("while the primary is down")
        gw.add(first)
        (got,) = fallback.wait_for(1, timeout=20)
        assert got.message_id.startswith(f"<{first.id}.")
        wait_for(lambda: gw.counts()["sent"] == 1, what="sent via the fallback")
        assert _attempts(gw, first.id) == 1  # the primary's failure charged nothing
        primary_line, fallback_line = gw.runtime.hosts
        assert primary_line["state"] == "down" and not primary_line["active"]
        assert fallback_line["state"] == "up" and fallback_line["active"]
        assert gw.runtime.uplink == "up"  # the relay as a whole still sends
        with primary:
            # The primary is probed on its own schedule (a TCP connect every 9 s while
            # it refuses connections; then the next mail opens a session to it).
            wait_for(lambda: gw.runtime.hosts[0]["active"], timeout=30, what="primary")
            second = alert("after the primary came back")
            gw.add(second)
            (back,) = primary.wait_for(1, timeout=20)
            assert gw.runtime.hosts[0]["state"] == "up"
            assert back.message_id.startswith(f"<{second.id}.")
            assert len(fallback.received) == 1
            assert gw.runtime.hosts[0]["active"] and not gw.runtime.hosts[1]["active"]


def test_a_refused_login_moves_to_the_fallback(
    pki: Pki, make_gateway: Callable[..., Gateway], password_file: Path
) -> None:
    with (
        SmtpServer(pki, "starttls", users={"gw@example.com": "another"}) as primary,
        SmtpServer(pki, "starttls") as fallback,
    ):
        # The primary's account has a password file of its own (a wrong one): another
        # account than the fallback's, so its refusal does not hold the fallback.
        wrong = write_password(password_file.parent / "primary-pw")
        conf = _conf(primary, fallback, pki, password_file)
        gw = make_gateway(
            conf.replace(f'password_file = "{password_file}"', f'password_file = "{wrong}"', 1)
        )
        a = alert()
        gw.add(a)
        fallback.wait_for(1, timeout=20)
        wait_for(lambda: gw.counts()["sent"] == 1, what="sent via the fallback")
        assert _attempts(gw, a.id) == 1
        assert gw.runtime.hosts[0]["state"] == "auth_failed"
        assert "refused the login" in (gw.runtime.hosts[0]["last_error"] or "")
        assert primary.received == []


def test_a_refused_message_is_not_a_reason_to_fail_over(
    pki: Pki, make_gateway: Callable[..., Gateway], password_file: Path
) -> None:
    with SmtpServer(pki, "starttls") as primary, SmtpServer(pki, "starttls") as fallback:
        primary.script.data_replies = ["554 5.7.1 message content rejected"]
        gw = make_gateway(_conf(primary, fallback, pki, password_file))
        a, b = alert("refused"), alert("accepted")
        gw.add(a, b)
        primary.wait_for(1, timeout=20)
        wait_for(lambda: gw.counts()["dead"] == 1, what="dead letter")
        wait_for(lambda: gw.counts()["sent"] == 1, what="sent")
        assert fallback.auth_attempts == [] and fallback.received == []
        assert gw.runtime.hosts[0]["state"] == "up" and gw.runtime.hosts[0]["active"]


def test_every_host_down_backs_off_as_a_whole_then_uses_the_first_back(
    pki: Pki, make_gateway: Callable[..., Gateway], password_file: Path
) -> None:
    primary = SmtpServer(pki, "starttls")
    fallback = SmtpServer(pki, "starttls")
    gw = make_gateway(_conf(primary, fallback, pki, password_file))
    a = alert()
    gw.add(a)
    wait_for(lambda: [h["state"] for h in gw.runtime.hosts] == ["down", "down"], what="both down")
    assert gw.runtime.uplink == "down" and gw.runtime.next_probe_at is not None
    with fallback:
        fallback.wait_for(1, timeout=30)
        wait_for(lambda: gw.counts()["sent"] == 1, what="sent")
        assert _attempts(gw, a.id) == 1


def test_the_fallback_uses_its_own_sessions(
    pki: Pki, make_gateway: Callable[..., Gateway], password_file: Path
) -> None:
    primary = SmtpServer(pki, "starttls")
    with SmtpServer(pki, "starttls") as fallback:
        fallback.script.data_delay = 0.05
        conf = _conf(primary, fallback, pki, password_file) + "sessions = 3\n"  # the fallback's
        gw = make_gateway(conf)
        gw.add(*(alert(f"reading {i}") for i in range(30)))
        fallback.wait_for(30, timeout=30)
        wait_for(lambda: gw.counts()["sent"] == 30, what="all sent")
        assert fallback.peak_sessions >= 2
        assert gw.config.smtp is not None and gw.config.smtp.sessions == 1
        assert gw.runtime.hosts[1]["sent"] == 30 and gw.runtime.hosts[0]["state"] == "down"


def test_the_daemon_fails_over_and_status_shows_each_host(tmp_path: Path, pki: Pki) -> None:
    primary = SmtpServer(pki, "starttls")  # down
    with SmtpServer(pki, "starttls") as fallback:
        cfg = daemon_config(tmp_path, pki, primary.port)
        text = cfg.read_text()
        table = (
            f'[[smtp.fallback]]\nhost = "127.0.0.1"\nport = {fallback.port}\n'
            f'ca_file = "{pki.ca_file}"\nusername = "gw@example.com"\n'
            f'password_file = "{tmp_path / "pw"}"\nsessions = 2\n'
        )
        cfg.write_text(text.replace("[[route]]", table + "[[route]]", 1))
        assert run_cli("check-config", "-c", str(cfg)).returncode == 0
        gw = DaemonProcess(cfg, tmp_path / "daemon.log").start()
        try:
            gw.wait_ready()
            r = run_cli("send", "-c", str(cfg), "--sensor", "s", "--severity", "critical", "hi")
            assert r.returncode == 0, r.stderr
            (got,) = fallback.wait_for(1, timeout=30)
            assert "hi" in got.message["Subject"]

            def shown() -> str:
                return run_cli("status", "-c", str(cfg)).stdout

            wait_for(lambda: "fallback 1): up" in shown(), what="status")
            out = shown()
            assert f"smarthost  127.0.0.1:{primary.port} (primary): down" in out, out
            assert f"smarthost *127.0.0.1:{fallback.port} (fallback 1): up" in out, out
            assert "uplink     up" in out
        finally:
            gw.terminate()


def test_a_primary_that_greets_421_backs_off_and_the_fallback_keeps_its_session(
    pki: Pki, make_gateway: Callable[..., Gateway], password_file: Path
) -> None:
    """The primary accepts TCP but turns every session away at the greeting: it is
    reached (sessions back off to probe_max, no TCP probes that always succeed), and
    each failed retry of it leaves the fallback's session open and sending."""
    with SmtpServer(pki, "starttls") as primary, SmtpServer(pki, "starttls") as fallback:
        primary.max_sessions = 0  # "421 4.7.0 Error: too many connections" to every one
        gw = make_gateway(_conf(primary, fallback, pki, password_file))
        sent = 0
        deadline = time.monotonic() + 9
        while time.monotonic() < deadline:
            gw.add(alert(f"reading {sent}"))
            sent += 1
            time.sleep(0.3)
        fallback.wait_for(sent, timeout=20)
        assert primary.turned_away >= 2  # the primary was tried again meanwhile
        assert len(fallback.auth_attempts) == 1  # and the fallback's one session was kept
        assert gw.runtime.hosts[0]["state"] == "down"


def test_a_password_shared_with_the_fallback_holds_both_after_one_refusal(
    pki: Pki, make_gateway: Callable[..., Gateway], password_file: Path
) -> None:
    """Same username, same password_file: one account. One refused login holds every
    smarthost it logs in to, so the account sees one failure per auth_retry, not one
    per smarthost."""
    users = {"gw@example.com": "another"}
    with (
        SmtpServer(pki, "starttls", users=users) as primary,
        SmtpServer(pki, "starttls", users=users) as fallback,
    ):
        conf = _conf(primary, fallback, pki, password_file)
        gw = make_gateway(conf.replace("[[smtp.fallback]]", 'auth_retry = "1h"\n[[smtp.fallback]]'))
        gw.add(alert())
        wait_for(
            lambda: [h["state"] for h in gw.runtime.hosts] == ["auth_failed", "auth_failed"],
            what="both held",
        )
        time.sleep(1)
        assert len(primary.auth_attempts) + len(fallback.auth_attempts) == 1
        assert "the same account" in (gw.runtime.hosts[1]["last_error"] or "")
        assert gw.counts()["queued"] == 1
