"""Alerts keep their room in the outbox, with real parts: the daemon as a process, a real
Mosquitto, a real smarthost (stopped for an outage), `sendmail` run as unprivileged
users. Local mail and readings no route takes fill only their own shares."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from gateway.lab import Mosquitto, SmtpServer
from tests.conftest import run_cli
from tests.parts import DaemonProcess, Pki, Publisher, daemon_config, stored_alerts, wait_for
from tests.test_sendmail_daemon import config as sendmail_config
from tests.test_sendmail_daemon import pytestmark as needs_setpriv
from tests.test_sendmail_daemon import sendmail, spool

__all__ = ["spool"]  # the maildrop fixture


def rejected(gw: DaemonProcess, reason: str) -> int:
    return int(((gw.status() or {}).get("rejected") or {}).get(reason, 0))


def room(cfg: Path) -> dict[str, Any]:
    r = run_cli("status", "--json", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout)["room"])


def subjects(smtp: SmtpServer, text: str) -> list[str]:
    return [str(r.message["Subject"]) for r in smtp.received if text in str(r.message["Subject"])]


def local_mails(smtp: SmtpServer) -> int:
    return len(subjects(smtp, "cron run"))


def mail(n: int) -> bytes:
    return f"From: root\nTo: root\nSubject: cron run {n}\n\nran {n}\n".encode()


@needs_setpriv
def test_a_local_flood_leaves_room_for_a_critical_alert(
    tmp_path: Path, pki: Pki, broker: Mosquitto, spool: Path
) -> None:
    with SmtpServer(pki, "starttls") as smtp:
        smtp.stop()  # the smarthost is away: everything waits in the outbox
        cfg = sendmail_config(tmp_path, pki, smtp.port, spool)
        # max_messages 50: local mail 5 (10 %), one user 1 of them (25 %).
        cfg.write_text(
            cfg.read_text().replace(
                "[sendmail]",
                f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\n[sendmail]\nrate = "off"',
            )
            + "[outbox]\nmax_messages = 50\n[selfalerts]\nenabled = false\n"
        )
        gw = DaemonProcess(cfg, tmp_path / "daemon.log").start()
        gw.wait_ready(("mqtt",))
        for n in range(60):
            r = sendmail(spool, ["-i", "root"], mail(n))
            assert r.returncode == 0, r.stderr
        wait_for(lambda: rejected(gw, "local_user_share_full") == 59, what="59 refusals counted")
        r = room(cfg)
        assert r["local"] == {"used": 1, "limit": 5, "per_user_limit": 1}
        assert r["alerts"]["limit"] == 49

        pub = Publisher(broker.port)
        pub.publish("alerts/cold-room-3/temp", '{"message": "9.5 C", "severity": "critical"}')
        wait_for(lambda: pub.acked, what="the critical alert's PUBACK")
        db = tmp_path / "state/outbox.db"
        wait_for(
            lambda: any("9.5 C" in m for _, m, _ in stored_alerts(db)),
            what="the critical alert stored (acknowledged to the broker after the commit)",
        )
        status = gw.status() or {}
        assert not status.get("outbox_full")

        smtp.start()
        wait_for(lambda: subjects(smtp, "9.5 C"), what="the critical alert mailed")
        # The waiting files get their turn as room returns, and are not counted again.
        wait_for(lambda: local_mails(smtp) >= 3, what="local mail flowing again", timeout=60)
        assert rejected(gw, "local_user_share_full") == 59
        assert gw.log_text().count("local mail waits in") == 1
        assert gw.terminate() == 0
        pub.close()


@needs_setpriv
def test_one_users_flood_does_not_refuse_another_users_first_mail(
    tmp_path: Path, pki: Pki, spool: Path
) -> None:
    with SmtpServer(pki, "starttls") as smtp:
        smtp.stop()
        cfg = sendmail_config(tmp_path, pki, smtp.port, spool)
        cfg.write_text(cfg.read_text() + "[outbox]\nmax_messages = 50\n")
        gw = DaemonProcess(cfg, tmp_path / "daemon.log").start()
        gw.wait_ready()
        for n in range(10):
            assert sendmail(spool, ["-i", "root"], mail(n), user="nobody").returncode == 0
        wait_for(lambda: rejected(gw, "local_user_share_full") == 9, what="nobody's refusals")
        assert sendmail(spool, ["-i", "root"], mail(100), user="daemon").returncode == 0

        def uids() -> list[int]:
            import sqlite3

            db = tmp_path / "state/outbox.db"
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
            try:
                return sorted(u for (u,) in conn.execute("SELECT uid FROM raw_message"))
            finally:
                conn.close()

        wait_for(lambda: len(uids()) == 2, what="the other user's mail stored")
        assert uids() == [1, 65534]  # daemon, nobody
        assert rejected(gw, "local_user_share_full") == 9
        assert rejected(gw, "local_share_full") == 0
        assert gw.terminate() == 0


WATCHED = """
[[silence]]
name = "cold"
match = "alerts/cold/#"
expect_every = "3s"
"""


def readings_config(
    tmp_path: Path, pki: Pki, smtp: SmtpServer, broker: Mosquitto, extra: str
) -> Path:
    # Alerts from `warning` up are mailed; info readings are only watched.
    cfg = daemon_config(tmp_path, pki, smtp.port, broker.port)
    cfg.write_text(cfg.read_text() + 'min_severity = "warning"\n' + WATCHED + extra)
    return cfg


def info(sensor: str, n: int) -> str:
    return json.dumps({"message": f"{sensor} reading {n}", "severity": "info"})


def test_watched_readings_never_fill_the_outbox_alerts_and_self_alerts_are_stored(
    tmp_path: Path, pki: Pki, broker: Mosquitto
) -> None:
    with SmtpServer(pki, "starttls") as smtp:
        smtp.stop()
        cfg = readings_config(
            tmp_path,
            pki,
            smtp,
            broker,
            "[outbox]\nmax_messages = 20\n"
            '[selfalerts]\nenabled = true\noutbox_percent = 10\nclock_after = "7d"\n',
        )
        gw = DaemonProcess(cfg, tmp_path / "daemon.log").start()
        gw.wait_ready(("mqtt",))
        pub = Publisher(broker.port)
        for n in range(5):
            for s in range(5):
                pub.publish(f"alerts/cold/t{s}", info(f"t{s}", n))
        wait_for(lambda: len(pub.acked) == 25, what="25 readings acknowledged")
        pub.publish("alerts/cold/door", '{"message": "door open 1", "severity": "critical"}')
        pub.publish("alerts/cold/door", '{"message": "door open 2", "severity": "critical"}')
        wait_for(lambda: len(pub.acked) == 27, what="the broker's PUBACKs")
        db = tmp_path / "state/outbox.db"
        wait_for(
            lambda: sum("door open" in m for _, m, _ in stored_alerts(db)) == 2,
            what="the critical alerts stored",
        )
        wait_for(
            lambda: any(t == "gateway/gw-d/outbox" for t, _, _ in stored_alerts(db)),
            what="the outbox self-alert stored",
        )
        wait_for(lambda: rejected(gw, "unrouted_share_full") == 23, what="23 readings not kept")
        assert room(cfg)["unrouted"]["used"] == 2
        assert not (gw.status() or {}).get("outbox_full")

        smtp.start()
        wait_for(lambda: len(subjects(smtp, "door open")) == 2, what="the critical alerts mailed")
        wait_for(lambda: subjects(smtp, "the outbox holds"), what="the self-alert mailed")
        # The readings fed the silence watch though only 2 were kept: each sensor that
        # stopped is reported.
        wait_for(lambda: len(subjects(smtp, "nothing for")) >= 5, what="5 silence mails")
        assert gw.log_text().count("keeps no more unrouted readings") == 1
        assert gw.terminate() == 0
        pub.close()


def test_months_of_readings_keep_the_outbox_at_a_steady_size(
    tmp_path: Path, pki: Pki, broker: Mosquitto
) -> None:
    # Ten sensors reporting, scaled: a round every 0.25 s, readings kept 1 s (four
    # rounds, as a day is 288 five-minute rounds), 60 rounds (a day of retention to 60
    # days is 1 to 60 here: 240 rounds would be it; 60 show the plateau well enough).
    with SmtpServer(pki, "starttls") as smtp:
        cfg = readings_config(
            tmp_path,
            pki,
            smtp,
            broker,
            '[outbox]\nmax_messages = 100\nunrouted_percent = 60\nkeep_unrouted = "1s"\n'
            "[selfalerts]\nenabled = false\n",
        )
        gw = DaemonProcess(cfg, tmp_path / "daemon.log").start()
        gw.wait_ready(("mqtt",))
        pub = Publisher(broker.port)
        sizes = []
        for n in range(60):
            for s in range(10):
                pub.publish(f"alerts/cold/s{s}", info(f"s{s}", n))
            wait_for(lambda n=n: len(pub.acked) == 10 * (n + 1), what=f"round {n} acked")
            if n % 10 == 9:
                sizes.append(room(cfg)["unrouted"]["used"])
            time.sleep(0.25)  # the sensors' interval (a rate, not a wait for an outcome)
        # 600 readings, 6 times the bound: none refused, none dropped unkept, and the kept
        # readings stay within their share.
        assert max(sizes) <= 60, sizes
        assert rejected(gw, "unrouted_share_full") == 0
        pub.publish("alerts/cold/door", '{"message": "door open", "severity": "critical"}')
        wait_for(lambda: subjects(smtp, "door open"), what="a critical alert mailed")
        assert not (gw.status() or {}).get("outbox_full")
        assert gw.terminate() == 0
        pub.close()


@needs_setpriv
def test_a_users_old_unrouted_mail_no_longer_refuses_their_new_mail(
    tmp_path: Path, pki: Pki, spool: Path
) -> None:
    """Mail nobody could route is never claimed, so nothing expired it: it held its
    user's share forever and every later mail of that user was refused."""
    from gateway.outbox import Outbox, raw
    from tests.parts import alert

    db = tmp_path / "state" / "outbox.db"
    db.parent.mkdir(parents=True)
    ob = Outbox(db)
    msg = raw.RawMessage("old", 65534, "", (), b"To: someone\nSubject: old\n\nx\n")
    assert raw.store(ob, alert("old", topic="sendmail/u"), msg, raw.RawPlan())
    with ob.transaction() as c:  # unrouted since before max_age
        c.execute("UPDATE delivery SET updated_at = updated_at - 120")
    ob.close()
    with SmtpServer(pki, "starttls") as smtp:
        cfg = sendmail_config(tmp_path, pki, smtp.port, spool)
        # max_messages 50: local mail 5, one user 1: the old mail fills nobody's share.
        cfg.write_text(cfg.read_text() + '[outbox]\nmax_messages = 50\nmax_age = "1m"\n')
        gw = DaemonProcess(cfg, tmp_path / "daemon.log").start()
        try:
            gw.wait_ready()
            wait_for(lambda: room(cfg)["local"]["used"] == 0, what="the old mail's room freed")
            assert "dead or unrouted for outbox.max_age were deleted" in gw.log_text()
            assert sendmail(spool, ["-i", "root"], mail(1), user="nobody").returncode == 0
            wait_for(lambda: local_mails(smtp) == 1, what="nobody's new mail delivered")
            assert rejected(gw, "local_user_share_full") == 0
        finally:
            if gw.alive:
                gw.terminate()
