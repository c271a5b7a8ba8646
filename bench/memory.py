"""Peak RSS of the daemon: idle, and while a 150 MB MQTT publish arrives.

The daemon runs as a real process against a real Mosquitto (MQTT 3.1.1, where only the
gateway can refuse the packet: MQTT 5 brokers are told our Maximum Packet Size). The
ceiling is what the same daemon holds idle; the goal, an absolute bound a 512 MB Pi can
afford for the whole process, is under 64 MiB.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench.common import row
from gateway.lab import Mosquitto
from tests.parts import DaemonProcess, wait_for

BIG = 150 * 1024 * 1024


def vm(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def run() -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        broker = Mosquitto(tmp / "mosquitto").start()
        try:
            cfg = tmp / "gw.toml"
            cfg.write_text(
                f'[gateway]\ndevice_id = "bench"\nstate_dir = "{tmp}/state"\n'
                f'runtime_dir = "{tmp}/run"\n'
                f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\n'
                '[[route]]\nname = "ops"\nmatch = "#"\nto = ["ops@example.com"]\n'
            )
            gw = DaemonProcess(cfg, tmp / "daemon.log").start()
            gw.wait_ready(("mqtt",))
            assert gw.proc is not None
            time.sleep(1.0)
            idle = vm(gw.proc.pid, "VmHWM")
            pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-big")
            pub.connect("127.0.0.1", broker.port)
            pub.loop_start()
            t0 = time.perf_counter()
            pub.publish("alerts/big/x", b"x" * BIG, qos=1).wait_for_publish(120)
            wait_for(
                lambda: ((gw.status() or {}).get("rejected") or {}).get("mqtt_oversize") == 1,
                timeout=120,
                what="the 150 MB publish refused",
            )
            took = time.perf_counter() - t0
            peak = vm(gw.proc.pid, "VmHWM")
            pub.loop_stop()
            gw.terminate()
        finally:
            broker.stop()
    print(f"  memory: idle peak {idle / 1024:.1f} MiB; with a 150 MB publish {peak / 1024:.1f} MiB")
    return [
        row("daemon peak RSS, idle", idle / 1024, "MiB", goal="< 64 MiB"),
        row(
            "daemon peak RSS, 150 MB publish refused",
            peak / 1024,
            "MiB",
            ceiling=idle / 1024,
            ceiling_name="idle peak RSS",
            goal="< 64 MiB",
        ),
        row("150 MB publish refused in", took, "s"),
    ]
