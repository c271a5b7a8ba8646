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


WATCHED = """
[[silence]]
name = "cold"
match = "alerts/cold/#"
expect_every = "5s"
[selfalerts]
enabled = true
mqtt_after = "3s"
clear_after = "1s"
clock_after = "7d"
"""


def test_a_broker_outage_is_said_once_by_the_broker_not_by_every_sensor(
    tmp_path: Path, pki: Pki, broker: Mosquitto
) -> None:
    with SmtpServer(pki, "starttls") as smtp:
        cfg = daemon_config(tmp_path, pki, smtp.port, broker.port)
        cfg.write_text(cfg.read_text() + WATCHED)
        db = tmp_path / "state/outbox.db"
        gw = DaemonProcess(cfg, tmp_path / "daemon.log").start()
        gw.wait_ready(("mqtt",))
        pub = Publisher(broker.port)
        for s in ("s1", "s2", "s3"):
            pub.publish(f"alerts/cold/{s}", f"{s} 4.2 C")
        wait_for(
            lambda: len([m for _, m, _ in stored_alerts(db) if "4.2 C" in m]) == 3,
            what="three readings stored",
        )
        pub.close()
        broker.stop()
        stopped = time.monotonic()
        wait_for(lambda: subjects(smtp, "MQTT broker"), what="the broker's self-alert")
        # The outage under test: well past expect_every (5 s), as in the field.
        time.sleep(max(0.0, 12 - (time.monotonic() - stopped)))
        outage = time.monotonic() - stopped
        broker.start()
        wait_for(
            lambda: ((gw.status() or {}).get("sources") or {}).get("mqtt") == "connected",
            what="the daemon back on the broker",
        )
        pub = Publisher(broker.port)
        deadline = time.monotonic() + 30
        # s1 and s2 keep reporting after the return; s3 stays silent.
        while not subjects(smtp, "s3: nothing for") and time.monotonic() < deadline:
            pub.publish("alerts/cold/s1", "s1 4.3 C")
            pub.publish("alerts/cold/s2", "s2 4.3 C")
            wait_for(lambda: pub.settled, what="the readings acknowledged")
            time.sleep(0.5)  # the sensors' own period, not a synchronisation
        wait_for(lambda: subjects(smtp, "resolved after"), what="the broker's resolve")
        assert gw.terminate() == 0
        pub.close()
        mailed = subjects(smtp, "")
        silences = [s for s in mailed if "nothing for" in s]
        assert [s for s in silences if "s3" in s] and len(silences) == 1, mailed
        assert not [s for s in mailed if "reporting again" in s], mailed
        [raised] = [s for s in mailed if "MQTT broker" in s and "resolved" not in s]
        assert f"127.0.0.1:{broker.port}" in raised
        assert "came and went" not in raised  # the start's "not connected" is no flap
        [resolved] = [s for s in mailed if "resolved after" in s]
        lasted = int(resolved.split("resolved after ")[1].split(" s")[0])
        # From when the broker went away, not from the raise (mqtt_after later).
        assert outage - 1 <= lasted <= outage + 10, (outage, resolved)


def test_a_sensor_first_seen_just_before_a_kill_9_is_watched_and_the_downtime_is_exact(
    tmp_path: Path, pki: Pki, broker: Mosquitto
) -> None:
    with SmtpServer(pki, "starttls") as smtp:
        cfg = daemon_config(tmp_path, pki, smtp.port, broker.port)
        cfg.write_text(cfg.read_text() + SILENCE.replace("3s", "4s"))
        db = tmp_path / "state/outbox.db"
        gw = DaemonProcess(cfg, tmp_path / "daemon.log").start()
        gw.wait_ready(("mqtt",))
        pub = Publisher(broker.port)
        pub.publish("alerts/cold-room-3/temp1", "4.2 C")
        wait_for(lambda: any("4.2 C" in m for _, m, _ in stored_alerts(db)), what="stored")
        gw.kill9()
        killed = time.monotonic()
        time.sleep(2)  # the gateway is down: this is the downtime under test, not a sync
        gw.start()
        down = time.monotonic() - killed
        gw.wait_ready(("mqtt",))
        wait_for(lambda: subjects(smtp, "temp1: nothing for"), what="the silence mail")
        assert gw.terminate() == 0
        pub.close()
        [mail] = subjects(smtp, "temp1: nothing for")
        said = int(mail.split("gateway itself was down ")[1].split(" s")[0])
        assert down - 1 <= said <= down + 2, (down, mail)


def test_a_self_alert_that_cannot_be_stored_is_logged_once_not_every_second(
    tmp_path: Path, pki: Pki, broker: Mosquitto
) -> None:
    import sqlite3

    with SmtpServer(pki, "starttls") as smtp:
        cfg = daemon_config(tmp_path, pki, smtp.port, broker.port)
        cfg.write_text(
            cfg.read_text()
            + '[selfalerts]\nenabled = true\nmqtt_after = "1s"\nclear_after = "0s"\n'
            'clock_after = "7d"\nstore_after = "7d"\n'
        )
        gw = DaemonProcess(cfg, tmp_path / "daemon.log").start()
        gw.wait_ready(("mqtt",))
        conn = sqlite3.connect(tmp_path / "state/outbox.db")
        # Every watch row (the alert's own transaction) fails: the alert is not stored.
        conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON watch BEGIN SELECT RAISE(ABORT, 'io'); END"
        )
        conn.commit()
        broker.stop()

        def failures() -> int:
            return gw.log_text().count("could not store the alert for self-alert mqtt")

        wait_for(lambda: failures() >= 1, what="the first failure logged")
        first = time.monotonic()
        # The daemon retries every second meanwhile; eight seconds of it, then count.
        time.sleep(8)
        held = time.monotonic() - first
        conn.execute("DROP TRIGGER refuse")
        conn.commit()
        conn.close()
        wait_for(lambda: "stored after all" in gw.log_text(), what="stored at last")
        assert gw.terminate() == 0
        text = gw.log_text()
        assert held >= 8
        assert text.count("self-alert: the MQTT broker") == 1, text[-3000:]
        assert failures() == 1 and "still cannot store" not in text, text[-3000:]
        assert text.count("could not store 1 alerts in the outbox") == 1, text[-3000:]
        assert len(subjects(smtp, "MQTT broker")) <= 1
