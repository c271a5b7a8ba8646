"""The whole daemon (`mailgw run` as a process) measured from outside.

- idle RSS, and RSS and start-to-READY=1 with 1,000,000 alerts queued (the backlog
  must live on disk, not in memory; a device rebooting into a long outage must still
  be up in seconds);
- end-to-end latency publish → smarthost on an idle system, p50/p99;
- CPU µs per alert end to end (MQTT in, mail out), from the process's own counters;
- CLI ingest (`mailgw send`, a process per alert) against a bare Python process that
  makes the same durable commit.

python -m bench daemon        (MAILGW_BENCH_QUEUED=N to change the 1,000,000)
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench.common import row
from gateway.alert import Draft, normalize
from gateway.lab import Mosquitto, Pki, SmtpServer, free_port, make_pki
from gateway.outbox import Outbox, Routed

ROOT = Path(__file__).resolve().parent.parent
QUEUED = int(os.environ.get("MAILGW_BENCH_QUEUED", "1000000"))
LATENCY_SAMPLES = 200
CPU_ALERTS = 3000
CLI_SENDS = 30


def config(tmp: Path, name: str, pki: Pki, smtp_port: int, broker_port: int) -> Path:
    pw = tmp / "pw"
    pw.write_text("s3cret\n")
    pw.chmod(0o600)
    path = tmp / f"{name}.toml"
    path.write_text(
        f'[gateway]\ndevice_id = "bench"\nstate_dir = "{tmp}/{name}"\n'
        f'runtime_dir = "{tmp}/{name}-run"\n'
        f"[outbox]\nmax_messages = {QUEUED * 2}\n"
        f'[smtp]\nhost = "127.0.0.1"\nport = {smtp_port}\nfrom = "gw@example.com"\n'
        f'username = "gw@example.com"\npassword_file = "{pw}"\nca_file = "{pki.ca_file}"\n'
        'batch = 200\ntimeout = "5s"\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {broker_port}\n'
        '[[route]]\nname = "ops"\nmatch = "#"\nto = ["ops@example.com"]\n'
    )
    return path


class Daemon:
    """`mailgw run` with its own NOTIFY_SOCKET, so READY=1 is seen when it is sent."""

    def __init__(self, cfg: Path, tmp: Path) -> None:
        self.sock_path = tmp / f"notify-{time.monotonic_ns()}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.sock_path))
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "-c", str(cfg)],
            cwd=ROOT,
            env={**os.environ, "NOTIFY_SOCKET": str(self.sock_path)},
            stdout=subprocess.DEVNULL,
            stderr=(tmp / "daemon.log").open("ab"),
        )

    def ready_after(self, timeout: float = 60.0) -> float:
        self.sock.settimeout(timeout)
        while True:
            data = self.sock.recv(4096).decode()
            if "READY=1" in data.split("\n"):
                return time.monotonic() - self.t0

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.sock.close()


def publisher(port: int) -> mqtt.Client:
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    client.max_inflight_messages_set(100)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def wait_received(smtp: SmtpServer, count: int, timeout: float = 120.0) -> None:
    smtp.wait_for(count, timeout)


def live(tmp: Path, pki: Pki, broker: Mosquitto) -> list[dict[str, Any]]:
    """Idle RSS, latency and CPU per alert with the smarthost up."""
    with SmtpServer(pki, "starttls") as smtp:
        d = Daemon(config(tmp, "live", pki, smtp.port, broker.port), tmp)
        try:
            ready = d.ready_after()
            time.sleep(3.0)  # connected, first housekeeping done: idle
            idle = d.rss_mib()
            pub = publisher(broker.port)
            arrived = threading.Event()
            smtp.on_receive = lambda _r: arrived.set()
            latencies = []
            for i in range(LATENCY_SAMPLES):
                arrived.clear()
                t0 = time.perf_counter()
                pub.publish("alerts/bench/latency", f"latency probe {i}", qos=1)
                if not arrived.wait(10):
                    raise RuntimeError("a latency probe did not arrive within 10 s")
                latencies.append((time.perf_counter() - t0) * 1000)
            smtp.on_receive = None
            base, cpu0 = len(smtp.received), d.cpu_s()
            for i in range(CPU_ALERTS):
                pub.publish("alerts/bench/cpu", f"cpu {i}", qos=1)
            wait_received(smtp, base + CPU_ALERTS)
            cpu_us = (d.cpu_s() - cpu0) / CPU_ALERTS * 1e6
            pub.disconnect()
            pub.loop_stop()
        finally:
            d.stop()
    q = statistics.quantiles(latencies, n=100)
    return [
        row("daemon start to READY=1, empty outbox", ready, "s"),
        row("daemon RSS, idle", idle, "MiB", goal="<= 32 MiB"),
        row("end-to-end latency publish->smarthost p50", q[49], "ms"),
        row("end-to-end latency publish->smarthost p99", q[98], "ms"),
        row("CPU per alert end to end (MQTT in, mail out)", cpu_us, "us/alert"),
    ]


def fill(db: Path, n: int) -> float:
    """n alerts queued straight into an outbox, as a long outage would leave it."""
    draft = Draft("alerts/bench/backlog", "mqtt", "backlog")
    ob = Outbox(db, max_messages=n * 2)
    t0 = time.perf_counter()
    for start in range(0, n, 10_000):
        ob.add(
            [
                Routed(normalize(f"backlog {i} " + "x" * 100, draft), (("ops", 2),))
                for i in range(start, min(n, start + 10_000))
            ]
        )
    ob.close()
    return time.perf_counter() - t0


def backlog(tmp: Path, pki: Pki, broker: Mosquitto) -> list[dict[str, Any]]:
    """Start, READY and RSS with QUEUED alerts waiting, the smarthost unreachable."""
    down = free_port()  # nothing listens: every probe fails, the backlog stays
    empty = Daemon(config(tmp, "empty", pki, down, broker.port), tmp)
    empty_ready = empty.ready_after()
    time.sleep(5.0)
    empty_rss = empty.rss_mib()
    empty.stop()
    cfg = config(tmp, "full", pki, down, broker.port)
    fill_s = fill(tmp / "full" / "outbox.db", QUEUED)
    size = (tmp / "full" / "outbox.db").stat().st_size / 2**20
    full = Daemon(cfg, tmp)
    ready = full.ready_after()
    time.sleep(5.0)  # housekeeping and a few probes ran
    rss = full.rss_mib()
    cpu = full.cpu_s()
    time.sleep(10.0)
    idle_cpu = (full.cpu_s() - cpu) / 10.0 * 100
    full.stop()
    return [
        row("daemon start to READY=1, smarthost down, empty", empty_ready, "s"),
        row(f"daemon start to READY=1, {QUEUED:,} queued", ready, "s", goal="<= 2 s"),
        row("daemon RSS, smarthost down, empty outbox", empty_rss, "MiB"),
        row(
            f"daemon RSS, {QUEUED:,} queued",
            rss,
            "MiB",
            goal=f"<= {empty_rss + 5:.1f} (empty + 5 MiB)",
        ),
        row(f"daemon CPU while waiting with {QUEUED:,} queued", idle_cpu, "% of core"),
        row(f"outbox file with {QUEUED:,} queued", size, "MiB"),
        row(f"filling {QUEUED:,} alerts (bench setup)", QUEUED / fill_s, "alerts/s"),
    ]


def cli(tmp: Path, pki: Pki, broker: Mosquitto) -> list[dict[str, Any]]:
    """`mailgw send` (a process per alert) vs a bare interpreter doing one FULL commit."""
    cfg = config(tmp, "cli", pki, free_port(), broker.port)
    t0 = time.perf_counter()
    send = [sys.executable, "-m", "gateway", "send", "-c", str(cfg), "--sensor", "s"]
    for i in range(CLI_SENDS):
        subprocess.run(
            [*send, "--severity", "info", f"cli {i}"],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
    ours = CLI_SENDS / (time.perf_counter() - t0)
    raw_db = tmp / "raw-cli.db"
    script = (
        "import sqlite3, sys; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
        "c.execute('PRAGMA journal_mode=WAL'); c.execute('PRAGMA synchronous=FULL'); "
        "c.execute('CREATE TABLE IF NOT EXISTS t (x)'); c.execute('INSERT INTO t VALUES (1)')"
    )
    t0 = time.perf_counter()
    for _ in range(CLI_SENDS):
        subprocess.run([sys.executable, "-c", script, str(raw_db)], check=True)
    raw = CLI_SENDS / (time.perf_counter() - t0)
    return [
        row(
            "CLI ingest, `mailgw send` per alert",
            ours,
            "alerts/s",
            raw,
            "python -c: one FULL commit per process",
        )
    ]


def run() -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        tmp = Path(d)
        pki = make_pki(tmp / "pki")
        broker = Mosquitto(tmp / "broker").start()
        try:
            return [*live(tmp, pki, broker), *cli(tmp, pki, broker), *backlog(tmp, pki, broker)]
        finally:
            broker.stop()
