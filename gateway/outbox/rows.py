"""Alert rows, shard tables and the connection: how an alert is laid out on disk.

Alert rows live in shard tables of SHARD_ROWS consecutive sequence numbers
(`alert_<k>`), so pruning drops whole tables; `alert_kept` holds the few rows that
outlive their shard.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from gateway.alert import Alert, Severity
from gateway.clock import Stamp

SHARD_ROWS = 4096


def volatile_reason(path: Path) -> str | None:
    """Why `path` would not survive a power cut (tmpfs, overlay), or None."""
    try:
        target = os.path.realpath(path)
        best, fstype = "", ""
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                mount = parts[4].replace("\\040", " ")
                fs = parts[parts.index("-") + 1]
                inside = target == mount or target.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, fstype = mount, fs
    except (OSError, ValueError, IndexError):
        return None
    if fstype in ("tmpfs", "ramfs", "overlay", "squashfs", "zram"):
        return f"{path} is on {fstype} (mounted at {best})"
    return None


# One encoder for every row: json.dumps() with these options builds a new JSONEncoder
# per call, which cost more than encoding a serial alert's three fields.
_fields_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


ROWS_PER_INSERT = 64


def _insert_rows(
    c: sqlite3.Connection,
    into: str,
    width: int,
    rows: Sequence[tuple[Any, ...]],
    verb: str = "INSERT",
) -> None:
    """Insert rows up to ROWS_PER_INSERT to a statement rather than one a statement.

    executemany() steps the statement once per row, and gives up the GIL at every step;
    getting it back waits on whichever source thread holds it. Chunks of 64, then the
    rest in powers of two: at most seven statements per table, each one cached.
    """
    one = "(" + ", ".join("?" * width) + ")"
    i = 0
    while i < len(rows):
        n = min(ROWS_PER_INSERT, 1 << ((len(rows) - i).bit_length() - 1))
        sql = f"{verb} INTO {into} VALUES {', '.join([one] * n)}"
        c.execute(sql, [v for row in rows[i : i + n] for v in row])
        i += n


def _alert_row(a: Alert) -> tuple[Any, ...]:
    return (
        a.id,
        a.topic,
        a.source,
        a.sensor,
        int(a.severity),
        a.message,
        a.event_time,
        a.received.wall,
        a.received.boottime,
        a.received.boot_id,
        int(a.received.synced),
        _fields_json(dict(a.fields)) if a.fields else "{}",
        ",".join(a.notes),
    )


_ALERT_COLS = (
    "seq, id, topic, source, sensor, severity, message, event_time, received_at, boottime, "
    "boot_id, clock_synced, fields, notes"
)


def alert_from_row(row: Sequence[Any]) -> Alert:
    (
        _seq,
        aid,
        topic,
        source,
        sensor,
        sev,
        message,
        event_time,
        received_at,
        bt,
        boot,
        synced,
        fields,
        notes,
    ) = row
    return Alert(
        id=aid,
        topic=topic,
        source=source,
        sensor=sensor,
        severity=Severity(sev),
        message=message,
        event_time=event_time,
        received=Stamp(wall=received_at, boottime=bt, boot_id=boot, synced=bool(synced)),
        fields=json.loads(fields) if fields and fields != "{}" else {},
        notes=tuple(n for n in notes.split(",") if n),
    )


def shard_table(seq: int) -> str:
    return f"alert_{seq // SHARD_ROWS}"


def alert_tables(conn: sqlite3.Connection) -> list[str]:
    """Shard tables, oldest first, then `alert_kept`."""
    names = [
        r[0]
        for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name GLOB 'alert_[0-9]*'"
        )
    ]
    return [*sorted(names, key=lambda n: int(n[6:])), "alert_kept"]


def fetch_alerts(conn: sqlite3.Connection, seqs: Iterable[int]) -> dict[int, Alert]:
    """Alerts by sequence number, from their shard or from `alert_kept`."""
    existing = set(alert_tables(conn))
    by_table: dict[str, list[int]] = {}
    for seq in sorted(set(seqs)):
        table = shard_table(seq)
        by_table.setdefault(table if table in existing else "alert_kept", []).append(seq)
    found: dict[int, Alert] = {}
    for table, group in by_table.items():
        for i in range(0, len(group), 500):
            chunk = group[i : i + 500]
            marks = ",".join("?" * len(chunk))
            for row in conn.execute(
                f"SELECT {_ALERT_COLS} FROM {table} WHERE seq IN ({marks})", chunk
            ):
                found[row[0]] = alert_from_row(row)
    return found


def find_seq(conn: sqlite3.Connection, alert_id: str) -> tuple[int, str] | None:
    """(sequence number, table) of an alert id; each shard has an index on id."""
    for table in reversed(alert_tables(conn)):
        row = conn.execute(f"SELECT seq FROM {table} WHERE id = ?", (alert_id,)).fetchone()
        if row is not None:
            return int(row[0]), table
    return None


def _decode_text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
        )
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 10000")
    # A flipped bit in a stored text (an SD card's doing) must cost a replacement
    # character in one mail, not a UnicodeDecodeError in every claim of the queue.
    conn.text_factory = _decode_text
    if not readonly:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        # Zeroing freed pages would double the wear of pruning for no benefit here.
        conn.execute("PRAGMA secure_delete = OFF")
    return conn
