"""A simulated sensor device speaking protocol v1, for the tests and the demo.

It behaves like the reference firmware: HELLO at boot, each ALERT kept until its
ACK and retransmitted (the identical frame) with backoff, HELLO again when the
gateway asks. It can corrupt a fraction of the bytes it sends and receives, to
stand in for a noisy line. It talks to a pty master fd, or a pyserial URL/path.

    python -m firmware_bridge.device --frame 'PING,1'      print a frame with its CRC
    python -m firmware_bridge.device /dev/ttyUSB0 --alerts 10
"""

from __future__ import annotations

import argparse
import os
import random
import select
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

from firmware_bridge import codec
from firmware_bridge.crc import crc16


@dataclass
class _Pending:
    frame: bytes
    due: float
    backoff: float
    sent: int = 0


@dataclass
class Stats:
    sent_frames: int = 0
    retransmits: int = 0
    naks: dict[str, int] = field(default_factory=dict)
    corrupt_in: int = 0


class Device:
    def __init__(
        self,
        port: str | int,
        *,
        device_id: str = "sim-1",
        fw: str = "1.0.0",
        boot_id: str | None = None,
        baudrate: int = 115200,
        corrupt: float = 0.0,
        seed: int | None = None,
        retry_min: float = 0.5,
        retry_max: float = 8.0,
    ) -> None:
        self.port = port
        self.device_id = device_id
        self.fw = fw
        self.boot_id = boot_id or uuid.uuid4().hex[:12]
        self.baudrate = baudrate
        self.corrupt = corrupt
        self.rng = random.Random(seed)
        self.retry_min, self.retry_max = retry_min, retry_max
        self.stats = Stats()
        self.acked: set[int] = set()
        self.pongs: set[int] = set()
        self.receipts: dict[str, codec.Receipt] = {}  # receipt id → the RCPT (RACKed)
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._seq = 0
        self._stop = threading.Event()
        self._fd: int | None = port if isinstance(port, int) else None
        self._ser: object | None = None
        self._thread = threading.Thread(target=self._run, name="device", daemon=True)
        self._hello_seq: int | None = None

    # --- public -----------------------------------------------------------------

    def start(self) -> Device:
        if self._fd is None:
            import serial

            self._ser = serial.serial_for_url(str(self.port), baudrate=self.baudrate, timeout=0.05)
        self.hello()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        if self._ser is not None:
            self._ser.close()  # type: ignore[attr-defined]

    def reattach(self, fd: int) -> None:
        """The cable was replugged: talk over a new pty master."""
        with self._lock:
            self._fd = fd
            for p in self._pending.values():
                p.due = 0.0

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def hello(self) -> int:
        with self._lock:
            seq = self._next_seq()
            self._hello_seq = seq
            frame = codec.encode(codec.Hello(seq, self.device_id, self.fw, self.boot_id))
            self._pending[seq] = _Pending(frame, 0.0, self.retry_min)
        return seq

    def alert(self, sensor: str, severity: str, message: str, receipt: str | None = None) -> int:
        """Queue an ALERT (an ALERTR with `receipt`: its RCPT lands in `receipts`)."""
        with self._lock:
            seq = self._next_seq()
            frame = codec.encode(codec.Alert(seq, sensor, severity, message, receipt))
            self._pending[seq] = _Pending(frame, 0.0, self.retry_min)
        return seq

    def ping(self) -> int:
        with self._lock:
            seq = self._next_seq()
        self._write(codec.encode(codec.Ping(seq)))
        return seq

    @property
    def unacked(self) -> int:
        with self._lock:
            return len(self._pending)

    def wait_acked(self, seqs: set[int] | None = None, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                done = (not self._pending) if seqs is None else seqs <= self.acked
                if done:
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 0.2))

    # --- the line ---------------------------------------------------------------

    def _mangle(self, data: bytes) -> bytes:
        if not self.corrupt:
            return data
        out = bytearray(data)
        for i in range(len(out)):
            if self.rng.random() < self.corrupt:
                out[i] ^= 1 << self.rng.randrange(8)
        return bytes(out)

    def _write(self, data: bytes) -> None:
        data = self._mangle(data)
        try:
            if self._fd is not None:
                os.write(self._fd, data)
            elif self._ser is not None:
                self._ser.write(data)  # type: ignore[attr-defined]
            self.stats.sent_frames += 1
        except OSError:
            pass  # unplugged: the frame stays pending and is retransmitted

    def _read(self) -> bytes:
        try:
            if self._fd is not None:
                ready, _, _ = select.select([self._fd], [], [], 0.05)
                return os.read(self._fd, 4096) if ready else b""
            if self._ser is not None:
                return self._ser.read(4096)  # type: ignore[attr-defined, no-any-return]
        except OSError:
            time.sleep(0.05)
        return b""

    def _run(self) -> None:
        decoder = codec.Decoder()
        while not self._stop.is_set():
            self._retransmit()
            data = self._read()
            if not data:
                continue
            mangled = self._mangle(data)
            if mangled != data:
                self.stats.corrupt_in += 1
            for event in decoder.feed(mangled):
                self._on(event)

    def _retransmit(self) -> None:
        now = time.monotonic()
        with self._lock:
            due = [(seq, p) for seq, p in sorted(self._pending.items()) if p.due <= now]
            for _, p in due:
                if p.sent:
                    self.stats.retransmits += 1
                p.sent += 1
                p.due = now + p.backoff * self.rng.uniform(0.8, 1.2)
                p.backoff = min(self.retry_max, p.backoff * 2)
        for _, p in due:
            self._write(p.frame)

    def _on(self, event: codec.Event) -> None:
        if isinstance(event, codec.Ack):
            with self._changed:
                if self._pending.pop(event.seq, None) is not None:
                    self.acked.add(event.seq)
                self._changed.notify_all()
        elif isinstance(event, codec.Nak):
            self.stats.naks[event.reason] = self.stats.naks.get(event.reason, 0) + 1
            with self._lock:
                if event.reason == "HELLO" and self._hello_seq not in self._pending:
                    seq = self._next_seq()
                    self._hello_seq = seq
                    frame = codec.encode(codec.Hello(seq, self.device_id, self.fw, self.boot_id))
                    self._pending[seq] = _Pending(frame, 0.0, self.retry_min)
                p = self._pending.get(event.seq) if event.seq is not None else None
                if p is not None and event.reason in ("CRC", "FULL", "HELLO"):
                    p.due = time.monotonic() + (0.05 if event.reason != "FULL" else p.backoff)
        elif isinstance(event, codec.Pong):
            with self._lock:
                self.pongs.add(event.seq)
        elif isinstance(event, codec.Receipt):
            with self._changed:
                self.receipts[event.receipt] = event  # a repeat is the same: RACKed again
                self._changed.notify_all()
            self._write(codec.encode(codec.ReceiptAck(event.receipt)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m firmware_bridge.device",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("port", nargs="?", help="serial device or pyserial URL")
    p.add_argument("--frame", help="print BODY as a complete frame with its CRC, and exit")
    p.add_argument("--alerts", type=int, default=5)
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--device-id", default="sim-1")
    args = p.parse_args(argv)
    if args.frame:
        body = args.frame.encode()
        sys.stdout.write(f"${args.frame}*{crc16(body):04X}\n")
        return 0
    if not args.port:
        p.error("give a PORT, or --frame BODY")
    dev = Device(args.port, device_id=args.device_id).start()
    try:
        for i in range(args.alerts):
            seq = dev.alert("temp", "warning", f"simulated alert {i}")
            ok = dev.wait_acked({seq}, timeout=30)
            print(f"ALERT seq {seq}: {'ACK' if ok else 'no ACK within 30 s'}")
            time.sleep(args.interval)
    finally:
        dev.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
