"""Silence and self-alerts with real parts: the daemon as a process (kill -9 included), a
real Mosquitto, a real smarthost (stopped for an outage), a pty for the serial line.
Windows are a few seconds long rather than an injected clock: the daemon checks every
second."""

from __future__ import annotations

import time
from pathlib import Path

from gateway.lab import Mosquitto, SmtpServer
from tests.parts import (
    DaemonProcess,
    Pki,
    Pty,
    Publisher,
    daemon_config,
    stored_alerts,
    wait_for,
)

SILENCE = """
[[silence]]
name = "cold"
match = "alerts/cold-room-3/#"
expect_every = "3s"
"""


def subjects(smtp: SmtpServer, text: str) -> list[str]:
    return [str(r.message["Subject"]) for r in smtp.received if text in str(r.message["Subject"])]


def test_a_sensor_that_stops_is_reported_once_across_a_kill_9_and_again_when_it_returns(
    tmp_path: Path, pki: Pki, broker: Mosquitto
) -> None:
    with SmtpServer(pki, "starttls") as smtp:
        cfg = daemon_config(tmp_path, pki, smtp.port, broker.port)
        cfg.write_text(cfg.read_text() + SILENCE)
        gw = DaemonProcess(cfg, tmp_path / "daemon.log").start()
        gw.wait_ready(("mqtt",))
        pub = Publisher(broker.port)
        pub.publish("alerts/cold-room-3/temp1", "4.2 C")
        wait_for(lambda: subjects(smtp, "4.2 C"), what="the reading mailed")
        wait_for(lambda: subjects(smtp, "temp1: nothing for"), what="the silence mail")
        [silent] = subjects(smtp, "temp1: nothing for")
        assert "[warning] temp1: alerts/cold-room-3/temp1: nothing for" in silent
        wait_for(
            lambda: "silent alerts/cold-room-3/temp1" in ((gw.status() or {}).get("watch") or {}),
            what="the silence in status",
        )

        gw.kill9()
        gw.start()
        gw.wait_ready(("mqtt",))
        # A second sensor that speaks once and stops: its silence mail proves the watch
        # ran past temp1's window after the restart (no sleep as synchronisation).
        pub.publish("alerts/cold-room-3/temp2", "5.0 C")
        wait_for(lambda: subjects(smtp, "temp2: nothing for"), what="temp2's silence")
        assert len(subjects(smtp, "temp1: nothing for")) == 1  # not re-fired after kill -9

        assert gw.terminate() == 0  # and an orderly restart
        gw.start()
        gw.wait_ready(("mqtt",))
        pub.publish("alerts/cold-room-3/temp3", "5.1 C")
        wait_for(lambda: subjects(smtp, "temp3: nothing for"), what="temp3's silence")
        assert len(subjects(smtp, "temp1: nothing for")) == 1
        assert len(subjects(smtp, "temp2: nothing for")) == 1

        pub.publish("alerts/cold-room-3/temp1", "4.3 C")
        wait_for(lambda: subjects(smtp, "temp1: reporting again"), what="the again mail")
        assert gw.terminate() == 0
        pub.close()
        assert len(subjects(smtp, "temp1: reporting again")) == 1
        assert len(subjects(smtp, "temp1: nothing for")) == 1
        topics = {(t, m.split(":")[0]) for t, m, _ in stored_alerts(tmp_path / "state/outbox.db")}
        assert (
            "gateway/gw-d/silence/alerts/cold-room-3/temp1",
            "alerts/cold-room-3/temp1",
        ) in topics


def test_time_the_gateway_was_down_is_said_not_taken_for_silence(
    tmp_path: Path, pki: Pki, broker: Mosquitto
) -> None:
    with SmtpServer(pki, "starttls") as smtp:
        cfg = daemon_config(tmp_path, pki, smtp.port, broker.port)
        cfg.write_text(cfg.read_text() + SILENCE.replace("3s", "4s"))
        gw = DaemonProcess(cfg, tmp_path / "daemon.log").start()
        gw.wait_ready(("mqtt",))
        pub = Publisher(broker.port)
        pub.publish("alerts/cold-room-3/temp1", "4.2 C")
        wait_for(lambda: subjects(smtp, "4.2 C"), what="the reading mailed")
        assert gw.terminate() == 0
        time.sleep(3)  # the gateway is down: this is the downtime under test, not a sync
        gw.start()
        gw.wait_ready(("mqtt",))
        wait_for(lambda: subjects(smtp, "nothing for"), what="the silence mail")
        assert gw.terminate() == 0
        pub.close()
        [mail] = [r for r in smtp.received if "nothing for" in str(r.message["Subject"])]
        assert "of which the gateway itself was down" in str(mail.message["Subject"])


def test_serial_unplugged_broker_stopped_outbox_filling_through_a_smarthost_outage(
    tmp_path: Path, pki: Pki, broker: Mosquitto, pty: Pty
) -> None:
    with SmtpServer(pki, "starttls") as smtp:
        smtp.stop()  # the uplink is down throughout: everything waits in the outbox
        cfg = daemon_config(tmp_path, pki, smtp.port, broker.port)
        cfg.write_text(
            cfg.read_text()
            + f'[[serial]]\nport = "{pty.link}"\nname = "cold"\n'
            + "[outbox]\nmax_messages = 20\n"
            + '[selfalerts]\nenabled = true\nserial_after = "1s"\nmqtt_after = "1s"\n'
            'clear_after = "1s"\nclock_after = "7d"\n'
        )
        db = tmp_path / "state/outbox.db"

        def stored(topic: str, word: str) -> bool:
            return any(t == topic and word in m for t, m, _ in stored_alerts(db))

        gw = DaemonProcess(cfg, tmp_path / "daemon.log").start()
        gw.wait_ready(("mqtt", "serial:cold"))
        pty.unplug()
        wait_for(lambda: stored("gateway/gw-d/serial/cold", "serial port cold"), what="raised")
        pty.plug()
        wait_for(lambda: stored("gateway/gw-d/serial/cold", "resolved"), what="serial resolved")
        broker.stop()
        wait_for(lambda: stored("gateway/gw-d/mqtt", "MQTT broker"), what="mqtt raised")
        broker.start()
        wait_for(lambda: stored("gateway/gw-d/mqtt", "resolved"), what="mqtt resolved")
        pub = Publisher(broker.port)
        for i in range(14):  # 4 self-alerts + 14 readings: past 80 % of 20
            pub.publish("alerts/truck/door", f"door open {i}")
        wait_for(lambda: stored("gateway/gw-d/outbox", "the outbox holds"), what="outbox raised")
        smtp.start()  # the uplink returns: the queue drains, the outbox clears
        wait_for(
            lambda: stored("gateway/gw-d/outbox", "resolved"), what="outbox resolved", timeout=60
        )
        wait_for(
            lambda: len([s for s in subjects(smtp, "") if "resolved" in s]) == 3,
            what="three resolutions mailed",
            timeout=60,
        )
        assert gw.terminate() == 0
        pub.close()
        mailed = subjects(smtp, "")
        for cond in ("serial port cold", "MQTT broker", "the outbox holds"):
            raised = [s for s in mailed if cond in s and "resolved" not in s]
            resolved = [s for s in mailed if cond in s and "resolved" in s]
            assert (len(raised), len(resolved)) == (1, 1), (cond, mailed)
