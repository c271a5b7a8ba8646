"""One thread reading every serial port that has a descriptor: select over all of them.

Eight UARTs at full rate deliver a frame every ~0.9 ms between them; a thread per port
would wake for nearly every frame, and the wake-ups and GIL hand-offs would cost more
than the frames. So one thread selects over every port, reads whatever arrived in one
chunk per port (never a syscall per byte), lets each port decode and act on it, and
submits the alerts of the whole pass in one submission: one wake-up of the writer, one
commit, one write of the ACKs per port.

After a pass that read something the hub pauses READ_PAUSE, so that what arrives
meanwhile is read, committed and ACKed together, unless a device is ahead of it
(BACKLOG bytes in one read, or waiting again right after the pass): then it reads on.
Replies are written during the pause as the devices take them.

The thread starts with the first port and ends with the last. A port leaves through
remove(), and the hub closes it: closing a descriptor another thread selects on could
make it read from whatever file reuses the number next.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from collections.abc import Sequence
from typing import Protocol

from gateway.ingest import Ingest
from gateway.outbox.writer import Stored
from gateway.sources.serial_session import Pending

log = logging.getLogger(__name__)

IDLE_POLL = 0.2  # how often a closed port's reopening is looked at, at most
# The latency this adds is under load only (an idle port is read at once): with the
# commit, an ACK leaves within ~0.1 s of its frame, well inside the device's 0.5 s
# retransmit timeout.
READ_PAUSE = 0.1
# A 115200-baud UART delivers ~1,150 bytes in a whole READ_PAUSE: this much means a
# device far faster than a UART (USB), or one sending a backlog, is ahead of us.
BACKLOG = 2048


class Port(Protocol):
    """What the hub asks of a port it reads (`SerialSource`). The hub's thread calls
    every method, except answer(), which the writer's thread calls after the commit."""

    @property
    def fd(self) -> int | None:
        """The descriptor to select on, while the port is open."""

    @property
    def has_replies(self) -> bool:
        """Replies are queued for flush()."""

    def poll_open(self, now: float) -> float | None:
        """Closed: try to open it if its backoff is over. Seconds until the next try while
        it stays closed; None once it is open."""

    def read_ready(self) -> int:
        """The descriptor is readable: read one chunk and act on it. The bytes read; 0 if
        the port was lost (it closes itself and will be reopened by poll_open)."""

    def in_waiting(self) -> int:
        """Bytes waiting on the descriptor now."""

    def take_batch(self) -> list[Pending]:
        """The alerts read since the last call, to submit; the port keeps none of them."""

    def answer(self, batch: Sequence[Pending], result: Stored | BaseException, at: int) -> None:
        """`batch`'s submission is done (`at`: where the batch starts in it): reply."""

    def flush(self) -> None:
        """Write queued replies, as much as the device takes now (never blocks)."""

    def close_port(self) -> None:
        """Close the device file."""


class SerialHub:
    """The reading thread for every descriptor port, submitting through `ingest`."""

    def __init__(self, ingest: Ingest) -> None:
        self.ingest = ingest
        self._lock = threading.Lock()
        self._ports: list[Port] = []
        self._leaving: list[tuple[Port, threading.Event]] = []  # to close, then set
        self._thread: threading.Thread | None = None
        self.died: BaseException | None = None  # what ended the thread, if not the last port
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    def __del__(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    # --- the ports' side (any thread) ------------------------------------------------

    def add(self, port: Port) -> None:
        with self._lock:
            self._ports.append(port)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._guarded, name="serial", daemon=True)
                self._thread.start()
        self.wake()

    def remove(self, port: Port) -> None:
        """Stop reading `port` and close it; returns once its file is closed."""
        left = threading.Event()
        with self._lock:
            if port not in self._ports:
                return
            self._ports.remove(port)
            running = self._thread is not None and self._thread.is_alive()
            if running:
                self._leaving.append((port, left))
        if running and threading.current_thread() is not self._thread:
            self.wake()
            left.wait(5)
        else:
            port.close_port()

    def wake(self) -> None:
        """A port has replies to write (or the port set changed): look again now. A
        no-op in the hub's own thread, which writes replies before it selects again."""
        if threading.current_thread() is self._thread:
            return
        with contextlib.suppress(BlockingIOError):  # already pending: it wakes anyway
            os.write(self._wake_w, b"x")

    def alive(self) -> bool:
        with self._lock:
            return self._thread is not None and self._thread.is_alive()

    # --- the hub's thread --------------------------------------------------------------

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
            for p, left in leaving:
                p.close_port()
                left.set()
            now = time.monotonic()
            waits = [w for p in ports if (w := p.poll_open(now)) is not None]
            by_fd = {fd: p for p in ports if (fd := p.fd) is not None}
            timeout = max(0.0, min([IDLE_POLL, *waits]))
            ready, writable, _ = select.select([self._wake_r, *by_fd], _writers(by_fd), [], timeout)
            self._drain_wake(ready)
            for fd in writable:
                by_fd[fd].flush()
            got = [by_fd[fd].read_ready() for fd in ready if fd != self._wake_r]
            self._submit([(p, batch) for p in ports if (batch := p.take_batch())])
            for p in by_fd.values():
                p.flush()  # this pass's own replies (PONG, NAK, the HELLO's ACK)
            # Not "is anything readable now": with eight busy ports a frame is always
            # just arriving, and the hub would run pass after pass of a frame or two.
            if got and max(got) < BACKLOG and not _behind(by_fd):
                self._pause(by_fd)

    def _submit(self, work: list[tuple[Port, list[Pending]]]) -> None:
        """All ports' alerts of one pass in one submission: one wake-up of the writer."""
        if not work:
            return
        answers = []
        offset = 0
        for p, batch in work:
            answers.append((p, batch, offset))
            offset += len(batch)

        def done(result: Stored | BaseException) -> None:  # the writer's thread
            for p, batch, at in answers:
                p.answer(batch, result, at)

        alerts = [(x.alert, x.key) for _, batch in work for x in batch]
        asks = [x.receipt for _, batch in work for x in batch]
        # No linger: the pause has gathered this pass, and the next is READ_PAUSE away.
        self.ingest.submit(alerts, done, receipts=asks if any(asks) else ())

    def _pause(self, by_fd: dict[int, Port]) -> None:
        """Caught up: let input gather for READ_PAUSE, writing replies meanwhile.

        Not looking for input meanwhile: a wake-up per arriving frame is the cost the
        pause exists to avoid, and a burst is seen at the next pass anyway."""
        deadline = time.monotonic() + READ_PAUSE
        while (left := deadline - time.monotonic()) > 0:
            ready, writable, _ = select.select([self._wake_r], _writers(by_fd), [], left)
            self._drain_wake(ready)
            for fd in writable:
                by_fd[fd].flush()
            with self._lock:
                if self._leaving:
                    return  # a port is leaving: do not keep it waiting

    def _drain_wake(self, ready: list[int]) -> None:
        if self._wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 4096)


def _behind(by_fd: dict[int, Port]) -> bool:
    """Has input piled up on any port (BACKLOG bytes waiting) while we handled the last?"""
    return any(p.fd == fd and p.in_waiting() >= BACKLOG for fd, p in by_fd.items())


def _writers(by_fd: dict[int, Port]) -> list[int]:
    """The ports with replies to write (and still open on that descriptor)."""
    return [fd for fd, p in by_fd.items() if p.has_replies and p.fd == fd]
