"""The serial wire protocol v1, sans-IO: bytes in, events out; frames in, bytes out.

    $<BODY>*<CRC>\\r\\n    CRC = 4 upper-case hex digits, CRC-16/CCITT-FALSE of BODY

No serial port here: the transport feeds whatever bytes it read, in chunks of
any size, and acts on the events. The same code serves the gateway and the
simulated device. See PROTOCOL.md (normative).

Robustness against a noisy or hostile line, after h11's receive buffer:
- Memory is bounded: the buffer never holds more than MAX_LINE bytes of an
  unterminated line; longer input is discarded up to the next newline and
  reported once as SIZE.
- Work is O(n) in bytes fed: each byte is scanned for the newline once
  (`_scanned` remembers how far we looked), never rescanned per chunk.
- Nothing is an ALERT unless its CRC checks: a flipped bit is a CRC error, and
  the frame is dropped and NAKed, never "repaired".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from firmware_bridge.crc import crc16

MAX_LINE = 512
MAX_SEQ = 2**32 - 1


class Reason(StrEnum):
    CRC = "CRC"
    PARSE = "PARSE"
    SIZE = "SIZE"
    FULL = "FULL"
    HELLO = "HELLO"  # an ALERT before this boot's HELLO: re-send HELLO, then the ALERT
    TYPE = "TYPE"


@dataclass(frozen=True, slots=True)
class Hello:
    seq: int
    device_id: str
    fw_version: str
    boot_id: str


@dataclass(frozen=True, slots=True)
class Alert:
    seq: int
    sensor: str
    severity: str
    message: str
    # The device's receipt id: sent as ALERTR, it asks for a RCPT once the alert's mail
    # is settled (PROTOCOL.md, Receipts). None: a plain ALERT.
    receipt: str | None = None


@dataclass(frozen=True, slots=True)
class Ping:
    seq: int


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int


@dataclass(frozen=True, slots=True)
class Nak:
    seq: int | None  # None: the frame was unreadable ('-' on the wire)
    reason: str


@dataclass(frozen=True, slots=True)
class Pong:
    seq: int


@dataclass(frozen=True, slots=True)
class Receipt:
    """Gateway → device: what became of the alert sent with this receipt id."""

    receipt: str
    outcome: str  # SENT (the smarthost accepted the mail) | DEAD (dead-lettered)
    alert_id: str  # the gateway's id of the alert
    reason: str  # the server's reply for DEAD (may be empty); runs to the last '*'


@dataclass(frozen=True, slots=True)
class ReceiptAck:
    """Device → gateway: the RCPT with this receipt id arrived; not sent again."""

    receipt: str


@dataclass(frozen=True, slots=True)
class FrameError:
    """A line that is not a valid frame; `seq` when it could be read, for the NAK."""

    reason: Reason
    seq: int | None
    detail: str


Frame = Hello | Alert | Ping | Ack | Nak | Pong | Receipt | ReceiptAck
Event = Frame | FrameError

_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
# A receipt id: the identifier alphabet, up to 128 characters (what the gateway accepts
# as an MQTT correlation id too); an ALERTR with a longer one is a PARSE error.
MAX_RECEIPT_ID = 128
_RECEIPT_ID = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_RECEIPT_ID}}}")
_SEVERITIES = ("debug", "info", "warning", "critical")
OUTCOMES = ("SENT", "DEAD")


# --- encoding ------------------------------------------------------------------------


def _field(value: str, name: str, last: bool = False) -> str:
    if any(c in value for c in "\r\n$") or (not last and ("," in value or "*" in value)):
        raise ValueError(f"{name} {value!r} contains a character the protocol reserves")
    if not value.isprintable():
        raise ValueError(f"{name} {value!r} contains control characters")
    return value


def encode(frame: Frame) -> bytes:
    """The wire bytes of a frame. Raises ValueError for a frame that cannot be sent."""
    match frame:
        case Hello(seq, device_id, fw, boot):
            fields = [
                "HELLO",
                str(seq),
                _field(device_id, "device id"),
                _field(fw, "fw version"),
                _field(boot, "boot id"),
            ]
        case Alert(seq, sensor, severity, message, receipt):
            fields = ["ALERT", str(seq)]
            if receipt is not None:
                if not _RECEIPT_ID.fullmatch(receipt):
                    raise ValueError(f"receipt id {receipt!r} is not 1-{MAX_RECEIPT_ID} id chars")
                fields = ["ALERTR", str(seq), receipt]
            fields += [
                _field(sensor, "sensor"),
                _field(severity, "severity"),
                _field(message, "message", last=True),
            ]
        case Receipt(receipt, outcome, alert_id, reason):
            if not _RECEIPT_ID.fullmatch(receipt) or outcome not in OUTCOMES:
                raise ValueError(f"not a receipt: {receipt!r} {outcome!r}")
            fields = [
                "RCPT",
                receipt,
                outcome,
                _field(alert_id, "alert id"),
                _field(reason, "reason", last=True),
            ]
        case ReceiptAck(receipt):
            if not _RECEIPT_ID.fullmatch(receipt):
                raise ValueError(f"receipt id {receipt!r} is not 1-{MAX_RECEIPT_ID} id chars")
            fields = ["RACK", receipt]
        case Ping(seq):
            fields = ["PING", str(seq)]
        case Ack(seq):
            fields = ["ACK", str(seq)]
        case Nak(seq, reason):
            fields = ["NAK", "-" if seq is None else str(seq), _field(reason, "reason")]
        case Pong(seq):
            fields = ["PONG", str(seq)]
    seq_value = getattr(frame, "seq", 0)
    if seq_value is not None and not 0 <= seq_value <= MAX_SEQ:
        raise ValueError(f"seq {seq_value} out of range 0..{MAX_SEQ}")
    body = ",".join(fields).encode("utf-8")
    line = b"$" + body + b"*" + f"{crc16(body):04X}".encode() + b"\r\n"
    if len(line) > MAX_LINE:
        raise ValueError(f"frame is {len(line)} bytes; the limit is {MAX_LINE}")
    return line


def encode_acks(seqs: list[int]) -> bytes:
    """The ACKs for these seqs, as encode() gives them: the gateway sends one per alert,
    and the general path costs several times as much."""
    out = []
    for seq in seqs:
        if not 0 <= seq <= MAX_SEQ:
            raise ValueError(f"seq {seq} out of range 0..{MAX_SEQ}")
        body = b"ACK,%d" % seq
        out.append(b"$%s*%04X\r\n" % (body, crc16(body)))
    return b"".join(out)


# --- decoding ------------------------------------------------------------------------


def _seq(text: str) -> int:
    if not text.isdigit() or len(text) > 10:
        raise ValueError(f"seq {text!r} is not a decimal counter")
    value = int(text)
    if value > MAX_SEQ:
        raise ValueError(f"seq {value} out of range")
    return value


def _try_seq(body: str) -> int | None:
    parts = body.split(",", 2)
    if len(parts) >= 2:
        try:
            return _seq(parts[1])
        except ValueError:
            return None
    return None


# The frame nearly every line is: an ALERT in printable ASCII. One match replaces the
# general parser's dozen steps (a fifth of the gateway's CPU per serial alert). It
# accepts a subset of what parse_line accepts, with the same result; anything else,
# including a CRC mismatch, goes the general way.
_ALERT_LINE = re.compile(
    rb"\$(ALERT,([0-9]{1,10}),([A-Za-z0-9._:-]{1,64}),(debug|info|warning|critical),"
    rb"([ -~]*))\*([0-9A-F]{4})\r?"
)


def _fast_alert(line: bytes) -> Alert | None:
    m = _ALERT_LINE.fullmatch(line)
    if m is None:
        return None
    body, seq, sensor, severity, message, crc_text = m.groups()
    value = int(seq)
    if value > MAX_SEQ or int(crc_text, 16) != crc16(body):
        return None
    return Alert(value, sensor.decode("ascii"), severity.decode("ascii"), message.decode("ascii"))


def parse_line(line: bytes) -> Event | None:
    """One line (without its newline) → a frame, an error, or None for blank noise."""
    return _fast_alert(line) or _parse_line(line)


def _parse_line(line: bytes) -> Event | None:
    start = line.find(b"$")
    if start < 0:
        stripped = line.strip()
        if not stripped:
            return None
        return FrameError(Reason.PARSE, None, "no '$' frame start")
    raw = line[start + 1 :].rstrip(b"\r")
    star = raw.rfind(b"*")
    if star < 0 or len(raw) - star - 1 != 4:
        return FrameError(Reason.PARSE, None, "no '*' followed by 4 CRC digits")
    body, crc_text = raw[:star], raw[star + 1 :]
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if not re.fullmatch(rb"[0-9A-F]{4}", crc_text):
        return FrameError(Reason.PARSE, None, "the CRC is not 4 upper-case hex digits")
    if int(crc_text, 16) != crc16(body):
        # The seq of a damaged frame may itself be damaged; offered only as a hint.
        return FrameError(Reason.CRC, _try_seq(text) if text else None, "CRC mismatch")
    if not text:
        return FrameError(Reason.PARSE, None, "the body is not UTF-8")
    if not text.isprintable():
        return FrameError(Reason.PARSE, _try_seq(text), "control characters in the body")
    kind, _, rest = text.partition(",")
    try:
        return _frame(kind, rest)
    except ValueError as exc:
        return FrameError(Reason.PARSE if kind in _KINDS else Reason.TYPE, _try_seq(text), str(exc))


_KINDS = ("HELLO", "ALERT", "ALERTR", "PING", "ACK", "NAK", "PONG", "RCPT", "RACK")


def _frame(kind: str, rest: str) -> Frame:
    if kind == "ALERTR":
        parts = rest.split(",", 2)
        if len(parts) != 3 or not _RECEIPT_ID.fullmatch(parts[1]):
            raise ValueError(f"ALERTR needs seq, a receipt id of 1-{MAX_RECEIPT_ID} id chars, ...")
        a = _frame("ALERT", f"{parts[0]},{parts[2]}")
        assert isinstance(a, Alert)
        return Alert(a.seq, a.sensor, a.severity, a.message, parts[1])
    if kind == "RCPT":
        parts = rest.split(",", 3)
        if len(parts) != 4:
            raise ValueError("RCPT needs receipt id, outcome, alert id, reason")
        receipt, outcome, alert_id, reason = parts
        if not _RECEIPT_ID.fullmatch(receipt) or outcome not in OUTCOMES:
            raise ValueError(f"bad receipt id or outcome {receipt[:16]!r} {outcome[:8]!r}")
        if not alert_id or "*" in alert_id:
            raise ValueError("bad alert id")
        return Receipt(receipt, outcome, alert_id, reason)
    if kind == "RACK":
        if not _RECEIPT_ID.fullmatch(rest):
            raise ValueError("RACK needs a receipt id")
        return ReceiptAck(rest)
    if kind == "ALERT":
        parts = rest.split(",", 3)
        if len(parts) != 4:
            raise ValueError("ALERT needs seq, sensor, severity, message")
        seq, sensor, severity, message = parts
        if not _ID.fullmatch(sensor):
            raise ValueError(f"bad sensor name {sensor!r}")
        if severity not in _SEVERITIES:
            raise ValueError(f"bad severity {severity!r}")
        return Alert(_seq(seq), sensor, severity, message)
    parts = rest.split(",")
    if kind == "HELLO":
        if len(parts) != 4:
            raise ValueError("HELLO needs seq, device id, fw version, boot id")
        seq, device_id, fw, boot = parts
        for name, value in (("device id", device_id), ("fw version", fw), ("boot id", boot)):
            if not _ID.fullmatch(value):
                raise ValueError(f"bad {name} {value!r}")
        return Hello(_seq(seq), device_id, fw, boot)
    if kind in ("PING", "ACK", "PONG"):
        if len(parts) != 1:
            raise ValueError(f"{kind} takes only a seq")
        number = _seq(parts[0])
        return Ping(number) if kind == "PING" else Ack(number) if kind == "ACK" else Pong(number)
    if kind == "NAK":
        if len(parts) != 2:
            raise ValueError("NAK needs seq and reason")
        return Nak(None if parts[0] == "-" else _seq(parts[0]), parts[1])
    raise ValueError(f"unknown frame type {kind[:16]!r}")


class Decoder:
    """Feed bytes as they come; take events. Bounded memory, linear time."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf already known to hold no newline
        self._discarding = False  # inside an over-long line: drop up to the newline

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        buf = self._buf
        buf += data
        # Lines are cut from `pos` on and the consumed head deleted once at the end:
        # deleting each line from the front would move the rest of the chunk every time.
        pos = 0
        while (nl := buf.find(b"\n", max(pos, self._scanned))) >= 0:
            line = bytes(buf[pos:nl])
            pos = nl + 1
            if self._discarding:
                self._discarding = False  # the tail of an over-long line: already reported
                continue
            if len(line) + 1 > self.max_line:
                events.append(
                    FrameError(Reason.SIZE, None, f"line longer than {self.max_line} bytes")
                )
                continue
            event = _fast_alert(line) or _parse_line(line)
            if event is not None:
                events.append(event)
        del buf[:pos]
        self._scanned = len(buf)  # no newline in what is left
        if len(buf) > self.max_line:
            if not self._discarding:
                events.append(
                    FrameError(Reason.SIZE, None, f"line longer than {self.max_line} bytes")
                )
            self._discarding = True
            buf.clear()
            self._scanned = 0
        return events
