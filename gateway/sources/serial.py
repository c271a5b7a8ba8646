"""Serial ingest: the firmware_bridge protocol over pyserial, one thread per port.

A port's thread reads in chunks (readline() would cost a syscall per byte: ~1,200
lines/s on a pty against ~720,000 with chunked reads), feeds the sans-IO decoder
and acts on its events. An ALERT goes to the outbox writer; `$ACK` is written from
the writer's callback, after the group commit (invariant 1). Retransmissions are
recognised by (device id, boot id, seq), kept in the outbox, so a retransmitted
alert is ACKed again but stored once, even across a gateway restart.

When the device disappears (USB unplugged, cable cut) the port is closed, the
loss logged once, and the port reopened with backoff until it returns.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import select
import threading
import time

import serial

from firmware_bridge import codec
from gateway.alert import Alert, Draft, Severity, clean_sensor, normalize, parse_severity
from gateway.config import Config, SerialSection
from gateway.errors import OutboxFull
from gateway.ingest import Ingest
from gateway.status import Runtime

log = logging.getLogger(__name__)

REOPEN_MIN = 0.5
REOPEN_MAX = 30.0
# Added latency under load only (an idle port is read at once); well inside the
# device's 0.5 s retransmit timeout.
READ_PAUSE = 0.05
READ_SIZE = 65536
WRITE_WAIT = 1.0
LINGER = 0.05  # how long a batch may wait for other ports' to share a commit


class SerialSource:
    def __init__(
        self, config: Config, port: SerialSection, ingest: Ingest, runtime: Runtime
    ) -> None:
        self.cfg = port
        self.name = f"serial:{port.name}"
        self.ingest = ingest
        self.runtime = runtime
        self._stop = threading.Event()
        self._write_lock = threading.Lock()
        self._ser: serial.SerialBase | None = None
        self._boot: tuple[str, str] | None = None  # (device id, boot id) from HELLO
        self._regex = re.compile(port.line_regex) if port.line_regex else None
        self._batch: list[tuple[Alert, str]] = []
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self.runtime.sources[self.name] = "opening"

    # --- life cycle ----------------------------------------------------------------

    async def run(self) -> None:
        self._thread.start()
        try:
            await asyncio.Event().wait()  # the thread does the work; we wait to be cancelled
        finally:
            self._stop.set()  # stop reading: nothing new is taken in

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        ser, self._ser = self._ser, None
        if ser is not None:
            ser.close()

    # --- the port's thread -----------------------------------------------------------

    def _open(self) -> serial.SerialBase:
        ser = serial.serial_for_url(
            self.cfg.port, baudrate=self.cfg.baudrate, timeout=0.2, exclusive=True, do_not_open=True
        )
        ser.open()
        return ser

    def _run(self) -> None:
        delay = REOPEN_MIN
        lost_logged = False
        while not self._stop.is_set():
            try:
                self._ser = self._open()
            except (serial.SerialException, OSError, ValueError) as exc:
                if not lost_logged:
                    log.error(
                        "cannot open serial port %s (%s): %s; retrying with backoff "
                        "up to every %.0f s",
                        self.cfg.port,
                        self.cfg.name,
                        exc,
                        REOPEN_MAX,
                    )
                    lost_logged = True
                self.runtime.sources[self.name] = "absent"
                self._stop.wait(delay)
                delay = min(REOPEN_MAX, delay * 2)
                continue
            if lost_logged:
                log.warning("serial port %s (%s) is back", self.cfg.port, self.cfg.name)
            else:
                log.info(
                    "reading serial port %s (%s) at %d baud, %s protocol",
                    self.cfg.port,
                    self.cfg.name,
                    self.cfg.baudrate,
                    self.cfg.protocol,
                )
            lost_logged = False
            delay = REOPEN_MIN
            self.runtime.sources[self.name] = "connected"
            try:
                self._read_loop(self._ser)
            except (serial.SerialException, OSError) as exc:
                if not self._stop.is_set():
                    log.error(
                        "serial port %s (%s) is gone: %s; waiting for it to return",
                        self.cfg.port,
                        self.cfg.name,
                        exc,
                    )
                    lost_logged = True
                    self.runtime.sources[self.name] = "absent"
            finally:
                ser, self._ser = self._ser, None
                if ser is not None:
                    ser.close()

    def _read_loop(self, ser: serial.SerialBase) -> None:
        decoder = codec.Decoder()
        pending = b""
        fd = getattr(ser, "fd", None)  # a POSIX tty; URLs (socket://, rfc2217://) have none
        while not self._stop.is_set():
            if fd is not None:
                # select + read directly: pyserial's read() costs a Timeout object, an
                # abort pipe and an ioctl per call, which showed at 144 frames/s per port.
                ready, _, _ = select.select([fd], [], [], 0.2)
                if not ready:
                    continue
                data = os.read(fd, READ_SIZE)
                if not data:
                    raise serial.SerialException("the device returned no data (unplugged?)")
            else:
                data = ser.read(max(1, ser.in_waiting))
                if not data:
                    continue
            if self.cfg.protocol == "lines":
                pending = self._lines(pending + data)
                continue
            self._batch = []
            for event in decoder.feed(data):
                self._handle(event)
            if self._batch:
                self._submit(self._batch)
            if fd is not None and not select.select([fd], [], [], 0)[0]:
                # Caught up (with more waiting, read on at once). A UART delivers a frame
                # every ~7 ms at full rate: waking for each one cost more than handling
                # it. What arrives during the pause waits in the kernel's buffer and is
                # read, committed and ACKed as one batch.
                self._stop.wait(READ_PAUSE)

    # --- framed protocol ---------------------------------------------------------------

    def _send(self, frame: codec.Frame) -> None:
        self._send_all([frame])

    def _send_all(self, frames: list[codec.Frame]) -> None:
        ser = self._ser
        if ser is None:
            return  # the port is gone; the device retransmits to the next session
        data = b"".join(codec.encode(f) for f in frames)
        fd = getattr(ser, "fd", None)
        try:
            with self._write_lock:
                if fd is None:
                    ser.write(data)
                    return
                # Straight to the fd: pyserial's write() costs a Timeout object and
                # more syscalls per call. A device that stops reading must not hold the
                # writer thread (every source shares it) for long: after WRITE_WAIT the
                # rest is dropped, and the device retransmits what it has no ACK for.
                left = _write_fd(fd, data, WRITE_WAIT)
                if left:
                    log.warning(
                        "%s: the device is not reading; %d bytes of replies dropped "
                        "(it retransmits the alerts it has no ACK for)",
                        self.cfg.port,
                        left,
                    )
        except (serial.SerialException, OSError) as exc:
            log.debug("could not write to %s: %s", self.cfg.port, exc)

    def _handle(self, event: codec.Event) -> None:
        if isinstance(event, codec.FrameError):
            self.runtime.reject(f"serial_{event.reason.value.lower()}")
            log.debug("%s: rejected a frame: %s", self.cfg.name, event.detail)
            self._send(codec.Nak(event.seq, event.reason.value))
        elif isinstance(event, codec.Ping):
            self._send(codec.Pong(event.seq))
        elif isinstance(event, codec.Hello):
            if self._boot != (event.device_id, event.boot_id):
                log.info(
                    "%s: device %s (firmware %s) says hello, boot %s",
                    self.cfg.name,
                    event.device_id,
                    event.fw_version,
                    event.boot_id,
                )
            self._boot = (event.device_id, event.boot_id)
            self._send(codec.Ack(event.seq))
        elif isinstance(event, codec.Alert):
            self._alert(event)
        else:  # ACK/NAK/PONG are ours to send, not to receive
            self.runtime.reject("serial_type")
            self._send(codec.Nak(getattr(event, "seq", None), codec.Reason.TYPE.value))

    def _alert(self, frame: codec.Alert) -> None:
        if self._boot is None:
            # Without the boot id a retransmission cannot be told from a new alert.
            self._send(codec.Nak(frame.seq, codec.Reason.HELLO.value))
            return
        device_id, boot_id = self._boot
        sensor = clean_sensor(frame.sensor)
        alert = normalize(
            frame.message,
            Draft(
                topic=f"serial/{self.cfg.name}/{sensor}",
                source="serial",
                sensor=sensor,
                severity=parse_severity(frame.severity) or Severity.WARNING,
            ),
            parse_json=False,
            fields={"serial_device": device_id, "serial_boot": boot_id, "serial_seq": frame.seq},
        )
        # Collected per read chunk: one submission, one commit, one write of all the ACKs.
        self._batch.append((alert, f"{device_id}/{boot_id}/{frame.seq}"))

    def _submit(self, batch: list[tuple[Alert, str]]) -> None:
        seqs = [int(a.fields["serial_seq"] or 0) for a, _ in batch]

        def done(result: list[str] | BaseException) -> None:  # the writer's thread
            if isinstance(result, BaseException):
                if not isinstance(result, OutboxFull):
                    log.error("could not store alerts from %s: %s", self.cfg.name, result)
                self.runtime.rejected["serial_full"] += len(seqs)
                replies: list[codec.Frame] = [codec.Nak(s, codec.Reason.FULL.value) for s in seqs]
            else:
                replies = [codec.Ack(s) for s in seqs]
            self._send_all(replies)

        self.ingest.submit([(a, key) for a, key in batch], done, linger=LINGER)

    # --- legacy lines ----------------------------------------------------------------------

    def _lines(self, data: bytes) -> bytes:
        *complete, rest = data.split(b"\n")
        if len(rest) > codec.MAX_LINE:
            self.runtime.reject("serial_size")
            rest = b""
        batch = []
        for raw in complete:
            text = raw.rstrip(b"\r").decode("utf-8", "replace").strip()
            if not text:
                continue
            sensor, severity, message = self.cfg.sensor, self.cfg.severity, text
            m = self._regex.search(text) if self._regex else None
            if m:
                groups = m.groupdict()
                sensor = groups.get("sensor") or sensor
                severity = groups.get("severity") or severity
                message = groups.get("message") or text
            sensor = clean_sensor(sensor)
            batch.append(
                (
                    normalize(
                        message,
                        Draft(
                            topic=f"serial/{self.cfg.name}/{sensor}",
                            source="serial",
                            sensor=sensor,
                            severity=parse_severity(severity) or Severity.WARNING,
                        ),
                        parse_json=False,
                    ),
                    None,
                )
            )
        if batch:
            self.ingest.submit(batch, _ignore)
        return rest


def _write_fd(fd: int, data: bytes, wait: float) -> int:
    """Write to a non-blocking fd, waiting up to `wait` s for room; return bytes unsent."""
    view = memoryview(data)
    deadline = time.monotonic() + wait
    while view:
        try:
            view = view[os.write(fd, view) :]
            continue
        except BlockingIOError:
            pass
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([], [fd], [], left)[1]:
            break
    return len(view)


def _ignore(result: list[str] | BaseException) -> None:
    if isinstance(result, BaseException):
        log.error("lines mode: could not store alerts (legacy devices get no NAK): %s", result)
