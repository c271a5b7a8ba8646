"""Receipts with real parts: the daemon as a process (kill -9 included), a real
Mosquitto, a real smarthost. A receipt is published once the smarthost's 250 is
recorded, never before it; it survives a kill -9 between the 250 and its publication;
dead letters and digests get theirs."""

from __future__ import annotations

import json
import random
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.lab import Mosquitto, SmtpServer
from tests.parts import DaemonProcess, Pki, daemon_config, stored_alerts, wait_for


@dataclass
class Got:
    at: float
    topic: str
    body: dict[str, Any]
    correlation: bytes | None


class Client5:
    """An MQTT 5 publisher that asks for receipts and reads them on receipts/#."""

    def __init__(self, port: int) -> None:
        self.got: list[Got] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"app-{random.random()}",
            protocol=mqtt.MQTTv5,
        )
        self.client.on_connect = lambda c, *a: c.subscribe("receipts/#", qos=1)
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        wait_for(self.client.is_connected, what="the app connected")

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        corr = getattr(msg.properties, "CorrelationData", None)
        with self._lock:
            self.got.append(Got(time.monotonic(), msg.topic, json.loads(msg.payload), corr))

    def ask(self, topic: str, text: str, correlation: bytes, reply: str) -> None:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.CorrelationData = correlation
        props.ResponseTopic = reply
        info = self.client.publish(topic, text, qos=1, properties=props)
        info.wait_for_publish(10)

    def publish5(self, topic: str, text: str, correlation: bytes | None, reply: str | None) -> None:
        """A PUBLISH with either property, or both, or neither."""
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if correlation is not None:
            props.CorrelationData = correlation
        if reply is not None:
            props.ResponseTopic = reply
        self.client.publish(topic, text, qos=1, properties=props).wait_for_publish(10)

    def publish(self, topic: str, payload: str) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def receipts(self) -> list[Got]:
        with self._lock:
            return list(self.got)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def config(tmp: Path, pki: Pki, smtp: SmtpServer, broker: Mosquitto, route: str = "") -> Path:
    cfg = daemon_config(tmp, pki, smtp.port, broker.port)
    text = cfg.read_text().replace("[mqtt]\n", '[mqtt]\nprotocol = "5"\n')
    # A held DATA reply must not time the session out (the daemon would send again).
    cfg.write_text(text.replace('timeout = "1s"', 'timeout = "10s"') + route)
    return cfg


def states(db: Path) -> list[tuple[str, str | None]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT state, outcome FROM receipt ORDER BY alert_seq").fetchall()
    except sqlite3.OperationalError:
        return []  # not created yet
    finally:
        conn.close()


def delivery_states(db: Path) -> list[str]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [r[0] for r in conn.execute("SELECT state FROM delivery")]
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def test_a_receipt_comes_after_the_250_never_before(
    tmp_path: Path, pki: Pki, broker: Mosquitto
) -> None:
    with SmtpServer(pki, "starttls") as smtp:
        smtp.script.stall_in_data = 3.0  # the server sits on the end of DATA
        gw = DaemonProcess(config(tmp_path, pki, smtp, broker), tmp_path / "daemon.log").start()
        gw.wait_ready(("mqtt",))
        app = Client5(broker.port)
        app.ask("alerts/cold/door", "door open 5 min", b"\x00corr-1\xff", "receipts/door/app-1")
        db = tmp_path / "state/outbox.db"
        wait_for(lambda: "sending" in delivery_states(db), what="the mail in DATA")
        while not smtp.received:  # held: the outcome is not recorded, nothing may be said
            assert app.receipts() == []
            assert states(db) == [("waiting", None)]
            time.sleep(0.05)
        wait_for(lambda: app.receipts(), what="the receipt")
        [got] = app.receipts()
        [mail] = smtp.received
        assert got.at > mail.at
        assert got.topic == "receipts/door/app-1" and got.correlation == b"\x00corr-1\xff"
        assert got.body["outcome"] == "sent" and got.body["message_id"] == mail.message_id
        assert got.body["route"] == "ops" and got.body["device_id"] == "gw-d"
        wait_for(lambda: states(db) == [("published", "sent")], what="marked published")
        assert gw.terminate() == 0
        app.close()


def test_a_receipt_due_at_a_kill_9_is_published_by_the_next_run(
    tmp_path: Path, pki: Pki, broker: Mosquitto
) -> None:
    with SmtpServer(pki, "starttls") as smtp:
        smtp.stop()  # the uplink is down: the alert waits in the outbox
        gw = DaemonProcess(config(tmp_path, pki, smtp, broker), tmp_path / "daemon.log").start()
        gw.wait_ready(("mqtt",))
        app = Client5(broker.port)
        app.ask("alerts/cold/door", "door open", b"across-kill", "receipts/door/app-1")
        db = tmp_path / "state/outbox.db"
        wait_for(lambda: states(db) == [("waiting", None)], what="the request stored")
        broker.stop()  # the receipt cannot be published...
        smtp.start()  # ...when the smarthost's 250 comes
        wait_for(lambda: smtp.received, what="the mail")
        wait_for(lambda: states(db) == [("due", "sent")], what="the receipt due")
        gw.kill9()
        broker.start()
        wait_for(app.client.is_connected, what="the app back")
        assert app.receipts() == []
        gw.start()
        gw.wait_ready(("mqtt",))
        wait_for(lambda: app.receipts(), what="the receipt after the restart")
        [got] = app.receipts()
        assert got.correlation == b"across-kill" and got.body["outcome"] == "sent"
        assert got.body["message_id"] == smtp.received[0].message_id
        wait_for(lambda: states(db) == [("published", "sent")], what="marked published")
        assert gw.terminate() == 0
        assert len({r.message_id for r in smtp.received}) == 1
        app.close()


def test_a_dead_letter_gets_a_receipt_with_the_servers_reason(
    tmp_path: Path, pki: Pki, broker: Mosquitto
) -> None:
    with SmtpServer(pki, "starttls") as smtp:
        smtp.script.data_refusal = "550 5.7.1 message content refused"
        gw = DaemonProcess(config(tmp_path, pki, smtp, broker), tmp_path / "daemon.log").start()
        gw.wait_ready(("mqtt",))
        app = Client5(broker.port)
        # Asked with a JSON field: the receipt goes to mqtt.receipt_topic (receipts/{sensor}).
        app.publish("alerts/cold/door", json.dumps({"message": "door", "correlation_id": "j-7"}))
        wait_for(lambda: app.receipts(), what="the dead letter's receipt")
        [got] = app.receipts()
        assert got.topic == "receipts/door" and got.correlation is None
        assert got.body["correlation_id"] == "j-7" and got.body["outcome"] == "dead"
        assert "550 5.7.1 message content refused" in got.body["reason"]
        assert gw.terminate() == 0
        app.close()


def test_a_digest_receipt_names_every_alert_it_carried(
    tmp_path: Path, pki: Pki, broker: Mosquitto
) -> None:
    with SmtpServer(pki, "starttls") as smtp:
        route = 'rate_limit = "1/h"\ndigest_every = "2s"\n'
        gw = DaemonProcess(
            config(tmp_path, pki, smtp, broker, route), tmp_path / "daemon.log"
        ).start()
        gw.wait_ready(("mqtt",))
        app = Client5(broker.port)
        for i in range(4):
            app.publish("alerts/cold/door", json.dumps({"message": f"d{i}", "correlation_id": i}))
        wait_for(lambda: len(app.receipts()) == 4, what="four receipts")
        assert gw.terminate() == 0
        app.close()
        by_corr = {g.body["correlation_id"]: g.body for g in app.receipts()}
        ids = {m: a for _, m, a in stored_alerts(tmp_path / "state/outbox.db")}
        assert by_corr["0"]["kind"] == "mail" and by_corr["0"]["alert_id"] == ids["d0"]
        carried = [ids["d1"], ids["d2"], ids["d3"]]
        [digest] = [r for r in smtp.received if "digest" in str(r.message["Subject"]).lower()]
        for i in ("1", "2", "3"):
            body = by_corr[i]
            assert (body["kind"], body["count"], body["carried"]) == ("digest", 3, carried)
            assert body["message_id"] == digest.message_id
        assert len(smtp.received) == 2


def test_refused_requests_are_counted_and_their_alerts_still_mailed(
    tmp_path: Path, pki: Pki, broker: Mosquitto
) -> None:
    with SmtpServer(pki, "starttls") as smtp:
        gw = DaemonProcess(config(tmp_path, pki, smtp, broker), tmp_path / "daemon.log").start()
        gw.wait_ready(("mqtt",))
        app = Client5(broker.port)
        app.ask("alerts/cold/door", "too long an id", b"x" * 129, "receipts/door/app-1")
        app.ask("alerts/cold/door", "elsewhere", b"id-2", "alerts/cold/unlock")
        app.publish("alerts/cold/temp", json.dumps({"message": "no topic", "correlation_id": ""}))
        app.ask("alerts/cold/door", "fine", b"id-4", "receipts/door/app-1")
        wait_for(lambda: len(smtp.received) == 4, what="all four mailed")
        wait_for(lambda: app.receipts(), what="the one receipt asked for properly")
        wait_for(
            lambda: (
                ((gw.status() or {}).get("rejected") or {})
                == {"receipt_id_too_long": 1, "receipt_bad_topic": 1, "receipt_bad_id": 1}
            ),
            what="three refusals counted",
        )
        assert gw.terminate() == 0
        app.close()
        assert [g.correlation for g in app.receipts()] == [b"id-4"]
        assert "is not under mqtt.receipt_prefix 'receipts/'" in gw.log_text()


def test_a_kill_9_before_the_250_resends_the_mail_then_the_receipt_comes(
    tmp_path: Path, pki: Pki, broker: Mosquitto
) -> None:
    with SmtpServer(pki, "starttls") as smtp:
        smtp.script.stall_in_data = 8.0  # the first end of DATA is held...
        gw = DaemonProcess(config(tmp_path, pki, smtp, broker), tmp_path / "daemon.log").start()
        gw.wait_ready(("mqtt",))
        app = Client5(broker.port)
        app.ask("alerts/cold/door", "door open", b"before-250", "receipts/door/app-1")
        db = tmp_path / "state/outbox.db"
        wait_for(lambda: "sending" in delivery_states(db), what="the mail in DATA")
        gw.kill9()  # ...and the gateway dies before its 250
        assert states(db) == [("waiting", None)]
        gw.start()
        gw.wait_ready(("mqtt",))
        wait_for(lambda: app.receipts(), what="the receipt after the resend")
        # The resent mail's 250 came first (the held one is still held by the server).
        [resent] = smtp.received
        assert all(g.at > resent.at for g in app.receipts())
        assert resent.message_id == app.receipts()[0].body["message_id"]
        assert gw.terminate() == 0
        app.close()


def test_the_documented_mosquitto_pub_commands_get_their_receipts(
    tmp_path: Path, pki: Pki, broker: Mosquitto
) -> None:
    """CONFIG.md's examples, pasted: a JSON correlation_id, and MQTT 5 properties."""
    import shutil
    import subprocess

    pub = shutil.which("mosquitto_pub")
    if pub is None:
        pytest.skip("mosquitto_pub is not installed (apt-get install mosquitto-clients)")
    with SmtpServer(pki, "starttls") as smtp:
        gw = DaemonProcess(config(tmp_path, pki, smtp, broker), tmp_path / "daemon.log").start()
        gw.wait_ready(("mqtt",))
        app = Client5(broker.port)
        # The documented commands with the broker's loopback address and port made
        # explicit: a bare Debian root may have no "localhost" in /etc/hosts.
        port = ("-h", "127.0.0.1", "-p", str(broker.port))
        json_alert = json.dumps(
            {"message": "cold room at 9.5 C", "severity": "critical", "correlation_id": "cr3-0042"}
        )
        subprocess.run(
            [pub, *port, "-q", "1", "-t", "alerts/cold-room-3/temp1", "-m", json_alert], check=True
        )
        subprocess.run(
            [
                pub,
                *port,
                "-V",
                "mqttv5",
                "-q",
                "1",
                "-t",
                "alerts/cold-room-3/temp1",
                "-D",
                "publish",
                "correlation-data",
                "cr3-0043",
                "-D",
                "publish",
                "response-topic",
                "receipts/temp1/panel",
                "-m",
                "cold room at 9.6 C",
            ],
            check=True,
        )
        wait_for(lambda: len(app.receipts()) == 2, what="both receipts")
        assert gw.terminate() == 0
        app.close()
        got = {g.topic: g for g in app.receipts()}
        assert got["receipts/temp1"].body["correlation_id"] == "cr3-0042"
        assert got["receipts/temp1/panel"].correlation == b"cr3-0043"
        assert {g.body["outcome"] for g in got.values()} == {"sent"}


def rejected(gw: DaemonProcess) -> dict[str, int]:
    return dict((gw.status() or {}).get("rejected") or {})


def test_a_forged_receipt_for_another_sensors_topic_is_refused_and_counted(
    tmp_path: Path, pki: Pki, broker: Mosquitto
) -> None:
    """A publisher on alerts/cold/door asks for its receipt to go to temp1's receipt
    topic, with temp1's correlation id: by MQTT 5 properties, and by a JSON payload that
    names itself temp1. temp1's topic gets temp1's own receipt and nothing else."""
    with SmtpServer(pki, "starttls") as smtp:
        gw = DaemonProcess(config(tmp_path, pki, smtp, broker), tmp_path / "daemon.log").start()
        gw.wait_ready(("mqtt",))
        app = Client5(broker.port)
        app.ask("alerts/cold/door", "forged by properties", b"t1-7", "receipts/temp1")
        for i in range(20):  # a flood of the same: counted each, logged once
            app.ask("alerts/cold/door", f"forged again {i}", b"t1-7", "receipts/temp1/panel")
        forged_json = {"message": "forged by json", "sensor": "temp1", "correlation_id": "t1-8"}
        app.publish("alerts/cold/door", json.dumps(forged_json))
        app.ask("alerts/cold/temp1", "the real temp1", b"t1-7", "receipts/temp1/panel")
        wait_for(lambda: len(smtp.received) == 23, what="every alert mailed")
        wait_for(lambda: len(app.receipts()) == 2, what="the two receipts allowed")
        wait_for(lambda: rejected(gw) == {"receipt_topic": 21}, what="the refusals counted")
        assert gw.terminate() == 0
        app.close()
        got = {(g.topic, g.body["correlation_id"]) for g in app.receipts()}
        # The JSON one names itself temp1 but came on door's topic: door's receipt topic.
        assert got == {("receipts/temp1/panel", "t1-7"), ("receipts/door", "t1-8")}
        [real] = [g for g in app.receipts() if g.topic == "receipts/temp1/panel"]
        [real_mail] = [m for m in smtp.received if "the real temp1" in str(m.message["Subject"])]
        assert real.body["message_id"] == real_mail.message_id
        assert gw.log_text().count("is not this sensor's") == 1


def test_requests_past_the_receipt_slots_are_counted_and_their_alerts_stored(
    tmp_path: Path, pki: Pki, broker: Mosquitto
) -> None:
    from gateway.receipts import MAX_KEPT

    with SmtpServer(pki, "starttls") as smtp:
        smtp.stop()  # nothing is mailed: every receipt waits, and the slots fill up
        gw = DaemonProcess(config(tmp_path, pki, smtp, broker), tmp_path / "daemon.log").start()
        gw.wait_ready(("mqtt",))
        app = Client5(broker.port)
        extra = 50
        infos = [
            app.client.publish(
                "alerts/cold/door", json.dumps({"message": f"m{i}", "correlation_id": i}), qos=1
            )
            for i in range(MAX_KEPT + extra)
        ]
        for info in infos:
            info.wait_for_publish(120)
        db = tmp_path / "state/outbox.db"

        def stored() -> int:
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
            try:
                return int(conn.execute("SELECT count(*) FROM delivery").fetchone()[0])
            finally:
                conn.close()

        wait_for(lambda: stored() == MAX_KEPT + extra, timeout=180, what="every alert stored")
        wait_for(lambda: rejected(gw) == {"receipt_slots_full": extra}, what="the refusals counted")
        assert len(states(db)) == MAX_KEPT
        assert "receipt requests were not kept" in gw.log_text()
        assert gw.terminate() == 0
        app.close()


def test_an_mqtt5_request_to_a_311_gateway_is_said_once(
    tmp_path: Path, pki: Pki, broker: Mosquitto
) -> None:
    """The broker drops MQTT 5 properties on their way to a 3.1.1 session: the gateway
    never sees such a request, so it says so at start, once, in words."""
    with SmtpServer(pki, "starttls") as smtp:
        cfg = config(tmp_path, pki, smtp, broker)
        cfg.write_text(cfg.read_text().replace('protocol = "5"\n', 'protocol = "3.1.1"\n'))
        gw = DaemonProcess(cfg, tmp_path / "daemon.log").start()
        gw.wait_ready(("mqtt",))
        app = Client5(broker.port)
        for i in range(3):
            app.ask("alerts/cold/door", f"asked by properties {i}", b"v5", "receipts/door")
        wait_for(lambda: len(smtp.received) == 3, what="the alerts mailed")
        assert gw.terminate() == 0
        app.close()
        assert app.receipts() == []
        assert gw.log_text().count("receipt requests made with MQTT 5 properties") == 1


def test_an_account_refusal_at_mail_from_says_deferred_then_sent(
    tmp_path: Path, pki: Pki, broker: Mosquitto
) -> None:
    """A 550 to MAIL FROM refuses the account, not the message: the relay pauses (for
    15 minutes by default) instead of dead-lettering. The publisher hears `deferred`,
    with the server's words, at once; and `sent` once the operator has fixed it."""
    import signal

    refusal = "550 5.7.60 SMTP; Client does not have permissions to send as this sender"
    with SmtpServer(pki, "starttls") as smtp:
        smtp.script.mail_reply = refusal
        gw = DaemonProcess(config(tmp_path, pki, smtp, broker), tmp_path / "daemon.log").start()
        gw.wait_ready(("mqtt",))
        app = Client5(broker.port)
        app.ask("alerts/cold/door", "door open", b"acct-1", "receipts/door")
        wait_for(lambda: app.receipts(), what="a receipt while the relay is paused")
        [deferred] = app.receipts()
        assert deferred.correlation == b"acct-1"
        assert deferred.body["outcome"] == "deferred" and refusal in deferred.body["reason"]
        assert smtp.received == []
        db = tmp_path / "state/outbox.db"
        wait_for(lambda: states(db) == [("waiting", "deferred")], what="waiting for the end")
        smtp.script.mail_reply = None  # the operator fixed the account, and flushes
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: len(app.receipts()) == 2, what="the final receipt")
        sent = app.receipts()[1]
        [mail] = smtp.received
        assert sent.body["outcome"] == "sent" and sent.body["message_id"] == mail.message_id
        wait_for(lambda: states(db) == [("published", "sent")], what="marked published")
        assert gw.terminate() == 0
        app.close()


def test_topics_that_normalise_to_one_sensor_name_get_no_shared_receipt(
    tmp_path: Path, pki: Pki, broker: Mosquitto
) -> None:
    """alerts/siteB/T\u00fcr, .../T r and .../T\u00a0r would all be the sensor T_r: none of
    them may have a receipt published on receipts/T_r, which is the real T_r's."""
    with SmtpServer(pki, "starttls") as smtp:
        gw = DaemonProcess(config(tmp_path, pki, smtp, broker), tmp_path / "daemon.log").start()
        gw.wait_ready(("mqtt",))
        app = Client5(broker.port)
        app.publish("alerts/siteB/T\u00fcr", json.dumps({"message": "a", "correlation_id": "f-1"}))
        app.publish("alerts/siteB/T r", json.dumps({"message": "b", "correlation_id": "f-2"}))
        app.ask("alerts/siteB/T\u00a0r", "c", b"f-3", "receipts/T_r")
        app.publish("alerts/siteB/T_r", json.dumps({"message": "real", "correlation_id": "real"}))
        wait_for(lambda: len(smtp.received) == 4, what="every alert mailed")
        wait_for(lambda: app.receipts(), what="the real T_r's receipt")
        wait_for(lambda: rejected(gw) == {"receipt_topic": 3}, what="the refusals counted")
        assert gw.terminate() == 0
        app.close()
        assert [(g.topic, g.body["correlation_id"]) for g in app.receipts()] == [
            ("receipts/T_r", "real")
        ]
        assert gw.log_text().count("does not end in a plain sensor name") == 1


def test_with_topic_in_receipt_topic_two_sites_doors_have_their_own(
    tmp_path: Path, pki: Pki, broker: Mosquitto
) -> None:
    """mqtt.receipt_topic = "receipts/{topic}": alerts/siteA/door and alerts/siteB/door
    get receipts on their own topics, and siteB cannot ask for siteA's."""
    with SmtpServer(pki, "starttls") as smtp:
        cfg = config(tmp_path, pki, smtp, broker)
        cfg.write_text(
            cfg.read_text().replace("[mqtt]\n", '[mqtt]\nreceipt_topic = "receipts/{topic}"\n')
        )
        gw = DaemonProcess(cfg, tmp_path / "daemon.log").start()
        gw.wait_ready(("mqtt",))
        app = Client5(broker.port)
        app.publish("alerts/siteA/door", json.dumps({"message": "a", "correlation_id": "a-1"}))
        app.publish("alerts/siteB/door", json.dumps({"message": "b", "correlation_id": "b-1"}))
        app.ask("alerts/siteB/door", "forged", b"a-1", "receipts/alerts/siteA/door")
        app.publish("alerts/siteB/T\u00fcr", json.dumps({"message": "t", "correlation_id": "t-1"}))
        wait_for(lambda: len(smtp.received) == 4, what="every alert mailed")
        wait_for(lambda: len(app.receipts()) == 3, what="the three receipts allowed")
        wait_for(lambda: rejected(gw) == {"receipt_topic": 1}, what="the forgery counted")
        assert gw.terminate() == 0
        app.close()
        got = sorted((g.topic, g.body["correlation_id"]) for g in app.receipts())
        assert got == [
            ("receipts/alerts/siteA/door", "a-1"),
            ("receipts/alerts/siteB/T\u00fcr", "t-1"),
            ("receipts/alerts/siteB/door", "b-1"),
        ]


def test_half_formed_and_mixed_mqtt5_requests_are_answered_or_counted(
    tmp_path: Path, pki: Pki, broker: Mosquitto
) -> None:
    """A Response Topic alone is a request (Correlation Data is optional in MQTT 5): it
    is answered, without the property. Correlation Data alone, a request made both with
    properties and JSON, or reply_to alone is refused: counted, logged once."""
    with SmtpServer(pki, "starttls") as smtp:
        gw = DaemonProcess(config(tmp_path, pki, smtp, broker), tmp_path / "daemon.log").start()
        gw.wait_ready(("mqtt",))
        app = Client5(broker.port)
        app.publish5("alerts/cold/door", "topic alone", None, "receipts/door/req-17")
        app.publish5("alerts/cold/door", "data alone", b"d-1", None)
        mixed = json.dumps({"message": "mixed", "correlation_id": "j-1"})
        app.publish5("alerts/cold/door", mixed, None, "receipts/door/req-18")
        app.publish("alerts/cold/door", json.dumps({"message": "x", "reply_to": "receipts/door"}))
        wait_for(lambda: len(smtp.received) == 4, what="every alert mailed")
        wait_for(lambda: app.receipts(), what="the Response Topic's receipt")
        wait_for(
            lambda: rejected(gw) == {"receipt_bad_request": 3}, what="the bad requests counted"
        )
        assert gw.terminate() == 0
        app.close()
        [got] = app.receipts()
        assert (got.topic, got.correlation, got.body["correlation_id"]) == (
            "receipts/door/req-17",
            None,
            "",
        )
        [mail] = [m for m in smtp.received if "topic alone" in str(m.message["Subject"])]
        assert got.body["outcome"] == "sent" and got.body["message_id"] == mail.message_id
        assert gw.log_text().count("counted as receipt_bad_request") == 1


def test_a_receipt_asked_for_under_an_old_prefix_is_not_published_outside_the_new(
    tmp_path: Path, pki: Pki, broker: Mosquitto
) -> None:
    """The operator moves mqtt.receipt_prefix while a receipt waits: the gateway never
    publishes outside the prefix it runs with, so it drops that one, counted and said."""
    with SmtpServer(pki, "starttls") as smtp:
        smtp.stop()  # the receipt waits for its mail across the restart
        cfg = config(tmp_path, pki, smtp, broker)
        gw = DaemonProcess(cfg, tmp_path / "daemon.log").start()
        gw.wait_ready(("mqtt",))
        app = Client5(broker.port)
        app.ask("alerts/cold/door", "door open", b"old", "receipts/door")
        db = tmp_path / "state/outbox.db"
        wait_for(lambda: states(db) == [("waiting", None)], what="the request stored")
        assert gw.terminate() == 0
        moved = '[mqtt]\nreceipt_prefix = "r/"\nreceipt_topic = "r/{sensor}"\n'
        cfg.write_text(cfg.read_text().replace("[mqtt]\n", moved))
        smtp.start()
        gw.start()
        gw.wait_ready(("mqtt",))
        wait_for(lambda: smtp.received, what="the mail")
        wait_for(lambda: rejected(gw) == {"receipt_bad_topic": 1}, what="the drop counted")
        wait_for(lambda: states(db) == [("published", "sent")], what="the receipt settled")
        assert gw.terminate() == 0
        app.close()
        assert app.receipts() == []
        assert gw.log_text().count("asked for before the configuration changed") == 1
