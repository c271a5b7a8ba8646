"""What a failure of the outbox means: whose fault, and what the sources should do."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from gateway.alert import Severity
from gateway.errors import OutboxFull, StoreUnavailable, Unstorable
from gateway.outbox.model import MAX_PRIORITY, Routed
from gateway.outbox.seen import split_key

_SQLITE_FULL = 13
_CORRUPT_CODES = frozenset({11, 26})  # SQLITE_CORRUPT, SQLITE_NOTADB


def _text_ok(text: str | None) -> bool:
    if text is None or text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def unstorable(r: Routed) -> str | None:
    """Why this alert's own values can never be stored, or None.

    Decided from the alert alone, before any transaction: an error inside one may as
    well come from the outbox's own state (a damaged counter, a lock), and taking such
    an error for the alert's fault would acknowledge, and so lose, every alert.
    normalize() already repairs what this refuses; this guards the door for any other.
    It runs for every alert, so the common case (ASCII text) costs one scan.
    """
    a = r.alert
    try:
        ascii_only = (
            a.message.isascii()
            and a.topic.isascii()
            and a.sensor.isascii()
            and a.id.isascii()
            and a.source.isascii()
            and (a.event_time is None or a.event_time.isascii())
        )
    except AttributeError:
        return "a text field is not text"
    if not ascii_only and not _text_ok(
        a.id + a.topic + a.source + a.sensor + a.message + (a.event_time or "")
    ):
        return "its text is not valid Unicode"
    if type(a.severity) is not Severity and not (
        isinstance(a.severity, int) and 0 <= int(a.severity) <= MAX_PRIORITY
    ):
        return f"severity {a.severity!r} is not a severity"
    for key, value in a.fields.items() if a.fields else ():
        if not isinstance(key, str) or not _text_ok(key):
            return "a field name is not valid Unicode text"
        if isinstance(value, str):
            if not _text_ok(value):
                return f"field {key!r} is not valid Unicode text"
        elif value is not None and not isinstance(value, bool | int | float):
            return f"field {key!r} is not a text, number or boolean"
    if r.seen_key is not None:
        try:
            split_key(r.seen_key)
        except ValueError as exc:
            return str(exc)
    return None


def sqlite_code(exc: BaseException) -> int | None:
    """SQLite's primary result code of an exception, or None."""
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else int(code) & 0xFF


def is_corruption(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.DatabaseError) and sqlite_code(exc) in _CORRUPT_CODES


def store_error(exc: BaseException, path: Path) -> BaseException:
    """What a failed ingest transaction means for the sources.

    OutboxFull: the disk is full (wait, do not acknowledge). Any other failure inside
    the transaction is StoreUnavailable: nothing was stored, the same batch may succeed
    later; the sources keep their alerts unacknowledged. (What an alert's own values
    make unstorable is found before the transaction: `unstorable`.)
    """
    if isinstance(exc, OutboxFull | StoreUnavailable | Unstorable):
        return exc
    code = sqlite_code(exc)
    if code == _SQLITE_FULL or (
        isinstance(exc, sqlite3.OperationalError) and "full" in str(exc).lower()
    ):
        return OutboxFull(f"the disk holding {path} is full: {exc}")
    if isinstance(exc, Exception):
        return StoreUnavailable(f"cannot write the outbox {path}: {exc}")
    return exc  # KeyboardInterrupt, SystemExit: not ours to translate
