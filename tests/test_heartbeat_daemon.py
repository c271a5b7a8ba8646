"""The heartbeat through the real daemon process: a due summary is mailed to the
smarthost, once, and not again after a kill -9 (its time rides in the outbox with it).

`heartbeat.every` is at least an hour, so the test makes the period short the way a
device's history would: the outbox says the last heartbeat was an hour and a few
seconds ago."""

from __future__ import annotations

import json
import time
from pathlib import Path

from gateway.lab import SmtpServer
from gateway.outbox import Outbox
from tests.parts import DaemonProcess, Pki, daemon_config, stored_alerts, wait_for

HB = '[heartbeat]\nevery = "1h"\nroute = "ops"\n'


def beats(smtp: SmtpServer) -> list[str]:
    return [
        str(r.message["Subject"]) for r in smtp.received if "heartbeat" in str(r.message["Subject"])
    ]


def test_the_daemon_mails_a_due_heartbeat_once_across_a_kill_9(tmp_path: Path, pki: Pki) -> None:
    ob = Outbox(tmp_path / "state" / "outbox.db")
    ob.conn.execute(
        "INSERT INTO watch (kind, key, state) VALUES ('heartbeat', 'heartbeat', ?)",
        (json.dumps({"last": time.time() - 3600 - 2, "offline": 0.0, "down": 0.0}),),
    )
    ob.close()
    with SmtpServer(pki, "starttls") as smtp:
        cfg = daemon_config(tmp_path, pki, smtp.port)
        cfg.write_text(cfg.read_text() + HB)
        gw = DaemonProcess(cfg, tmp_path / "daemon.log").start()
        wait_for(lambda: beats(smtp), what="the heartbeat mailed")
        [subject] = beats(smtp)
        assert "heartbeat over 1 h" in subject, subject
        [mail] = [r for r in smtp.received if "heartbeat" in str(r.message["Subject"])]
        assert mail.recipients == ["ops@example.com"]
        assert "queue" in mail.message.get_content()
        gw.kill9()
        gw.start()
        gw.wait_ready()
        time.sleep(3)  # an absence: the watch runs each second, three chances to fire again
        assert gw.terminate() == 0
        hb = [t for t, _, _ in stored_alerts(tmp_path / "state/outbox.db") if "heartbeat" in t]
        assert hb == ["gateway/gw-d/heartbeat"]
        assert len(beats(smtp)) == 1
