"""Serial ingest: the firmware_bridge protocol over pyserial.

Every port that is a device path is read by one thread for all of them (SerialHub):
select() over their file descriptors, a chunked read of whatever arrived (readline()
would cost a syscall per byte: ~1,200 lines/s on a pty against ~720,000 with chunked
reads), the sans-IO decoder, and the events acted on. A port given as a pyserial URL
(socket://, rfc2217://) has no descriptor to select on and keeps a thread of its own.
An ALERT goes to the outbox writer; its `$ACK` is queued by the writer's callback,
after the group commit (invariant 1), and written by the thread that reads the port,
as the device takes it: a device that stops reading holds up nothing else (its
replies are dropped past MAX_OUT, and it retransmits what has no ACK).
Retransmissions are recognised by (device id, boot id, seq), kept in the outbox, so
a retransmitted alert is ACKed again but stored once, even across a gateway restart.

When the device disappears (USB unplugged, cable cut) the port is closed, the
loss logged once, and the port reopened with backoff until it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
import select
import sys
import termios
import threading
import time

import serial

from firmware_bridge import codec
from gateway.alert import (
    MAX_MESSAGE_BYTES,
    Alert,
    Draft,
    FieldValue,
    Severity,
    clean_sensor,
    new_alert_id,
    normalize,
    parse_severity,
)
from gateway.clock import Stamp
from gateway.config import Config, SerialSection
from gateway.errors import ThreadDied
from gateway.ingest import Ingest
from gateway.status import Runtime
from gateway.writer import Stored

log = logging.getLogger(__name__)

REOPEN_MIN = 0.5
REOPEN_MAX = 30.0
IDLE_POLL = 0.2
# Added latency under load only (an idle port is read at once): with the commit, an
# ACK leaves within ~0.1 s of its frame, well inside the device's 0.5 s retransmit timeout.
READ_PAUSE = 0.1
READ_SIZE = 65536
# This much input in one read, or waiting again right after a pass, means a device is
# ahead of us (a USB device far faster than a UART, or one sending a backlog): read on,
# no pause. A 115200-baud UART delivers ~1,150 bytes in a whole READ_PAUSE.
BACKLOG = 2048
MAX_OUT = 64 * 1024  # replies queued for a port that is not reading them
LINGER = 0.05  # how long a URL port's batch may wait for others to share a commit
MAX_SENSORS = 256  # topics remembered per port (a device names a handful of sensors)
THREAD_CHECK_EVERY = 1.0


class SerialHub:
    """One thread reading every device-path port: select over their descriptors.

    Eight UARTs at full rate deliver a frame every ~0.9 ms between them; a thread per
    port woke for nearly every frame, and the wake-ups and GIL hand-offs cost more
    than the frames. After a pass that read something the hub pauses READ_PAUSE
    (unless a device is ahead: BACKLOG bytes read or waiting again), so what arrives
    meanwhile is read, committed and ACKed together: one batch, one commit, one write
    of the ACKs per port per pass. The thread starts with the first port and ends with
    the last.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ports: list[SerialSource] = []
        self._leaving: list[SerialSource] = []
        self._thread: threading.Thread | None = None
        self.died: BaseException | None = None  # what ended the thread, if not the last port
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    def __del__(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def add(self, port: SerialSource) -> None:
        with self._lock:
            self._ports.append(port)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._guarded, name="serial", daemon=True)
                self._thread.start()
        self._wake()

    def remove(self, port: SerialSource) -> None:
        """Stop reading `port` and close it; returns once its file is closed."""
        with self._lock:
            if port not in self._ports:
                return
            self._ports.remove(port)
            running = self._thread is not None and self._thread.is_alive()
            if running:
                # The hub closes it: closing a descriptor another thread selects on
                # could read from whatever file reuses the number next.
                self._leaving.append(port)
        if running and threading.current_thread() is not self._thread:
            self._wake()
            port._left.wait(5)
        else:
            port._close_port()

    @staticmethod
    def _submit(work: list[tuple[SerialSource, list[tuple[Alert, str]]]]) -> None:
        """All ports' alerts of one pass in one submission: one wake-up of the writer."""
        if not work:
            return
        answers = []
        offset = 0
        for p, batch in work:
            answers.append((p, _seqs(batch), offset))
            offset += len(batch)

        def done(result: Stored | BaseException) -> None:  # the writer's thread
            for p, seqs, at in answers:
                p._answer(seqs, result, at)

        alerts = [(a, key) for _, batch in work for a, key in batch]
        # No linger: the pause has gathered this pass, and the next is READ_PAUSE away.
        work[0][0].ingest.submit(alerts, done)

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # already pending: it wakes anyway
            os.write(self._wake_w, b"x")

    def alive(self) -> bool:
        with self._lock:
            return self._thread is not None and self._thread.is_alive()

    def _guarded(self) -> None:
        try:
            self._run()
        except BaseException as exc:
            self.died = exc
            log.critical("the serial reading thread died: %r", exc, exc_info=exc)
            raise

    def _run(self) -> None:
        while True:
            with self._lock:
                ports = list(self._ports)
                leaving, self._leaving = self._leaving, []
                if not ports and not leaving:
                    self._thread = None
                    return
            for p in leaving:
                p._close_port()
                p._left.set()
            now = time.monotonic()
            for p in ports:
                if p._ser is None and now >= p._next_open:
                    p._try_open()
            by_fd = {p._fd: p for p in ports if p._ser is not None and p._fd is not None}
            waits = [p._next_open - now for p in ports if p._ser is None]
            timeout = max(0.0, min([IDLE_POLL, *waits]))
            ready, writable, _ = select.select([self._wake_r, *by_fd], _writers(by_fd), [], timeout)
            self._drain_wake(ready)
            for fd in writable:
                by_fd[fd]._flush()
            got = [by_fd[fd]._read_ready() for fd in ready if fd != self._wake_r]
            self._submit([(p, p._take_batch()) for p in ports if p._batch])
            for p in by_fd.values():
                p._flush()  # this pass's own replies (PONG, NAK, the HELLO's ACK)
            # Not "is anything readable now": with eight busy ports a frame is always
            # just arriving, and the hub would run pass after pass of a frame or two.
            if got and max(got) < BACKLOG and not _behind(by_fd):
                self._pause(by_fd)

    def _pause(self, by_fd: dict[int, SerialSource]) -> None:
        """Caught up: let input gather for READ_PAUSE, writing replies meanwhile.

        Not looking for bursts meanwhile: waking to look cost more than the frames
        (each wake-up ~0.2 ms here), and a burst is seen at the next pass anyway."""
        deadline = time.monotonic() + READ_PAUSE
        while (left := deadline - time.monotonic()) > 0:
            ready, writable, _ = select.select([self._wake_r], _writers(by_fd), [], left)
            self._drain_wake(ready)
            for fd in writable:
                by_fd[fd]._flush()
            with self._lock:
                if self._leaving:
                    return  # a port is leaving: do not keep it waiting

    def _drain_wake(self, ready: list[int]) -> None:
        if self._wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 4096)


def _behind(by_fd: dict[int, SerialSource]) -> bool:
    """Has input piled up on any port (BACKLOG bytes waiting) while we handled the last?"""
    for fd, p in by_fd.items():
        if p._fd != fd:
            continue  # lost meanwhile
        try:
            waiting = int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, bytes(4)), sys.byteorder)
        except OSError:
            continue
        if waiting >= BACKLOG:
            return True
    return False


def _writers(by_fd: dict[int, SerialSource]) -> list[int]:
    """The ports with replies to write (and still open on that descriptor)."""
    return [fd for fd, p in by_fd.items() if p._out and p._fd == fd]


class SerialSource:
    def __init__(
        self,
        config: Config,
        port: SerialSection,
        ingest: Ingest,
        runtime: Runtime,
        hub: SerialHub | None = None,
    ) -> None:
        self.cfg = port
        self.name = f"serial:{port.name}"
        self.ingest = ingest
        self.runtime = runtime
        # A device path joins the daemon's hub (or a hub of its own); a URL has no
        # descriptor to select on and gets a thread.
        self._hub = (hub or SerialHub()) if "://" not in port.port else None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._left = threading.Event()
        self._write_lock = threading.Lock()
        self._ser: serial.SerialBase | None = None
        self._fd: int | None = None
        self._out = bytearray()  # replies not yet written (device-path ports)
        self._out_dropping = False
        self._decoder = codec.Decoder()
        self._pending = b""  # lines mode: a line not yet complete
        self._next_open = 0.0
        self._delay = REOPEN_MIN
        self._lost_logged = False
        self._boot: tuple[str, str] | None = None  # (device id, boot id) from HELLO
        self._regex = re.compile(port.line_regex) if port.line_regex else None
        self._batch: list[tuple[Alert, str]] = []
        self._stamp: Stamp | None = None  # when the chunk being handled was read
        self._topics: dict[str, tuple[str, str]] = {}  # sensor → (clean sensor, topic)
        self._key_prefix = f"port:{port.name}"
        self.runtime.sources[self.name] = "opening"

    # --- life cycle ----------------------------------------------------------------

    async def run(self) -> None:
        if self._hub is not None:
            self._hub.add(self)
        else:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        try:
            # The reading is done in a thread, watched from here: if it ends while we
            # run, serial intake has stopped, and the daemon must stop too (and restart).
            while True:
                await asyncio.sleep(THREAD_CHECK_EVERY)
                self._check_thread()
        finally:
            self._leave()  # stop reading: nothing new is taken in

    def _check_thread(self) -> None:
        if self._hub is not None:
            alive, why = self._hub.alive(), repr(self._hub.died)
        else:
            alive, why = self._thread is not None and self._thread.is_alive(), "ended"
        if alive or self._stop.is_set():
            self.runtime.threads[self.name] = "alive"
            return
        self.runtime.threads[self.name] = f"dead: {why}"
        self.runtime.sources[self.name] = "stopped (reading thread died)"
        raise ThreadDied(f"the thread reading {self.cfg.port} has died ({why})")

    def close(self) -> None:
        self._leave()
        self._close_port()

    def _leave(self) -> None:
        self._stop.set()
        if self._hub is not None:
            self._hub.remove(self)
        elif self._thread is not None:
            self._thread.join(5)

    # --- the port, from the thread that reads it -------------------------------------

    def _open(self) -> serial.SerialBase:
        ser = serial.serial_for_url(
            self.cfg.port, baudrate=self.cfg.baudrate, timeout=0.2, exclusive=True, do_not_open=True
        )
        ser.open()
        return ser

    def _try_open(self) -> bool:
        """Open the port, or say so (once) and set when to try again (backoff)."""
        try:
            ser = self._open()
        except (serial.SerialException, OSError, ValueError) as exc:
            if not self._lost_logged:
                log.error(
                    "cannot open serial port %s (%s): %s; retrying with backoff up to every %.0f s",
                    self.cfg.port,
                    self.cfg.name,
                    exc,
                    REOPEN_MAX,
                )
                self._lost_logged = True
            self.runtime.sources[self.name] = "absent"
            self._next_open = time.monotonic() + self._delay
            self._delay = min(REOPEN_MAX, self._delay * 2)
            return False
        if self._lost_logged:
            log.warning("serial port %s (%s) is back", self.cfg.port, self.cfg.name)
        else:
            log.info(
                "reading serial port %s (%s) at %d baud, %s protocol",
                self.cfg.port,
                self.cfg.name,
                self.cfg.baudrate,
                self.cfg.protocol,
            )
        self._lost_logged = False
        self._delay = REOPEN_MIN
        self._decoder = codec.Decoder()
        self._pending = b""
        with self._write_lock:
            self._ser = ser
            # A POSIX tty: read and write the descriptor directly. pyserial's read()
            # costs a Timeout object, an abort pipe and an ioctl per call.
            fd = getattr(ser, "fd", None)
            self._fd = fd if isinstance(fd, int) else None
        self.runtime.sources[self.name] = "connected"
        return True

    def _lost(self, exc: BaseException) -> None:
        if not self._stop.is_set():
            log.error(
                "serial port %s (%s) is gone: %s; waiting for it to return",
                self.cfg.port,
                self.cfg.name,
                exc,
            )
            self._lost_logged = True
            self.runtime.sources[self.name] = "absent"
        self._close_port()
        self._next_open = time.monotonic()  # at once; then with backoff

    def _close_port(self) -> None:
        with self._write_lock:  # not while the writer thread writes an ACK to it
            ser, self._ser, self._fd = self._ser, None, None
            self._out.clear()  # replies for a session that is over
        if ser is not None:
            ser.close()

    def _read_ready(self) -> int:
        """The hub saw the descriptor readable: read and handle it. Returns how many
        bytes were read (0: the port is lost)."""
        fd = self._fd
        if fd is None:
            return 0
        try:
            data = os.read(fd, READ_SIZE)
            if not data:
                raise serial.SerialException("the device returned no data (unplugged?)")
            self._on_data(data)
        except (serial.SerialException, OSError) as exc:
            self._lost(exc)
            return 0
        except Exception:
            # A bug must not end the thread that reads every port: say so, and start
            # this port afresh (a new decoder resynchronises on the next frame).
            log.exception("%s: failed handling input; reopening the port", self.name)
            self._close_port()
            self._next_open = time.monotonic() + REOPEN_MIN
            return 0
        return len(data)

    def _run(self) -> None:  # a URL port's own thread
        try:
            self._run_url()
        except BaseException as exc:
            log.critical("%s: the reading thread died: %r", self.name, exc, exc_info=exc)
            raise

    def _run_url(self) -> None:
        while not self._stop.is_set():
            ser = self._ser
            if ser is None:
                left = self._next_open - time.monotonic()
                if left > 0:
                    self._stop.wait(left)
                elif not self._try_open():
                    continue
                continue
            try:
                data = ser.read(max(1, ser.in_waiting))
                if data:
                    self._on_data(data)
                    if self._batch:
                        self._submit(self._take_batch())
            except (serial.SerialException, OSError) as exc:
                self._lost(exc)
        self._close_port()

    def _on_data(self, data: bytes) -> None:
        if self.cfg.protocol == "lines":
            self._pending = self._lines(self._pending + data)
            return
        # Every frame in the chunk had arrived by the time it was read: one stamp.
        self._stamp = Stamp.now()
        for event in self._decoder.feed(data):
            self._handle(event)  # alerts collect in self._batch, submitted by the reader

    # --- framed protocol ---------------------------------------------------------------

    def _send(self, frame: codec.Frame) -> None:
        self._send_all([frame])

    def _send_all(self, frames: list[codec.Frame]) -> None:
        self._send_bytes(b"".join(codec.encode(f) for f in frames))

    def _send_bytes(self, data: bytes) -> None:
        """Queue replies for the port (any thread); the thread that reads it writes them."""
        hub = self._hub
        with self._write_lock:  # the port is not closed (nor its fd reused) meanwhile
            ser = self._ser
            if ser is None:
                return  # the port is gone; the device retransmits to the next session
            if hub is None:  # a URL port: pyserial writes it
                try:
                    ser.write(data)
                except (serial.SerialException, OSError) as exc:
                    log.debug("could not write to %s: %s", self.cfg.port, exc)
                return
            if len(self._out) + len(data) > MAX_OUT:
                # The device is not reading: a thread blocked on it would hold up every
                # other port and source. Dropped replies cost retransmissions, not alerts.
                if not self._out_dropping:
                    self._out_dropping = True
                    log.warning(
                        "%s: the device is not reading its replies; dropping them until it "
                        "does (it retransmits the alerts it has no ACK for)",
                        self.cfg.port,
                    )
                return
            self._out += data
        if threading.current_thread() is not hub._thread:
            hub._wake()

    def _flush(self) -> None:
        """Write what is queued, as much as the device takes now (the hub's thread)."""
        with self._write_lock:
            fd = self._fd
            if fd is None or not self._out:
                return
            try:
                sent = os.write(fd, self._out)
            except BlockingIOError:
                return
            except OSError as exc:
                log.debug("could not write to %s: %s", self.cfg.port, exc)
                self._out.clear()
                return
            del self._out[:sent]
            if not self._out and self._out_dropping:
                self._out_dropping = False
                log.info("%s: the device reads its replies again", self.cfg.port)

    def _handle(self, event: codec.Event) -> None:
        if isinstance(event, codec.Alert):
            self._alert(event)
        elif isinstance(event, codec.FrameError):
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
        else:  # ACK/NAK/PONG are ours to send, not to receive
            self.runtime.reject("serial_type")
            self._send(codec.Nak(getattr(event, "seq", None), codec.Reason.TYPE.value))

    def _alert(self, frame: codec.Alert) -> None:
        if self._boot is None:
            # Without the boot id a retransmission cannot be told from a new alert.
            self._send(codec.Nak(frame.seq, codec.Reason.HELLO.value))
            return
        device_id, boot_id = self._boot
        named = self._topics.get(frame.sensor)
        if named is None:
            if len(self._topics) >= MAX_SENSORS:
                self._topics.clear()
            sensor = clean_sensor(frame.sensor)
            named = self._topics[frame.sensor] = (sensor, f"serial/{self.cfg.name}/{sensor}")
        alert = from_frame(
            frame,
            *named,
            self._stamp or Stamp.now(),
            {"serial_device": device_id, "serial_boot": boot_id, "serial_seq": frame.seq},
        )
        # Collected per read chunk: one submission, one commit, one write of all the ACKs.
        # The port is part of the key: two devices on two ports that share ids (a boot
        # counter instead of a random boot id) must never have each other's alerts
        # taken for retransmissions.
        self._batch.append((alert, f"{self._key_prefix}/{device_id}/{boot_id}/{frame.seq}"))

    def _take_batch(self) -> list[tuple[Alert, str]]:
        batch, self._batch = self._batch, []
        return batch

    def _submit(self, batch: list[tuple[Alert, str]]) -> None:
        seqs = _seqs(batch)
        self.ingest.submit(
            [(a, key) for a, key in batch], lambda r: self._answer(seqs, r), linger=LINGER
        )

    def _answer(self, seqs: list[int], result: Stored | BaseException, at: int = 0) -> None:
        """ACK what was committed (or already stored), NAK FULL what was not, NAK PARSE
        what can never be stored; the writer's thread, after the commit. `at`: where
        these seqs' alerts start in the submitted batch."""
        if isinstance(result, BaseException):
            # Not stored, for now (full disk, locked file): FULL makes the device
            # retransmit later, which is what it needs to do.
            self.runtime.rejected["serial_full"] += len(seqs)
            self._send_all([codec.Nak(s, codec.Reason.FULL.value) for s in seqs])
        elif result.rejected:
            bad = {i - at for i in result.rejected if at <= i < at + len(seqs)}
            good = [s for i, s in enumerate(seqs) if i not in bad]
            if good:
                self._send_bytes(codec.encode_acks(good))
            self._send_all([codec.Nak(seqs[i], codec.Reason.PARSE.value) for i in sorted(bad)])
        else:
            self._send_bytes(codec.encode_acks(seqs))

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


# A decoded frame's message is printable text (no control characters) of at most a
# line's length, so normalize() would change nothing: the frame is taken as it is.
assert codec.MAX_LINE < MAX_MESSAGE_BYTES


def from_frame(
    frame: codec.Alert,
    sensor: str,
    topic: str,
    stamp: Stamp,
    fields: dict[str, FieldValue],
) -> Alert:
    """The alert for a decoded ALERT frame: what normalize() would give, for a fifth of
    the work (the codec has already checked every field; tests hold the two equal)."""
    return Alert(
        new_alert_id(stamp.wall),
        topic,
        "serial",
        sensor,
        Severity[frame.severity.upper()],  # the codec admits only the four names
        frame.message,
        stamp,
        None,
        fields,
    )


def _seqs(batch: list[tuple[Alert, str]]) -> list[int]:
    return [int(a.fields["serial_seq"] or 0) for a, _ in batch]


def _ignore(result: Stored | BaseException) -> None:
    if isinstance(result, BaseException):
        log.error("lines mode: could not store alerts (legacy devices get no NAK): %s", result)
