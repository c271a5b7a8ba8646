"""Serial ingest: the firmware_bridge protocol over pyserial, one `SerialSource` per port.

The rooms:
- `serial_port.py`: the device file (open with backoff, read, a bounded reply queue);
- `serial_session.py`: the framed protocol's decisions, sans-IO (what to store, what
  to answer, and when);
- `serial_hub.py`: the one thread that reads every port with a descriptor;
- here: a port's life (run, watched, closed), the bytes read turned into events for the
  session and its actions carried out, the legacy lines mode, and a URL port's own
  thread (socket://, rfc2217:// have no descriptor to select on).

An ALERT is submitted to the outbox writer; its `$ACK` is queued by the writer's
callback, after the group commit (invariant 1), and written by the thread that reads
the port.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Sequence

import serial

from firmware_bridge import codec
from gateway.alert import Alert, Draft, Severity, clean_sensor, normalize, parse_severity
from gateway.clock import Stamp
from gateway.config import Config, SerialSection
from gateway.errors import ThreadDied
from gateway.ingest import Ingest
from gateway.outbox.writer import Stored
from gateway.runtime import Runtime
from gateway.sources.serial_hub import SerialHub
from gateway.sources.serial_port import REOPEN_MIN, DevicePort
from gateway.sources.serial_receipts import SerialReceipts
from gateway.sources.serial_session import Actions, Pending, Session

__all__ = ["SerialHub", "SerialSource"]

log = logging.getLogger(__name__)

LINGER = 0.05  # how long a URL port's batch may wait for others to share a commit
THREAD_CHECK_EVERY = 1.0


class SerialSource:
    """One configured port. A device path is read by `hub` (or a hub of its own), a URL
    by a thread of its own; either way run() watches the reading thread. The methods
    under "the hub's interface" are `serial_hub.Port`."""

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
        self._port = DevicePort(port, self.name, runtime)
        self._hub: SerialHub | None = None
        if not self._port.direct:
            self._hub = hub or SerialHub(ingest)
            if self._hub.ingest is not ingest:
                raise ValueError("a serial hub submits for all its ports to one Ingest")
        self._thread: threading.Thread | None = None  # a URL port's
        self._stop = threading.Event()
        self._decoder = codec.Decoder()
        self._session = Session(port.name)
        self._batch: list[Pending] = []  # read, not yet submitted
        self._pending = b""  # lines mode: a line not yet complete
        self._regex = re.compile(port.line_regex) if port.line_regex else None
        self.receipts = SerialReceipts(port.name, ingest.writer, self._send, self.runtime)
        self.runtime.sources[self.name] = "opening"

    # --- life cycle ----------------------------------------------------------------

    async def run(self) -> None:
        if self._hub is not None:
            self._hub.add(self)
        else:
            self._thread = threading.Thread(target=self._run_url, name=self.name, daemon=True)
            self._thread.start()
        try:
            # The reading is done in a thread, watched from here: if it ends while we
            # run, serial intake has stopped, and the daemon must stop too (and restart).
            while True:
                await asyncio.sleep(THREAD_CHECK_EVERY)
                self._check_thread()
                if self.cfg.protocol == "framed":
                    await self.receipts.tick(self._port.is_open)
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
        self._port.close()

    def _leave(self) -> None:
        self._stop.set()
        if self._hub is not None:
            self._hub.remove(self)
        elif self._thread is not None:
            self._thread.join(5)

    # --- the hub's interface (serial_hub.Port) ---------------------------------------

    @property
    def fd(self) -> int | None:
        return self._port.fd

    @property
    def has_replies(self) -> bool:
        return self._port.has_replies

    def poll_open(self, now: float) -> float | None:
        port = self._port
        if port.is_open:
            return None
        if now >= port.next_open and self._open():
            return None
        return port.next_open - now

    def read_ready(self) -> int:
        try:
            data = self._port.read()
            if not data:
                return 0
            self._on_data(data)
        except (serial.SerialException, OSError) as exc:
            self._port.lost(exc, stopping=self._stop.is_set())
            return 0
        except Exception:
            # A bug must not end the thread that reads every port: say so, and start
            # this port afresh (a new decoder resynchronises on the next frame).
            log.exception("%s: failed handling input; reopening the port", self.name)
            self._port.close(retry_in=REOPEN_MIN)
            return 0
        return len(data)

    def in_waiting(self) -> int:
        return self._port.in_waiting()

    def take_batch(self) -> list[Pending]:
        batch, self._batch = self._batch, []
        return batch

    def answer(self, batch: Sequence[Pending], result: Stored | BaseException, at: int = 0) -> None:
        """ACK or NAK each alert of `batch` as the session says (the writer's thread)."""
        reply = self._session.answer(batch, result, at)
        data = codec.encode_acks(reply.acks) if reply.acks else b""
        if reply.naks:
            if isinstance(result, BaseException):
                self.runtime.rejected["serial_full"] += len(reply.naks)
            data += b"".join(codec.encode(n) for n in reply.naks)
        if data:
            self._send(data)

    def flush(self) -> None:
        self._port.flush()

    def close_port(self) -> None:
        self._port.close()

    # --- reading ---------------------------------------------------------------------

    def _open(self) -> bool:
        if not self._port.open():
            return False
        self._decoder = codec.Decoder()  # a new session on the line: resynchronise
        self._pending = b""
        return True

    def _run_url(self) -> None:
        """A URL port's own thread: read, act, submit each chunk's alerts at once."""
        try:
            while not self._stop.is_set():
                wait = self.poll_open(time.monotonic())
                if wait is not None:
                    self._stop.wait(wait)
                    continue
                try:
                    data = self._port.read()
                    if data:
                        self._on_data(data)
                        if self._batch:
                            self._submit_own(self.take_batch())
                except (serial.SerialException, OSError) as exc:
                    self._port.lost(exc, stopping=self._stop.is_set())
            self._port.close()
        except BaseException as exc:
            log.critical("%s: the reading thread died: %r", self.name, exc, exc_info=exc)
            raise

    def _submit_own(self, batch: list[Pending]) -> None:
        def done(result: Stored | BaseException) -> None:
            self.answer(batch, result)

        asks = [p.receipt for p in batch]
        self.ingest.submit(
            [(p.alert, p.key) for p in batch],
            done,
            linger=LINGER,
            receipts=asks if any(asks) else (),
        )

    def _on_data(self, data: bytes) -> None:
        if self.cfg.protocol == "lines":
            self._pending = self._lines(self._pending + data)
            return
        stamp = Stamp.now()  # every frame in the chunk had arrived by the time it was read
        self._act(self._session.receive(self._decoder.feed(data), stamp))

    def _act(self, actions: Actions) -> None:
        for counter, detail in actions.rejected:
            self.runtime.reject(counter)
            if detail is not None:
                log.debug("%s: rejected a frame: %s", self.cfg.name, detail)
        for hello in actions.hellos:
            log.info(
                "%s: device %s (firmware %s) says hello, boot %s",
                self.cfg.name,
                hello.device_id,
                hello.fw_version,
                hello.boot_id,
            )
        if actions.hellos:
            self.receipts.device_back()  # a rebooted device gets its RCPTs again now
        if actions.replies:
            self._send(b"".join(codec.encode(f) for f in actions.replies))
        if actions.receipts_read:
            self.receipts.read(actions.receipts_read)
        # Collected per pass: one submission, one commit, one write of all the ACKs.
        self._batch += actions.alerts

    def _send(self, data: bytes) -> None:
        """Any thread: reply to the device (written by the thread that reads the port)."""
        if self._port.send(data) and self._hub is not None:
            self._hub.wake()

    # --- legacy lines ------------------------------------------------------------------

    def _lines(self, data: bytes) -> bytes:
        """Submit each complete line as an alert (no acks); return the incomplete rest."""
        *complete, rest = data.split(b"\n")
        if len(rest) > codec.MAX_LINE:
            self.runtime.reject("serial_size")
            rest = b""
        batch: list[tuple[Alert, str | None]] = []
        for raw in complete:
            text = raw.rstrip(b"\r").decode("utf-8", "replace").strip()
            if text:
                batch.append((self._line_alert(text), None))
        if batch:
            self.ingest.submit(batch, _ignore)
        return rest

    def _line_alert(self, text: str) -> Alert:
        sensor, severity, message = self.cfg.sensor, self.cfg.severity, text
        m = self._regex.search(text) if self._regex else None
        if m:
            groups = m.groupdict()
            sensor = groups.get("sensor") or sensor
            severity = groups.get("severity") or severity
            message = groups.get("message") or text
        sensor = clean_sensor(sensor)
        draft = Draft(
            topic=f"serial/{self.cfg.name}/{sensor}",
            source="serial",
            sensor=sensor,
            severity=parse_severity(severity) or Severity.WARNING,
        )
        return normalize(message, draft, parse_json=False)


def _ignore(result: Stored | BaseException) -> None:
    if isinstance(result, BaseException):
        log.error("lines mode: could not store alerts (legacy devices get no NAK): %s", result)
