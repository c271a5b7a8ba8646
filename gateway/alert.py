"""The Alert: one normalised event from any source.

Normalisation is where hostile or sloppy input is tamed: everything a sensor
sends is bounded (message size, field count, key names, nesting) before it can
reach the outbox, and what was changed on the way is reported as `notes` so
the source can count it. An alert is never dropped here for being odd; only a
source decides to reject (e.g. an oversized MQTT payload).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from gateway.clock import Stamp

MAX_MESSAGE_BYTES = 8 * 1024
MAX_FIELDS = 64
MAX_FIELD_VALUE = 1024
MAX_SENSOR = 64

FieldValue = str | int | float | bool | None


class Severity(IntEnum):
    DEBUG = 0
    INFO = 1
    WARNING = 2
    CRITICAL = 3

    def __str__(self) -> str:
        return self.name.lower()


_SEVERITY_WORDS = {
    "debug": Severity.DEBUG,
    "trace": Severity.DEBUG,
    "info": Severity.INFO,
    "information": Severity.INFO,
    "notice": Severity.INFO,
    "ok": Severity.INFO,
    "warning": Severity.WARNING,
    "warn": Severity.WARNING,
    "error": Severity.CRITICAL,
    "err": Severity.CRITICAL,
    "critical": Severity.CRITICAL,
    "crit": Severity.CRITICAL,
    "alert": Severity.CRITICAL,
    "emerg": Severity.CRITICAL,
    "emergency": Severity.CRITICAL,
    "fatal": Severity.CRITICAL,
}


def parse_severity(text: str) -> Severity | None:
    """The four severities, plus the syslog words sensors commonly use."""
    return _SEVERITY_WORDS.get(text.strip().lower())


_hex = ""  # random hex digits, used from _hex_at on
_hex_at = 0
_hex_lock = threading.Lock()


def _forget_hex() -> None:
    global _hex
    _hex = ""  # a child must not reuse the parent's random digits


os.register_at_fork(after_in_child=_forget_hex)


def _random_hex(n: int) -> str:
    # os.urandom() is a syscall that gives up the GIL, and getting it back waits on
    # the writer thread: one call per 4 KiB instead of one per alert (ingest was
    # spending more time here than in parsing the MQTT packet).
    global _hex, _hex_at
    with _hex_lock:
        if _hex_at + n > len(_hex):
            _hex, _hex_at = os.urandom(4096).hex(), 0
        out = _hex[_hex_at : _hex_at + n]
        _hex_at += n
    return out


_ms_prefix = (-1, "")  # the last millisecond and its id prefix: alerts come in bursts


def new_alert_id(now: float | None = None) -> str:
    """A time-ordered unique id in UUIDv7 layout (RFC 9562 §5.7).

    48 bits of Unix milliseconds, then 74 random bits. Ordering only holds while
    the wall clock does; nothing relies on it for correctness (the outbox orders
    by its own sequence), it just makes ids sort roughly by age for a human.
    """
    global _ms_prefix
    ms = int((time.time() if now is None else now) * 1000) & ((1 << 48) - 1)
    last, prefix = _ms_prefix
    if ms != last:
        t = f"{ms:012x}"
        prefix = f"{t[:8]}-{t[8:]}-7"
        _ms_prefix = (ms, prefix)
    r = _random_hex(19)  # 76 bits: 74 are used (12 + 2 + 12 + 48)
    # Built as text, not as a 128-bit integer: this runs for every alert.
    return f"{prefix}{r[:3]}-{_VARIANT[r[3]]}{r[4:7]}-{r[7:]}"


# The RFC 9562 variant bits 10, then two random bits of the digit.
_VARIANT = {d: "89ab"[int(d, 16) & 3] for d in "0123456789abcdef"}


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# Any line break or control character: for values shown on one line (event_time).
_ONE_LINE = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]+")
# A lone surrogate: valid in a Python str (JSON's "\ud800" gives one) but not Unicode,
# so it cannot be encoded as UTF-8, and no database, mail or log line can take it.
_SURROGATE = re.compile(r"[\ud800-\udfff]")
MAX_EVENT_TIME = 64


def valid_unicode(text: str) -> tuple[str, bool]:
    """`text` with every lone surrogate replaced by U+FFFD; and whether any was."""
    fixed, n = _SURROGATE.subn("\ufffd", text)
    return fixed, n > 0


_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_SENSOR_BAD = re.compile(r"[^A-Za-z0-9._:@-]")


def clean_sensor(text: str) -> str:
    """A sensor name is one topic level: no '/', '+', '#', spaces or controls."""
    cleaned = _SENSOR_BAD.sub("_", text.strip())[:MAX_SENSOR]
    return cleaned or "unknown"


def truncate_utf8(text: str, limit: int) -> tuple[str, bool]:
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) <= limit:
        return text, False
    cut = raw[: limit - 32].decode("utf-8", "ignore")
    return f"{cut} [truncated {len(raw) - limit + 32} bytes]", True


@dataclass(frozen=True, slots=True)
class Alert:
    id: str
    topic: str
    source: str  # mqtt | serial | local
    sensor: str
    severity: Severity
    message: str
    received: Stamp
    event_time: str | None = None
    fields: Mapping[str, FieldValue] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def template_values(self) -> dict[str, str]:
        values = {k: "" if v is None else str(v) for k, v in self.fields.items()}
        values.update(
            id=self.id,
            topic=self.topic,
            source=self.source,
            sensor=self.sensor,
            severity=str(self.severity),
            message=self.message,
            event_time=self.event_time or "",
        )
        return values


@dataclass(frozen=True, slots=True)
class Draft:
    """What a source knows about an alert before normalisation."""

    topic: str
    source: str
    sensor: str = "unknown"
    severity: Severity = Severity.WARNING


def _field_value(value: Any, notes: list[str]) -> FieldValue:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        text = _CONTROL.sub("", value)
    else:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    text, bad = valid_unicode(text)
    if bad:
        notes.append("bad_unicode")
    return truncate_utf8(text, MAX_FIELD_VALUE)[0]


def _event_time(value: Any, notes: list[str]) -> str:
    """The sensor's own time, as given, on one line: it is shown in the mail body."""
    text = str(_field_value(value, notes))
    one = _ONE_LINE.sub(" ", text).strip()
    if one != text:
        notes.append("event_time_cleaned")
    return one[:MAX_EVENT_TIME]


def _from_object(obj: Mapping[str, Any], draft: Draft, notes: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"sensor": draft.sensor, "severity": draft.severity}
    fields: dict[str, FieldValue] = {}
    message: Any = None
    for key, value in obj.items():
        if key in ("message", "msg", "text"):
            if message is None:
                message = value
                continue
        elif key == "sensor":
            out["sensor"] = clean_sensor(str(value))
            continue
        elif key in ("severity", "level"):
            sev = parse_severity(str(value))
            if sev is None:
                notes.append("unknown_severity")
                fields["severity_given"] = _field_value(value, notes)
            else:
                out["severity"] = sev
            continue
        elif key in ("event_time", "time", "ts", "timestamp"):
            out["event_time"] = _event_time(value, notes)
            continue
        if not _KEY.fullmatch(key):
            notes.append("bad_field_key")
            continue
        if key in ("id", "topic", "source", "received_at", "device_id"):
            # Set by the gateway, never by a payload: a sensor cannot pose as another.
            notes.append("reserved_field")
            continue
        if len(fields) >= MAX_FIELDS:
            notes.append("too_many_fields")
            continue
        fields[key] = _field_value(value, notes)
    if message is None:
        message = json.dumps(dict(obj), ensure_ascii=False)[:MAX_MESSAGE_BYTES]
    elif not isinstance(message, str):
        message = json.dumps(message, ensure_ascii=False)
    out["message"] = message
    out["fields"] = fields
    return out


def normalize(
    payload: bytes | str,
    draft: Draft,
    stamp: Stamp | None = None,
    *,
    parse_json: bool = True,
    alert_id: str | None = None,
    fields: Mapping[str, FieldValue] | None = None,
) -> Alert:
    """Turn a payload into an Alert; never raises on any input.

    A JSON object supplies the alert keys (DESIGN.md); anything else is the
    message text. Non-UTF-8 bytes are decoded with replacement and noted.
    """
    notes: list[str] = []
    if isinstance(payload, bytes):
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            text = payload.decode("utf-8", "replace")
            notes.append("non_utf8")
    else:
        text = payload
    values: dict[str, Any] = {
        "sensor": draft.sensor,
        "severity": draft.severity,
        "message": text,
        "fields": {},
    }
    stripped = text.lstrip()
    if parse_json and stripped.startswith(("{", "[")):
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError):
            notes.append("malformed_json")
        else:
            if isinstance(obj, dict):
                try:
                    values = _from_object(obj, draft, notes)
                except (RecursionError, ValueError, TypeError):
                    # Nested deeper than json.dumps can go (json.loads went one level
                    # less deep), or a value it cannot encode: keep the text as it came.
                    notes.append("malformed_json")
            else:
                notes.append("json_not_object")
    message, bad = valid_unicode(_CONTROL.sub("", str(values["message"])))
    if bad:
        notes.append("bad_unicode")
    message, cut = truncate_utf8(message, MAX_MESSAGE_BYTES)
    if cut:
        notes.append("message_truncated")
    stamp = stamp or Stamp.now()
    topic, bad = valid_unicode(draft.topic)  # a command line's undecodable bytes
    if bad:
        notes.append("bad_unicode")
    return Alert(
        id=alert_id or new_alert_id(stamp.wall),
        topic=topic,
        source=draft.source,
        sensor=clean_sensor(values["sensor"]),
        severity=values["severity"],
        message=message,
        received=stamp,
        event_time=values.get("event_time"),
        fields=values["fields"] if fields is None else fields,
        notes=tuple(dict.fromkeys(notes)),
    )
