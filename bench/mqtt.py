"""MQTT ingest benchmark: alerts/s committed and acked vs paho auto-acking, no storage.

Both drain the same backlog (N messages queued by the broker for a persistent
session while the client was away) from the same Mosquitto (max_inflight_messages
100, which Debian 12's 2.0.11 does not keep to for a resumed session; the gateway reads
no further ahead than its own mqtt.max_inflight). The machines are shared and noisy,
so the two run in ROUNDS interleaved pairs and the pair with the median ratio is reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench.common import row
from gateway.config import parse
from gateway.ingest import Ingest
from gateway.lab import Mosquitto
from gateway.outbox import Outbox
from gateway.outbox.writer import Writer
from gateway.routing import Router
from gateway.runtime import Runtime
from gateway.sources.mqtt import MqttSource

N = 20_000


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def queue_backlog(port: int, client_id: str) -> None:
    """Create the session, leave, and have N messages queued for it."""
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
    sub.connect("127.0.0.1", port)
    sub.subscribe("alerts/#", qos=1)
    sub.loop_start()
    time.sleep(0.3)
    sub.disconnect()
    sub.loop_stop()
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{client_id}-pub")
    pub.max_inflight_messages_set(1000)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    infos = [pub.publish("alerts/bench/x", f"alert {i} " + "x" * 200, qos=1) for i in range(N)]
    for info in infos:
        info.wait_for_publish(60)
    pub.disconnect()
    pub.loop_stop()


ROUNDS = 3


def ceiling(port: int, client_id: str = "bench-raw") -> float:
    queue_backlog(port, client_id)
    got = [0]
    done = threading.Event()

    def on_message(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        got[0] += 1
        if got[0] == N:
            done.set()

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
    c.on_message = on_message
    t0 = time.perf_counter()
    c.connect("127.0.0.1", port)
    c.loop_start()
    done.wait(300)
    elapsed = time.perf_counter() - t0
    c.disconnect()
    c.loop_stop()
    return N / elapsed


def ours(port: int, tmp: Path, device_id: str = "bench") -> tuple[float, int, int]:
    cfg = parse(
        f'[gateway]\ndevice_id = "{device_id}"\nstate_dir = "{tmp}/state"\n'
        f'runtime_dir = "{tmp}/run"\n'
        f"[outbox]\nmax_messages = 1000000\n[mqtt]\nport = {port}\n"
        '[[route]]\nname = "ops"\nmatch = "#"\nto = ["ops@example.com"]\n'
    )
    queue_backlog(port, f"mailgw-{device_id}")
    ob = Outbox(cfg.outbox_path, max_messages=10**7)
    writer = Writer(ob)
    writer.start()
    runtime = Runtime()
    source = MqttSource(cfg, Ingest(writer, Router(cfg.routes), runtime), runtime)
    before = rss_kib()

    async def go() -> float:
        task = asyncio.create_task(source.run())
        t0 = time.perf_counter()
        while writer.committed_alerts < N or source.holding:
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - t0
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return N / elapsed

    rate = asyncio.run(go())
    after = rss_kib()
    print(
        f"  mqtt: {writer.commits} commits for {writer.committed_alerts} alerts",
        file=sys.stderr,
        flush=True,
    )
    writer.stop()
    source.close()
    ob.close()
    return rate, before, after


def run() -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        broker = Mosquitto(tmp / "broker", max_inflight=100).start()
        raws, rates, growth = [], [], []
        try:
            for i in range(ROUNDS):
                raws.append(ceiling(broker.port, f"bench-raw-{i}"))
                (tmp / f"r{i}").mkdir()
                rate, before, after = ours(broker.port, tmp / f"r{i}", f"bench-{i}")
                rates.append(rate)
                growth.append(after - before)
        finally:
            broker.stop()
    # The round whose ratio is the median: a pair measured side by side, not two medians.
    pairs = sorted(zip(rates, raws, strict=True), key=lambda p: p[0] / p[1])
    rate, raw = pairs[len(pairs) // 2]
    print(
        "  mqtt rounds (ours / paho): "
        + ", ".join(f"{o:,.0f}/{r:,.0f}" for o, r in zip(rates, raws, strict=True)),
        file=sys.stderr,
    )
    return [
        row(
            "MQTT ingest, PUBACK after FULL commit",
            rate,
            "alerts/s",
            raw,
            "paho auto-ack, no storage",
            "ratio >= 0.7",
        ),
        row(
            f"MQTT ingest RSS growth over {N} alerts",
            max(growth) / 1024,
            "MiB",
            None,
            "",
            "flat (the backlog is on disk)",
        ),
    ]
