"""`mailgw queue salvage FILE`: re-queue what a moved-aside outbox still holds.

The daemon moves an outbox aside only when SQLite says it is corrupt. Corruption is
usually a few pages; the alerts on the others are still readable, and their senders
were told they were stored. Salvage reads every undelivered alert it can from a copy
of that file (the original is left as it is, for a second try or a post-mortem) and
queues it again in the live outbox with its own id, so its mail carries the same
Message-ID it would have had. Alerts already in the live outbox (a second salvage of
the same file) are skipped. What cannot be read is counted, not guessed at.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gateway.alert import Alert
from gateway.outbox import _ALERT_COLS, Outbox, Routed, alert_from_row, find_seq

UNDELIVERED = ("queued", "sending", "dead", "unrouted", "suppressed")
BATCH = 256


@dataclass
class Report:
    requeued: int = 0
    already_queued: int = 0
    unreadable: int = 0  # deliveries whose alert could not be read
    errors: list[str] = field(default_factory=list)


def salvage(source: Path, target: Outbox) -> Report:
    """Queue every readable undelivered alert of `source` in `target` (same ids)."""
    report = Report()
    with tempfile.TemporaryDirectory(prefix="mailgw-salvage-") as tmp:
        copy = Path(tmp) / "outbox.db"
        shutil.copyfile(source, copy)
        for suffix in ("-wal",):  # committed transactions not yet in the main file
            if Path(f"{source}{suffix}").exists():
                shutil.copyfile(f"{source}{suffix}", f"{copy}{suffix}")
        conn = sqlite3.connect(copy, isolation_level=None)
        try:
            routes = _undelivered(conn, report)
            try:
                tables = [
                    r[0]
                    for r in conn.execute(
                        "SELECT name FROM sqlite_master WHERE type = 'table'"
                        " AND name GLOB 'alert_*'"
                    )
                ]
            except sqlite3.DatabaseError as exc:
                report.errors.append(f"cannot list the alert tables: {exc}")
                tables = []
            batch: list[Routed] = []
            for seq, deliveries in routes.items():
                alert = _read_alert(conn, tables, seq, report)
                if alert is None:
                    report.unreadable += len(deliveries)
                    continue
                if find_seq(target.conn, alert.id) is not None:
                    report.already_queued += 1
                    continue
                named = tuple((r, p) for r, p in deliveries if r)
                batch.append(Routed(alert, named))
                if len(batch) >= BATCH:
                    target.add(batch)
                    report.requeued += len(batch)
                    batch = []
            if batch:
                target.add(batch)
                report.requeued += len(batch)
        finally:
            conn.close()
    return report


def _undelivered(conn: sqlite3.Connection, report: Report) -> dict[int, list[tuple[str, int]]]:
    """alert seq → its undelivered (route, priority), as far as the table reads."""
    found: dict[int, list[tuple[str, int]]] = {}
    marks = ",".join("?" * len(UNDELIVERED))
    try:
        for seq, route, prio in _rows(
            conn,
            f"SELECT alert_seq, route, priority FROM delivery WHERE state IN ({marks})",
            UNDELIVERED,
        ):
            found.setdefault(int(seq), []).append((str(route), int(prio)))
    except sqlite3.DatabaseError as exc:
        report.errors.append(f"the delivery table is damaged after {len(found)} alerts: {exc}")
    return found


def _rows(conn: sqlite3.Connection, sql: str, args: tuple[str, ...]) -> Iterator[tuple[int, ...]]:
    yield from conn.execute(sql, args)


def _read_alert(
    conn: sqlite3.Connection, tables: list[str], seq: int, report: Report
) -> Alert | None:
    for table in tables:
        try:
            sql = f"SELECT {_ALERT_COLS} FROM {table} WHERE seq = ?"
            row = conn.execute(sql, (seq,)).fetchone()
        except sqlite3.DatabaseError as exc:
            if len(report.errors) < 20:
                report.errors.append(f"{table}: {exc}")
            continue
        if row is not None:
            try:
                return alert_from_row(row)
            except (ValueError, TypeError) as exc:
                report.errors.append(f"alert {seq}: {exc}")
                return None
    return None
