"""One serial port's device file: open with backoff, read, and a bounded reply queue.

No protocol here (that is `serial_session.py`) and no select loop (`serial_hub.py`).

- A port that cannot be opened, or disappears (USB unplugged, cable cut), is closed,
  the loss logged once, and reopened with backoff (REOPEN_MIN doubling to REOPEN_MAX)
  until it returns.
- A POSIX tty is read and written through its descriptor directly: pyserial's read()
  costs a Timeout object, an abort pipe and an ioctl per call. A pyserial URL port
  (socket://, rfc2217://) has no descriptor and is read and written by pyserial.
- Replies to a descriptor port are queued and written by the thread that reads it, as
  the device takes them: a device that stops reading holds up nothing else. The queue
  is bounded (MAX_OUT); past it replies are dropped (logged once), which costs the
  device retransmissions, never alerts.
- The write lock keeps a reply from being written to a port being closed, or to
  whatever file reuses its descriptor number next.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys
import termios
import threading
import time

import serial

from gateway.config import SerialSection
from gateway.runtime import Runtime

log = logging.getLogger(__name__)

REOPEN_MIN = 0.5
REOPEN_MAX = 30.0
READ_SIZE = 65536
MAX_OUT = 64 * 1024  # replies queued for a port that is not reading them


class DevicePort:
    """The device file of one configured port; its state shown as `runtime.sources[name]`."""

    def __init__(self, cfg: SerialSection, name: str, runtime: Runtime) -> None:
        self.cfg = cfg
        self.name = name
        self.runtime = runtime
        self.direct = "://" in cfg.port  # a URL: pyserial reads and writes it
        self.next_open = 0.0  # monotonic time of the next attempt while closed
        self._delay = REOPEN_MIN
        self._lost_logged = False
        self._write_lock = threading.Lock()
        self._ser: serial.SerialBase | None = None
        self._fd: int | None = None
        self._out = bytearray()  # replies not yet written (descriptor ports)
        self._out_dropping = False

    @property
    def is_open(self) -> bool:
        return self._ser is not None

    @property
    def fd(self) -> int | None:
        """The descriptor to select on, while open (None for a URL port)."""
        return self._fd

    @property
    def has_replies(self) -> bool:
        return bool(self._out)

    # --- opening and closing -----------------------------------------------------------

    def open(self) -> bool:
        """Open the port, or say so (once) and set when to try again (backoff)."""
        try:
            ser = serial.serial_for_url(
                self.cfg.port,
                baudrate=self.cfg.baudrate,
                timeout=0.2,
                exclusive=True,
                do_not_open=True,
            )
            ser.open()
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
            self.next_open = time.monotonic() + self._delay
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
        with self._write_lock:
            self._ser = ser
            fd = None if self.direct else getattr(ser, "fd", None)
            self._fd = fd if isinstance(fd, int) else None
        self.runtime.sources[self.name] = "connected"
        return True

    def lost(self, exc: BaseException, stopping: bool) -> None:
        """The device is gone: close, say so once (not while stopping), reopen at once."""
        if not stopping:
            log.error(
                "serial port %s (%s) is gone: %s; waiting for it to return",
                self.cfg.port,
                self.cfg.name,
                exc,
            )
            self._lost_logged = True
            self.runtime.sources[self.name] = "absent"
        self.close()
        self.next_open = time.monotonic()  # at once; then with backoff

    def close(self, retry_in: float = 0.0) -> None:
        with self._write_lock:  # not while the writer thread queues or writes a reply
            ser, self._ser, self._fd = self._ser, None, None
            self._out.clear()  # replies for a session that is over
        if ser is not None:
            ser.close()
        if retry_in:
            self.next_open = time.monotonic() + retry_in

    # --- reading (the thread that reads the port) -------------------------------------

    def read(self) -> bytes | None:
        """What has arrived (None: not open). Raises SerialException or OSError when
        the device is gone."""
        fd = self._fd
        if fd is not None:
            data = os.read(fd, READ_SIZE)
            if not data:
                raise serial.SerialException("the device returned no data (unplugged?)")
            return data
        ser = self._ser
        if ser is None:
            return None
        chunk: bytes = ser.read(max(1, ser.in_waiting))  # a URL port: waits up to its timeout
        return chunk

    def in_waiting(self) -> int:
        """Bytes the kernel holds for us on the descriptor (0 if closed or unknown)."""
        fd = self._fd
        if fd is None:
            return 0
        try:
            return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, bytes(4)), sys.byteorder)
        except OSError:
            return 0

    # --- writing ---------------------------------------------------------------------

    def send(self, data: bytes) -> bool:
        """Any thread: a URL port writes `data` now; a descriptor port queues it for
        flush(). True when queued (the reading thread has something to write)."""
        with self._write_lock:  # the port is not closed (nor its fd reused) meanwhile
            ser = self._ser
            if ser is None:
                return False  # the port is gone; the device retransmits to the next session
            if self.direct:
                try:
                    ser.write(data)
                except (serial.SerialException, OSError) as exc:
                    log.debug("could not write to %s: %s", self.cfg.port, exc)
                return False
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
                return False
            self._out += data
            return True

    def flush(self) -> None:
        """Write what is queued, as much as the device takes now (never blocks)."""
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
