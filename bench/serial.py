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
from gateway.sources.serial import SerialSource
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


def run() -> list[dict[str, Any]]:
    data = frames()
    raw = raw_line_rate(data)
    with tempfile.TemporaryDirectory() as d:
        rate, cpu = ours(data, Path(d))
    eight_uarts = 8 * 144 * cpu / 1000
    return [
        row(
            "serial frames decoded+committed+ACKed",
            rate,
            "frames/s",
            raw,
            "raw pty line rate (chunked read+split)",
        ),
        row(
            "serial CPU per 1000 frames",
            cpu,
            "cpu s",
            None,
            "",
            f"8 UARTs at 144 lines/s = {eight_uarts * 100:.1f}% of a core (< 10%)",
        ),
    ]
