"""MQTT ingest against a real Mosquitto: PUBACK only after the outbox commit."""

from __future__ import annotations

import collections
import contextlib
import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from gateway import outbox
from tests.conftest import run_cli
from tests.parts import (
    DaemonProcess,
    Mosquitto,
    Publisher,
    mosquitto_binary,
    stored_alerts,
    wait_for,
)

pytestmark = pytest.mark.skipif(
    mosquitto_binary() is None, reason="mosquitto is not installed (make test installs it)"
)


@pytest.fixture
def gateway_factory(tmp_path: Path, broker: Mosquitto) -> Iterator[Callable[..., DaemonProcess]]:
    daemons: list[DaemonProcess] = []

    def make(extra: str = "", mqtt_extra: str = "", protocol: str = "3.1.1") -> DaemonProcess:
        cfg = tmp_path / "gw.toml"
        cfg.write_text(
            f'[gateway]\ndevice_id = "gw-mqtt"\nstate_dir = "{tmp_path}/state"\n'
            f'runtime_dir = "{tmp_path}/run"\n{extra}\n'
            f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\ntopics = ["alerts/#"]\n'
            f'protocol = "{protocol}"\nstatus_interval = "1s"\n{mqtt_extra}\n'
            '[[route]]\nname = "ops"\nmatch = "#"\nto = ["ops@example.com"]\n'
        )
        d = DaemonProcess(cfg, tmp_path / "daemon.log")
        daemons.append(d)
        return d

    yield make
    for d in daemons:
        if d.alive:
            d.terminate()


def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "outbox.db"


def messages(tmp_path: Path) -> list[str]:
    if not db(tmp_path).exists():
        return []
    return [m for _, m, _ in stored_alerts(db(tmp_path))]


def _published(info: mqtt.MQTTMessageInfo) -> bool:
    try:
        return info.is_published()
    except (RuntimeError, ValueError):
        return False  # the publish failed: the sender knows it was not acknowledged


def test_2000_alerts_from_mosquitto_pub_land_once(
    tmp_path: Path, broker: Mosquitto, gateway_factory: Callable[..., DaemonProcess]
) -> None:
    gw = gateway_factory().start()
    gw.wait_ready(("mqtt",))
    lines = "\n".join(f"alert {i}" for i in range(2000)) + "\n"
    subprocess.run(
        [
            "mosquitto_pub",
            "-h",
            "127.0.0.1",
            "-p",
            str(broker.port),
            "-q",
            "1",
            "-t",
            "alerts/truck/door",
            "-l",
        ],
        input=lines.encode(),
        check=True,
        timeout=60,
    )
    wait_for(lambda: len(messages(tmp_path)) >= 2000, what="2000 stored")
    time.sleep(0.5)
    got = messages(tmp_path)
    assert sorted(got) == sorted(f"alert {i}" for i in range(2000))
    rows = stored_alerts(db(tmp_path))
    assert {t for t, _, _ in rows} == {"alerts/truck/door"}
    assert gw.terminate() == 0


def test_kill_9_while_streaming_loses_nothing(
    tmp_path: Path, broker: Mosquitto, gateway_factory: Callable[..., DaemonProcess]
) -> None:
    gw = gateway_factory().start()
    gw.wait_ready(("mqtt",))
    pub = Publisher(broker.port)
    sent = [f"stream {i}" for i in range(5000)]

    def produce() -> None:
        for text in sent:
            pub.publish("alerts/stream/x", text)
            time.sleep(0.0002)

    producer = threading.Thread(target=produce)
    producer.start()
    wait_for(lambda: len(messages(tmp_path)) > 1000, what="streaming under way")
    gw.kill9()
    before = len(messages(tmp_path))
    gw.start()
    producer.join(60)
    wait_for(lambda: pub.acked == set(sent), what="the broker acked every publish")
    gw.wait_ready(("mqtt",))
    wait_for(
        lambda: set(messages(tmp_path)) >= set(sent),
        timeout=60,
        what="every published alert stored",
    )
    got = collections.Counter(messages(tmp_path))
    assert set(got) == set(sent)  # none missing, nothing invented
    # The PUBACKs lost in the kill (not yet written, or in a socket buffer the reset
    # discarded) bring their messages back with DUP: each is recognised by its row in
    # mqtt_pending (kept until the broker is known to have the PUBACK) and acked, not
    # stored again.
    dupes = {m: n for m, n in got.items() if n > 1}
    assert not dupes, f"{len(dupes)} stored twice"
    wait_for(lambda: gw.status() is not None, what="the restarted daemon's status")
    recognised = (gw.status() or {}).get("mqtt_redelivery_recognised")
    print(f"kill -9 after {before} stored; {recognised} redeliveries recognised")
    pub.close()


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_alerts_published_while_stopped_arrive_on_start(
    tmp_path: Path,
    broker: Mosquitto,
    gateway_factory: Callable[..., DaemonProcess],
    protocol: str,
) -> None:
    gw = gateway_factory(protocol=protocol).start()
    gw.wait_ready(("mqtt",))
    assert gw.terminate() == 0
    pub = Publisher(broker.port)
    for i in range(100):
        pub.publish("alerts/offline/x", f"while stopped {i}")
    wait_for(lambda: len(pub.acked) == 100, what="broker acks")
    gw.start()
    wait_for(lambda: len(messages(tmp_path)) == 100, what="the persistent session's backlog")
    pub.close()


def test_broker_restart_while_running(
    tmp_path: Path, broker: Mosquitto, gateway_factory: Callable[..., DaemonProcess]
) -> None:
    gw = gateway_factory().start()
    gw.wait_ready(("mqtt",))
    pub = Publisher(broker.port)
    for i in range(50):
        pub.publish("alerts/a/b", f"before {i}")
    wait_for(lambda: len(messages(tmp_path)) == 50, what="first 50")
    pub.close()
    broker.restart()
    wait_for(lambda: gw.log_text().count("connected to the MQTT broker") >= 2, what="reconnected")
    assert "(session resumed)" in gw.log_text()
    pub = Publisher(broker.port)
    for i in range(50):
        pub.publish("alerts/a/b", f"after {i}")
    expected = {f"before {i}" for i in range(50)} | {f"after {i}" for i in range(50)}
    # Mosquitto may restore acked messages it had not yet saved as acked: duplicates are
    # allowed (same content), a loss is not.
    wait_for(lambda: set(messages(tmp_path)) == expected, what="all 100 after the restart")
    assert "lost the MQTT broker" in gw.log_text()
    pub.close()


def test_full_outbox_stops_acking_and_resumes(
    tmp_path: Path, broker: Mosquitto, gateway_factory: Callable[..., DaemonProcess]
) -> None:
    # No self-alerts: the "outbox past 80 %" one would take a place this test counts.
    gw = gateway_factory(
        extra="[outbox]\nmax_messages = 50\n[selfalerts]\nenabled = false\n"
    ).start()
    gw.wait_ready(("mqtt",))
    pub = Publisher(broker.port)
    sent = [f"full {i}" for i in range(80)]
    for text in sent:
        pub.publish("alerts/full/x", text)
    wait_for(lambda: len(messages(tmp_path)) == 50, what="outbox at its bound")
    wait_for(lambda: (gw.status() or {}).get("outbox_full") is True, what="full in status")
    time.sleep(1.5)
    assert len(messages(tmp_path)) == 50
    cfg = str(gw.config)
    rows = json.loads(run_cli("queue", "list", "-c", cfg, "--json", "--limit", "40").stdout)
    conn = outbox.connect(db(tmp_path))  # all 40 at once, as `queue delete` does each
    assert sum(outbox.delete(conn, r["id"]) for r in rows) == 40
    conn.close()
    # A fresh alert fits at once and clears the "full" flag before the held ones are
    # retried: they must be retried all the same (chaos found them stuck, unacked,
    # filling the broker's in-flight window until nothing more came through).
    pub.publish("alerts/full/x", "after room")
    wait_for(lambda: len(messages(tmp_path)) == 50 - 40 + 30 + 1, what="the held 30 stored")
    remaining = set(messages(tmp_path))
    deleted = {r["message"] for r in rows}
    assert remaining | deleted == {*sent, "after room"}  # nothing acked was lost
    assert "the outbox is full" in gw.log_text()
    pub.close()


def test_bad_payloads_are_counted_and_the_daemon_keeps_running(
    tmp_path: Path, broker: Mosquitto, gateway_factory: Callable[..., DaemonProcess]
) -> None:
    gw = gateway_factory(mqtt_extra='max_payload = "64KiB"').start()
    gw.wait_ready(("mqtt",))
    pub = Publisher(broker.port)
    pub.publish("alerts/bad/binary", bytes(range(256)) * 4)
    pub.publish("alerts/bad/huge", b"x" * (1024 * 1024))
    pub.publish("alerts/bad/json", b'{"message": "unterminated')
    pub.publish("alerts/bad/array", b"[1, 2, 3]")
    pub.publish("alerts/bad/deep", b"[" * 30_000 + b"]" * 30_000)
    pub.publish("alerts/good/json", b'{"message": "ok", "severity": "critical", "sensor": "t1"}')
    wait_for(lambda: len(messages(tmp_path)) == 5, what="5 stored (the huge one rejected)")
    wait_for(
        lambda: ((gw.status() or {}).get("rejected") or {}).get("mqtt_oversize") == 1,
        what="the rejection counted",
    )
    st = gw.status() or {}
    assert st["sanitised"].get("non_utf8") == 1 and st["sanitised"].get("malformed_json", 0) >= 1
    assert gw.alive
    assert "rejected a 1048576-byte message" in gw.log_text()
    status = json.loads(run_cli("status", "-c", str(gw.config), "--json").stdout)
    assert status["rejected"] == {"mqtt_oversize": 1}
    pub.close()


def test_retained_alerts_are_ignored_and_status_topic(
    tmp_path: Path, broker: Mosquitto, gateway_factory: Callable[..., DaemonProcess]
) -> None:
    pub = Publisher(broker.port)
    pub.publish("alerts/old/news", "retained from last week", retain=True)
    wait_for(lambda: len(pub.acked) == 1, what="retained stored by broker")
    seen: dict[str, bytes] = {}
    watcher = mqtt.Client(CallbackAPIVersion.VERSION2)
    watcher.on_message = lambda c, u, m: seen.__setitem__(m.topic, m.payload)
    watcher.connect("127.0.0.1", broker.port)
    watcher.subscribe("mailgw/#", qos=1)
    watcher.loop_start()
    gw = gateway_factory().start()
    gw.wait_ready(("mqtt",))
    pub.publish("alerts/new/x", "fresh")
    wait_for(lambda: messages(tmp_path) == ["fresh"], what="only the fresh one")
    wait_for(lambda: seen.get("mailgw/gw-mqtt/status") == b"online", what="online")
    wait_for(lambda: "mailgw/gw-mqtt/status/report" in seen, what="status report")
    report = json.loads(seen["mailgw/gw-mqtt/status/report"])
    assert report["rejected"] == {"mqtt_retained_ignored": 1}
    assert gw.terminate() == 0
    wait_for(lambda: seen.get("mailgw/gw-mqtt/status") == b"offline", what="offline")
    watcher.loop_stop()
    pub.close()


def test_starts_without_a_broker(
    tmp_path: Path, broker: Mosquitto, gateway_factory: Callable[..., DaemonProcess]
) -> None:
    broker.stop()
    gw = gateway_factory().start()
    gw.wait_ready()  # ready (outbox open, accepting local alerts) with no broker
    assert (
        run_cli(
            "send", "-c", str(gw.config), "--sensor", "s", "--severity", "info", "no broker yet"
        ).returncode
        == 0
    )
    broker.start()
    wait_for(
        lambda: (gw.status() or {}).get("sources", {}).get("mqtt") == "connected",
        timeout=40,
        what="connected once the broker appears",
    )
    log = gw.log_text()
    # Said once, with the address and what to check; not paho's error per retry.
    assert log.count("cannot connect to the MQTT broker 127.0.0.1") == 1, log
    assert "Client is not connected" not in log


class InProcess:
    """The MQTT source, its writer and outbox in this process, on a real broker."""

    def __init__(
        self,
        tmp_path: Path,
        broker: Mosquitto,
        extra: str = "",
        port: int | None = None,
        topics: str = '["alerts/#"]',
    ) -> None:
        import asyncio

        from gateway.config import parse
        from gateway.ingest import Ingest
        from gateway.outbox import Outbox
        from gateway.outbox.writer import Writer
        from gateway.routing import Router
        from gateway.runtime import Runtime
        from gateway.sources.mqtt import MqttSource

        cfg = parse(
            f'[gateway]\ndevice_id = "gw-inproc"\nstate_dir = "{tmp_path}/state"\n'
            f'runtime_dir = "{tmp_path}/run"\n'
            f"[mqtt]\nport = {port or broker.port}\ntopics = {topics}\n{extra}\n"
            '[[route]]\nname = "ops"\nmatch = "#"\nto = ["ops@example.com"]\n'
        )
        (tmp_path / "state").mkdir(exist_ok=True)
        self.outbox = Outbox(cfg.outbox_path, max_messages=cfg.outbox.max_messages)
        self.writer = Writer(self.outbox)
        self.writer.start()
        self.runtime = Runtime()
        self.source = MqttSource(
            cfg, Ingest(self.writer, Router(cfg.routes), self.runtime), self.runtime
        )
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever)
        self.thread.start()
        self.running = asyncio.run_coroutine_threadsafe(self.source.run(), self.loop)
        wait_for(lambda: self.runtime.sources.get("mqtt") == "connected", what="connected")

    @property
    def taken(self) -> int:
        """Messages the source has taken from the broker (redeliveries included)."""
        return self.runtime.received["mqtt"]

    def close(self) -> None:
        self.running.cancel()
        self.source.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        self.writer.stop()
        self.outbox.close()


def test_a_commit_from_before_a_reconnect_does_not_strand_the_redelivery(tmp_path: Path) -> None:
    """A commit that finishes after a reconnect must not eat the redelivered message's ack.

    The broker redelivers what we held with the same packet ids. If the old connection's
    commit callback took the new entry for that id, neither copy was acked: the broker's
    in-flight window filled with messages it would never hear about again, and nothing
    more arrived until the next reconnect (chaos found MQTT ingest stalled this way).
    """
    window = 5
    broker = Mosquitto(tmp_path / "mosquitto", max_inflight=window).start()
    gw = InProcess(tmp_path, broker, f"max_inflight = {window}")
    gate = threading.Event()
    pub = Publisher(broker.port)
    try:
        gw.writer.call(lambda _: gate.wait(30))  # commits wait behind this
        for i in range(window):
            pub.publish("alerts/gen/x", f"held {i}")
        wait_for(lambda: gw.taken == window, what="the window delivered")
        pub.close()
        broker.restart()
        # The broker redelivers the unacknowledged window on the new connection.
        wait_for(lambda: gw.taken == 2 * window, 20, "the redelivery")
        gate.set()  # the old connection's commits finish now, after the new ones arrived
        pub = Publisher(broker.port)
        pub.publish("alerts/gen/x", "after")
        wait_for(lambda: "after" in messages(tmp_path), 15, "an alert after the window")
        assert {f"held {i}" for i in range(window)} <= set(messages(tmp_path))
    finally:
        gate.set()
        pub.close()
        gw.close()
        broker.stop()


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_the_gateway_reads_no_further_than_its_window(tmp_path: Path, protocol: str) -> None:
    """Memory stays flat even where the broker floods: what is taken is bounded.

    Mosquitto 2.0.11 sends a resumed session's whole backlog regardless of
    max_inflight_messages; with the outbox full, the gateway must take no more than
    its own window (mqtt.max_inflight), then everything once there is room.
    """
    window, bound, backlog = 20, 10, 600
    broker = Mosquitto(tmp_path / "mosquitto", max_inflight=1000).start()
    extra = f'max_inflight = {window}\nprotocol = "{protocol}"'
    gw = InProcess(tmp_path, broker, extra)
    gw.close()  # the session exists; the backlog queues up for it
    pub = Publisher(broker.port)
    sent = [f"flood {i}" for i in range(backlog)]
    for text in sent:
        pub.publish("alerts/flood/x", text)
    wait_for(lambda: pub.acked == set(sent), what="the backlog at the broker")
    pub.close()
    gw = InProcess(
        tmp_path,
        broker,
        f"{extra}\n[outbox]\nmax_messages = {bound}\n[selfalerts]\nenabled = false",
    )
    try:
        wait_for(lambda: len(messages(tmp_path)) == bound, what="the outbox at its bound")
        time.sleep(1.0)  # the broker had every chance to push more at us
        assert gw.taken <= bound + window, gw.taken
        gw.outbox.max_messages = backlog + 10  # room (the writer reads the bound each add)
        wait_for(lambda: len(set(messages(tmp_path))) == backlog, 60, "the whole backlog")
        assert set(messages(tmp_path)) == set(sent)
    finally:
        gw.close()
        broker.stop()


class StallingProxy:
    """A TCP proxy to the broker that can stop one connection's PUBLISH packets to the
    client while everything else (CONNACK, PINGRESP, PUBACK) still flows: a session
    that is connected and answers pings, and delivers nothing."""

    def __init__(self, target: int) -> None:
        import socket

        self.target = target
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.connections = 0
        self.stalled: set[int] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def stall_current(self) -> None:
        self.stalled.add(self.connections - 1)

    def close(self) -> None:
        self.server.close()

    def _accept(self) -> None:
        import socket

        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            n, self.connections = self.connections, self.connections + 1
            upstream = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._up, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._down, args=(n, upstream, client), daemon=True).start()

    @staticmethod
    def _up(client: Any, upstream: Any) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                upstream.sendall(data)
        for s in (client, upstream):
            with contextlib.suppress(OSError):
                s.shutdown(2)

    def _down(self, n: int, upstream: Any, client: Any) -> None:
        buf = b""
        with contextlib.suppress(OSError):
            while data := upstream.recv(65536):
                buf += data
                out = b""
                while len(buf) >= 2:
                    length, mult, i = 0, 1, 1
                    while i < len(buf) and i <= 4:
                        length += (buf[i] & 0x7F) * mult
                        mult *= 128
                        i += 1
                        if not buf[i - 1] & 0x80:
                            break
                    else:
                        break  # the length is not all here yet
                    if len(buf) < i + length:
                        break
                    packet, buf = buf[: i + length], buf[i + length :]
                    if n in self.stalled and packet[0] >> 4 == 3:
                        continue  # a PUBLISH swallowed: the broker thinks it in flight
                    out += packet
                client.sendall(out)
        for s in (client, upstream):
            with contextlib.suppress(OSError):
                s.shutdown(2)


def test_a_session_that_delivers_nothing_is_reconnected(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker = Mosquitto(tmp_path / "mosquitto").start()
    proxy = StallingProxy(broker.port)
    gw = InProcess(tmp_path, broker, port=proxy.port)
    gw.source.probe_every, gw.source.stall_after = 0.5, 2.0
    pub = Publisher(broker.port)
    try:
        pub.publish("alerts/p/x", "before")
        wait_for(lambda: "before" in messages(tmp_path), what="a first alert")
        proxy.stall_current()
        pub.publish("alerts/p/x", "during")
        # Pings still answered, so paho's keepalive sees nothing wrong; the probe does,
        # and the reconnect makes the broker send the message it had in flight.
        wait_for(lambda: "during" in messages(tmp_path), 20, "the stuck alert")
        assert "has delivered nothing to this session" in caplog.text
        assert proxy.connections >= 2
    finally:
        pub.close()
        gw.close()
        proxy.close()
        broker.stop()


def test_the_gateways_own_messages_are_not_alerts(tmp_path: Path) -> None:
    """Subscribed to '#', the gateway also receives its status and probe messages."""
    broker = Mosquitto(tmp_path / "mosquitto").start()
    gw = InProcess(tmp_path, broker, topics='["#"]')
    gw.source.probe_every = 0.5  # a probe goes out as soon as things are quiet
    pub = Publisher(broker.port)
    try:
        wait_for(lambda: gw.source.probes_back >= 1, 10, "a probe there and back")
        # The broker keeps a session's order: by the time this one is stored, the
        # "online" status from the connect and the probe have been handled before it.
        pub.publish("sensors/door", "a real alert")
        wait_for(lambda: "a real alert" in messages(tmp_path), what="the real alert")
        assert messages(tmp_path) == ["a real alert"]
        assert gw.taken == 1
    finally:
        pub.close()
        gw.close()
        broker.stop()
