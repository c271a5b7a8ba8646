"""The serial session, sans-IO: what the gateway answers a framed device, and when.

Events in: the codec's decoded events (with the stamp of the chunk they were read in)
and, later, the outcome of storing the alerts the session asked to store. Actions out:
frames to send and alerts to store. No port, no thread, no clock of its own: the
transport (`sources/serial.py`) reads, decodes, submits and writes; this decides. Like
`firmware_bridge/codec.py` it is tested by feeding it values.

The rules it keeps:
- Every ALERT gets exactly one answer. Before the device's HELLO: NAK HELLO at once
  (without the boot id a retransmission cannot be told from a new alert). After it:
  nothing until the commit, then ACK if stored or already stored (invariant 1), NAK
  FULL if not stored now (the device retransmits later, which is what it must do),
  NAK PARSE if it can never be stored (retrying would fail forever).
- A retransmission is recognised by its key, port + device id + boot id + seq, which
  the outbox remembers (across restarts too). The port is part of it: two devices on
  two ports may share ids (a boot counter instead of a random boot id) and must never
  have each other's alerts taken for retransmissions.
- Every other frame is answered at once: HELLO → ACK, PING → PONG, a broken frame →
  NAK with the codec's reason, a frame only the gateway sends → NAK TYPE. Each
  rejection is reported, to be counted. A RACK is not answered: it tells the source
  that a receipt arrived (Actions.receipts_read).
- The seq travels beside its alert (`Pending`), never inside the alert's fields: those
  are the mail's, and a value read back out of them could be anything a field can be.
- Memory is bounded: at most MAX_SENSORS sensor names are remembered per port.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from firmware_bridge import codec
from gateway.alert import MAX_MESSAGE_BYTES, Alert, FieldValue, Severity, clean_sensor, new_alert_id
from gateway.clock import Stamp
from gateway.outbox.writer import Stored
from gateway.receipts import SERIAL, Ask

MAX_SENSORS = 256  # a device names a handful of sensors; a hostile one may name endless


@dataclass(frozen=True, slots=True)
class Pending:
    """An alert to store, with what its answer needs."""

    alert: Alert
    key: str  # the retransmission memory's key
    seq: int  # the frame's seq, for the ACK or NAK
    receipt: Ask | None = None  # an ALERTR's request, stored with the alert


@dataclass(slots=True)
class Actions:
    """What to do after a chunk's events: in this order, replies then the alerts."""

    replies: list[codec.Frame] = field(default_factory=list)  # to send now
    alerts: list[Pending] = field(default_factory=list)  # to store, then answer()
    rejected: list[tuple[str, str | None]] = field(default_factory=list)  # counter, detail
    hellos: list[codec.Hello] = field(default_factory=list)  # boots not seen before
    receipts_read: list[str] = field(default_factory=list)  # RACKs: receipt ids delivered


@dataclass(frozen=True, slots=True)
class Answer:
    """The replies to stored alerts: one per alert, ACKs first."""

    acks: list[int]
    naks: list[codec.Nak]


class Session:
    """One framed port's protocol state: the device's boot and the sensors it names.

    receive() is called by the thread that reads the port; answer() reads no state of
    the session, so the writer's thread may call it at the same time.
    """

    def __init__(self, port_name: str) -> None:
        self.port_name = port_name
        self.boot: tuple[str, str] | None = None  # (device id, boot id) from HELLO
        self._topics: dict[str, tuple[str, str]] = {}  # sensor → (clean sensor, topic)
        self._key_prefix = f"port:{port_name}"

    def receive(self, events: Iterable[codec.Event], stamp: Stamp) -> Actions:
        """The events of one chunk, read at `stamp` (every frame in it had arrived by then)."""
        out = Actions()
        for event in events:
            if isinstance(event, codec.Alert):  # nearly every frame: first
                self._alert(event, stamp, out)
            elif isinstance(event, codec.FrameError):
                out.rejected.append((f"serial_{event.reason.value.lower()}", event.detail))
                out.replies.append(codec.Nak(event.seq, event.reason.value))
            elif isinstance(event, codec.Ping):
                out.replies.append(codec.Pong(event.seq))
            elif isinstance(event, codec.Hello):
                boot = (event.device_id, event.boot_id)
                if boot != self.boot:
                    out.hellos.append(event)
                self.boot = boot
                out.replies.append(codec.Ack(event.seq))
            elif isinstance(event, codec.ReceiptAck):
                out.receipts_read.append(event.receipt)
            else:  # ACK/NAK/PONG/RCPT are ours to send, not to receive
                out.rejected.append(("serial_type", None))
                seq = None if isinstance(event, codec.Receipt) else event.seq
                out.replies.append(codec.Nak(seq, codec.Reason.TYPE.value))
        return out

    def _alert(self, frame: codec.Alert, stamp: Stamp, out: Actions) -> None:
        if self.boot is None:
            out.replies.append(codec.Nak(frame.seq, codec.Reason.HELLO.value))
            return
        device_id, boot_id = self.boot
        named = self._topics.get(frame.sensor)
        if named is None:
            if len(self._topics) >= MAX_SENSORS:
                self._topics.clear()
            sensor = clean_sensor(frame.sensor)
            named = self._topics[frame.sensor] = (sensor, f"serial/{self.port_name}/{sensor}")
        # The device, boot and seq stay in the fields as what the mail shows.
        info: dict[str, FieldValue] = {
            "serial_device": device_id,
            "serial_boot": boot_id,
            "serial_seq": frame.seq,
        }
        alert = from_frame(frame, *named, stamp, info)
        key = f"{self._key_prefix}/{device_id}/{boot_id}/{frame.seq}"
        ask = None
        if frame.receipt is not None:  # the codec bounded it (MAX_RECEIPT_ID, id chars)
            ask = Ask(SERIAL, self.port_name, frame.receipt.encode("ascii"))
        out.alerts.append(Pending(alert, key, frame.seq, ask))

    def answer(
        self, batch: Sequence[Pending], result: Stored | BaseException, at: int = 0
    ) -> Answer:
        """The replies to `batch` once its submission is done (the writer's thread).

        `at`: where the batch starts in the submission (several ports may share one), so
        that `result.rejected`'s indexes can be mapped back to this batch's alerts."""
        seqs = [p.seq for p in batch]
        if isinstance(result, BaseException):
            # Not stored, for now (full outbox or disk, locked file).
            return Answer([], [codec.Nak(s, codec.Reason.FULL.value) for s in seqs])
        if not result.rejected:
            return Answer(seqs, [])
        bad = {i - at for i in result.rejected if at <= i < at + len(seqs)}
        return Answer(
            [s for i, s in enumerate(seqs) if i not in bad],
            [codec.Nak(seqs[i], codec.Reason.PARSE.value) for i in sorted(bad)],
        )


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
    """The alert for a decoded ALERT frame: what normalize() would give, without redoing
    the checks the codec has already made on every field (tests hold the two equal)."""
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
