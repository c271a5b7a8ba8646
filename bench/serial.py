"""Serial ingest benchmark over a real pty: frames decoded, committed and ACKed per second
vs the raw line rate of the same pty, and CPU seconds per 1,000 frames.

A 115200-baud UART carries at most ~144 80-byte lines/s; eight such ports are
~1,150 frames/s, so the CPU figure says what share of a core they would cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import tty
from pathlib import Path
from typing import Any

from bench.common import row
from firmware_bridge import codec
from gateway.config import parse
from gateway.ingest import Ingest
from gateway.outbox import Outbox
from gateway.outbox.writer import Writer
from gateway.routing import Router
from gateway.runtime import Runtime
from gateway.sources.serial import SerialHub, SerialSource

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


# The device runs in a process of its own, as a real one does: in-process its writes
# would wait on the gateway's GIL, and the gateway's CPU figure would include them.
# It writes everything as fast as the pty takes it, reading replies meanwhile, and
# exits once every frame has its ACK (or, not `acked`, once it has written it all). Like
# a real device it retransmits what has no ACK after 0.5 s: a gateway may drop the
# replies of a device that falls behind reading them (this one can, on two busy cores).
BULK_DEVICE = """
import os, select, sys, time
from firmware_bridge import codec
master, want_acks = int(sys.argv[1]), sys.argv[2] == "1"
raw = sys.stdin.buffer.read()
frames = {f.seq: codec.encode(f) for f in codec.Decoder().feed(raw)}
data = memoryview(raw)
os.set_blocking(master, False)
decoder, acked = codec.Decoder(), set()
while data or (want_acks and len(acked) < len(frames)):
    r, w, _ = select.select([master], [master] if data else [], [], 0.5)
    if not (r or w):
        data = memoryview(b"".join(f for s, f in frames.items() if s not in acked))
    if w:
        try:
            data = data[os.write(master, data[:4096]):]
        except BlockingIOError:
            pass
    if r:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO until the other side opens the slave
            if os.getppid() == 1:
                break  # the bench is gone: do not spin on a dead pty
            time.sleep(0.01)
            continue
        acked.update(e.seq for e in decoder.feed(chunk) if isinstance(e, codec.Ack))
"""


def _device(master: int, data: bytes, acked: bool) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-c", BULK_DEVICE, str(master), str(int(acked))],
        stdin=subprocess.PIPE,
        pass_fds=[master],
    )
    assert proc.stdin is not None
    proc.stdin.write(data)
    proc.stdin.close()
    return proc


def raw_line_rate(data: bytes) -> float:
    """The ceiling: the same bytes through a pty, read in chunks and split into lines."""
    master, path = make_pty()
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    lines = 0
    buf = b""
    t0 = time.perf_counter()
    device = _device(master, data, acked=False)
    while lines < N + 1:
        buf += os.read(fd, 65536)
        *complete, buf = buf.split(b"\n")
        lines += len(complete)
    elapsed = time.perf_counter() - t0
    device.wait(30)
    os.close(fd)
    os.close(master)
    return N / elapsed


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

    async def go() -> tuple[float, float]:
        task = asyncio.create_task(source.run())
        while runtime.sources.get(source.name) != "connected":
            await asyncio.sleep(0.01)
        cpu0, t0 = time.process_time(), time.perf_counter()
        device = _device(master, data, acked=True)  # every ALERT and the HELLO
        deadline = time.monotonic() + 300
        while device.poll() is None:
            if time.monotonic() > deadline:
                device.kill()
                raise RuntimeError("the bulk device did not get all its ACKs in 300 s")
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - cpu0  # the gateway's alone: the device is elsewhere
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return N / elapsed, cpu / N * 1000

    rate, cpu_per_1000 = asyncio.run(go())
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
    hub = SerialHub(ingest)  # as the daemon does: one thread reads all eight
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
        row("serial CPU per 1000 frames, bulk", cpu * 1000, "cpu ms", None, ""),
        row("serial, 8 UARTs at 144 frames/s each", share * 100, "% of core", None, "", "< 10%"),
    ]
