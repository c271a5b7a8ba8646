"""A framed serial port's receipts: RCPT frames for its due receipts, until RACKed.

The device asked with ALERTR (firmware_bridge/PROTOCOL.md, Receipts). Each tick of the
port's loop (once a second) sends the port's due receipts while the port is open, and
sends again what the device has not acknowledged with RACK: after RESEND_AFTER, then
twice as long each time up to RESEND_MAX. The line may drop a frame, and a device may
be rebooting, or unplugged for an hour: a receipt is marked published only on its
RACK, never given up on (PROTOCOL.md promises the outcome is kept until the RACK), so
it survives a gateway restart too (at least once; the device recognises a repeat by
its receipt id; an alert mailed on two routes gets its two RCPTs one after the other).
What bounds them is the outbox's cap on kept receipts (MAX_KEPT), and the backoff
bounds what a device that never RACKs costs its line: one frame per RESEND_MAX. A
device that has not RACKed after NOTE_AFTER sends is logged once (does its firmware
answer RCPT?), and sent to all the same.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from firmware_bridge import codec
from gateway.outbox.receipts import count_refused, mark_published, take_due
from gateway.outbox.writer import Writer
from gateway.receipts import SERIAL, Due
from gateway.runtime import Runtime

log = logging.getLogger(__name__)

BATCH = 20  # RCPT frames per tick: a device's UART and buffer are small
RESEND_AFTER = 5.0  # the first resend: a frame lost on a noisy line comes again soon
RESEND_MAX = 30.0  # then backing off to this: a device back from a reboot waits at most this
NOTE_AFTER = 10  # sends without a RACK before the log says so (once per receipt)
_FRAMING = len("$*XXXX\r\n")


def receipt_frame(due: Due) -> codec.Receipt:
    """The RCPT for a due receipt: the reason made one printable line that fits."""
    rid = due.correlation.decode("ascii", "replace")
    reason = "".join(c if c.isprintable() and c != "$" else " " for c in due.reason or "")
    head = len(f"RCPT,{rid},{due.outcome.upper()},{due.alert_id},".encode())
    room = codec.MAX_LINE - _FRAMING - head
    reason = reason.encode("utf-8")[: max(room, 0)].decode("utf-8", "ignore")
    return codec.Receipt(rid, due.outcome.upper(), due.alert_id, reason)


def resend_after(sends: int) -> float:
    """Seconds from a receipt's `sends`-th send to the next: 5, 10, 20, then 30 for ever."""
    return min(RESEND_AFTER * 2.0 ** max(sends - 1, 0), RESEND_MAX)


@dataclass(slots=True)
class _Sent:
    receipt: str
    at: float
    sends: int
    mark: tuple[int, str, float]  # the Due's: what its RACK marks published


class SerialReceipts:
    def __init__(
        self,
        port_name: str,
        writer: Writer,
        send: Callable[[bytes], object],
        runtime: Runtime | None = None,
    ) -> None:
        self.port_name = port_name
        self.writer = writer
        self.runtime = runtime
        self._send = send
        self._lock = threading.Lock()  # the port's reading thread reports RACKs
        self._sent: dict[tuple[int, str], _Sent] = {}
        self.acknowledged = 0

    async def tick(self, port_open: bool) -> None:
        if self.runtime is not None:
            count_refused(self.runtime)
        if not port_open:
            return
        now = time.monotonic()
        with self._lock:
            waiting = {k for k, s in self._sent.items() if now - s.at < resend_after(s.sends)}
            unanswered = [k for k, s in self._sent.items() if s.sends == NOTE_AFTER]
        if unanswered and not waiting.issuperset(unanswered):
            log.warning(
                "%s: the device has not acknowledged %d receipt(s) (RACK) after %d sends; "
                "they are kept and sent again every %.0f s until it does (does its firmware "
                "answer RCPT with RACK?)",
                self.port_name,
                len(unanswered),
                NOTE_AFTER,
                RESEND_MAX,
            )
        try:
            due = await self.writer.run(
                partial(take_due, origin=SERIAL, limit=BATCH + len(waiting), reply=self.port_name)
            )
        except Exception as exc:  # the outbox cannot be read now: intake goes on
            log.warning("%s: could not read due receipts: %s", self.port_name, exc)
            return
        frames = []
        with self._lock:
            # A RACK names the receipt id alone, and an alert mailed on two routes has
            # two receipts with one id: only one of them is in flight at a time, so a
            # RACK acknowledges the frame the device saw, never one lost on the line.
            flying = {s.receipt: k for k, s in self._sent.items()}
            for d in due:
                if d.key in waiting:
                    continue
                if flying.setdefault(frame_id(d), d.key) != d.key:
                    continue
                try:
                    frame = codec.encode(receipt_frame(d))
                except ValueError as exc:  # cannot happen for a stored request; never stuck
                    log.error(
                        "%s: receipt for %s cannot be framed: %s", self.port_name, d.alert_id, exc
                    )
                    self._mark([d.mark])
                    continue
                frames.append(frame)
                prev = self._sent.get(d.key)
                self._sent[d.key] = _Sent(frame_id(d), now, (prev.sends if prev else 0) + 1, d.mark)
                if len(frames) >= BATCH:
                    break
        if frames:
            self._send(b"".join(frames))

    def device_back(self) -> None:
        """The device said HELLO from a new boot: whatever it had not RACKed it may never
        have kept, so it is sent at the next tick, and the backoff starts again."""
        with self._lock:
            for sent in self._sent.values():
                sent.at, sent.sends = float("-inf"), 0

    def read(self, receipt_ids: Sequence[str]) -> None:
        """RACKs from the device (the port's reading thread)."""
        ids = set(receipt_ids)
        with self._lock:
            keys = [k for k, s in self._sent.items() if s.receipt in ids]
            marks = [self._sent.pop(k).mark for k in keys]
        if keys:
            self.acknowledged += len(keys)
            self._mark(marks)

    def _mark(self, keys: list[tuple[int, str, float]]) -> None:
        self.writer.call(partial(mark_published, keys=keys)).add_done_callback(_logged)


def frame_id(due: Due) -> str:
    return due.correlation.decode("ascii", "replace")


def _logged(fut: object) -> None:
    exc = fut.exception()  # type: ignore[attr-defined]
    if exc is not None:
        log.warning("could not mark serial receipts published (sent again): %s", exc)
