"""Serial ingest benchmark over a real pty: frames decoded, committed and ACKed per second
vs the raw line rate of the same pty, and CPU seconds per 1,000 frames.

A 115200-baud UART carries at most ~144 80-byte lines/s; eight such ports are
~1,150 frames/s, so the CPU figure says what share of a core they would cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
import tty
from pathlib import Path
from typing import Any

from bench.common import row
from firmware_bridge import codec
from gateway.config import parse
from gateway.ingest import Ingest
from gateway.outbox import Outbox
from gateway.routing import Router
from gateway.sources.serial import SerialHub, SerialSource
from gateway.status import Runtime
from gateway.writer import Writer

N = 20_000


def make_pty() -> tuple[int, str]:
    master, slave = os.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)
    os.close(slave)
    return master, path


def frames() -> bytes:
    hello = codec.encode(codec.Hello(0, "bench", "1.0", "boot1"))
    return hello + b"".join(
        codec.encode(codec.Alert(i + 1, "temp", "warning", f"reading {i}: {'x' * 40}"))
        for i in range(N)
    )


def raw_line_rate(data: bytes) -> float:
    """The ceiling: the same bytes through a pty, read in chunks and split into lines."""
    master, path = make_pty()
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    lines = 0
    done = threading.Event()

    def read() -> None:
        nonlocal lines
        buf = b""
        while lines < N + 1:
            chunk = os.read(fd, 65536)
            buf += chunk
            *complete, buf = buf.split(b"\n")
            lines += len(complete)
        done.set()

    t = threading.Thread(target=read)
    t.start()
    t0 = time.perf_counter()
    _write_all(master, data)
    done.wait(120)
    elapsed = time.perf_counter() - t0
    os.close(fd)
    os.close(master)
    return N / elapsed


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view[:4096])
        view = view[n:]


def _timed_write_all(fd: int, data: bytes) -> float:
    cpu0 = time.thread_time()
    _write_all(fd, data)
    return time.thread_time() - cpu0


def ours(data: bytes, tmp: Path) -> tuple[float, float]:
    master, path = make_pty()
    cfg = parse(
        f'[gateway]\ndevice_id = "bench"\nstate_dir = "{tmp}/state"\nruntime_dir = "{tmp}/run"\n'
        f'[outbox]\nmax_messages = 1000000\n[[serial]]\nport = "{path}"\nname = "b"\n'
        '[[route]]\nname = "ops"\nmatch = "#"\nto = ["ops@example.com"]\n'
    )
    ob = Outbox(cfg.outbox_path, max_messages=10**7)
    writer = Writer(ob)
    writer.start()
    runtime = Runtime()
    source = SerialSource(cfg, cfg.serial[0], Ingest(writer, Router(cfg.routes), runtime), runtime)
    acks = 0
    stop = threading.Event()
    device_cpu = [0.0]

    def drain_acks() -> None:  # the device side: read ACKs so the pty never fills
        nonlocal acks
        decoder = codec.Decoder()
        cpu0 = time.thread_time()
        while not stop.is_set():
            ready, _, _ = select.select([master], [], [], 0.05)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO until the gateway opens the slave side
                    time.sleep(0.01)
                    continue
                acks += sum(isinstance(e, codec.Ack) for e in decoder.feed(chunk))
                device_cpu[0] = time.thread_time() - cpu0

    drainer = threading.Thread(target=drain_acks)
    drainer.start()

    async def go() -> tuple[float, float]:
        task = asyncio.create_task(source.run())
        while runtime.sources.get(source.name) != "connected":
            await asyncio.sleep(0.01)
        cpu0, t0 = time.process_time(), time.perf_counter()
        device_cpu[0] += await asyncio.to_thread(_timed_write_all, master, data)
        while acks < N + 1:
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - t0
        # Gateway CPU only: the simulated device's threads are taken out.
        cpu = time.process_time() - cpu0 - device_cpu[0]
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return N / elapsed, cpu / N * 1000

    rate, cpu_per_1000 = asyncio.run(go())
    stop.set()
    drainer.join()
    source.close()
    writer.stop()
    ob.close()
    os.close(master)
    return rate, cpu_per_1000


def eight_uarts(tmp: Path, seconds: float = 10.0, commit_interval: float = 0.005) -> float:
    """Share of one core the gateway uses for 8 ports, each at a full 115200-baud UART's
    line rate (144 80-byte frames/s, paced), acking every frame."""
    ports = [make_pty() for _ in range(8)]
    serial_toml = "".join(
        f'[[serial]]\nport = "{p}"\nname = "u{i}"\n' for i, (_, p) in enumerate(ports)
    )
    cfg = parse(
        f'[gateway]\ndevice_id = "bench"\nstate_dir = "{tmp}/state8"\n'
        f'runtime_dir = "{tmp}/run"\n{serial_toml}'
        '[[route]]\nname = "ops"\nmatch = "#"\nto = ["ops@example.com"]\n'
    )
    ob = Outbox(cfg.outbox_path, max_messages=10**7)
    writer = Writer(ob, commit_interval=commit_interval)
    writer.start()
    runtime = Runtime()
    ingest = Ingest(writer, Router(cfg.routes), runtime)
    hub = SerialHub()  # as the daemon does: one thread reads all eight
    sources = [SerialSource(cfg, s, ingest, runtime, hub=hub) for s in cfg.serial]
    # The eight devices run in another process, so that only the gateway's CPU is counted.
    device_code = (
        "import os, select, sys, threading, time\n"
        "from firmware_bridge import codec\n"
        "masters = [int(x) for x in sys.argv[1:]]\n"
        "def device(i, m):\n"
        "    os.write(m, codec.encode(codec.Hello(0, f'dev{i}', '1.0', 'b')))\n"
        "    seq, t_next = 0, time.monotonic()\n"
        "    while True:\n"
        "        seq += 1\n"
        "        a = codec.Alert(seq, 'temp', 'warning', f'{i}/{seq} ' + 'x' * 48)\n"
        "        os.write(m, codec.encode(a))\n"
        "        t_next += 1 / 144\n"
        "        while (left := t_next - time.monotonic()) > 0:\n"
        "            r, _, _ = select.select([m], [], [], left)\n"
        "            if r:\n"
        "                try: os.read(m, 65536)\n"
        "                except OSError: pass\n"
        "for i, m in enumerate(masters):\n"
        "    threading.Thread(target=device, args=(i, m), daemon=True).start()\n"
        "sys.stdin.read()\n"
    )

    async def go() -> float:
        tasks = [asyncio.create_task(s.run()) for s in sources]
        while any(runtime.sources.get(s.name) != "connected" for s in sources):
            await asyncio.sleep(0.01)
        masters = [m for m, _ in ports]
        devices = subprocess.Popen(
            [sys.executable, "-c", device_code, *map(str, masters)],
            stdin=subprocess.PIPE,
            pass_fds=masters,
        )
        await asyncio.sleep(1.0)  # let the devices settle into their pace
        cpu0, t0 = time.process_time(), time.perf_counter()
        await asyncio.sleep(seconds)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        assert devices.stdin is not None
        devices.stdin.close()
        devices.kill()
        devices.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return cpu / wall

    share = asyncio.run(go())
    for s in sources:
        s.close()
    writer.stop()
    ob.close()
    for m, _ in ports:
        os.close(m)
    return share


def run() -> list[dict[str, Any]]:
    data = frames()
    raw = raw_line_rate(data)
    with tempfile.TemporaryDirectory() as d:
        rate, cpu = ours(data, Path(d))
        share = eight_uarts(Path(d))
    return [
        row(
            "serial frames decoded+committed+ACKed",
            rate,
            "frames/s",
            raw,
            "raw pty line rate (chunked read+split)",
        ),
        row("serial CPU per 1000 frames, bulk", cpu, "cpu s", None, ""),
        row("serial, 8 UARTs at 144 frames/s each", share * 100, "% of core", None, "", "< 10%"),
    ]
