"""`mailgw queue salvage FILE`: re-queue what a moved-aside outbox still holds.

The daemon moves an outbox aside only when SQLite says it is corrupt. Corruption is
usually a few pages; the alerts on the others are still readable, and their senders
were told they were stored. Salvage reads every alert it can from a copy of that file
(the original is left as it is, for a second try or a post-mortem) and queues the
undelivered ones again in the live outbox with their own ids, so each mail carries the
Message-ID it would have had.

Damage is read around, not given up on: tables are read in ranges of sequence numbers,
and a range that fails is halved until the damaged rows are found, so one bad page
costs the rows on it, not the table. An alert whose delivery rows cannot be read is
queued again for the routes the configuration gives it now: it may have been sent
already (a duplicate with the same Message-ID) but is never silently lost. Alerts
already in the live outbox (a second salvage of the same file) are skipped.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.alert import Alert
from gateway.outbox import _ALERT_COLS, SHARD_ROWS, Outbox, Routed, alert_from_row, find_seq

UNDELIVERED = frozenset({"queued", "sending", "dead", "unrouted", "suppressed", "held"})
HELD_AGAIN = (
    "held: it was held aside in the salvaged outbox (a message that crashed or stalled "
    "the gateway); `mailgw queue retry ID` releases it"
)
BATCH = 256
CHUNK = 512  # sequence numbers read at once
MAX_ERRORS_SHOWN = 20


@dataclass
class Report:
    requeued: int = 0
    already_queued: int = 0
    unreadable: int = 0  # sequence numbers whose alert could not be read
    unknown_state: int = 0  # alerts queued again because their deliveries were unreadable
    held: int = 0  # deliveries held aside (poison) there, held again here, not sent
    errors: list[str] = field(default_factory=list)

    @property
    def damaged(self) -> bool:
        return bool(self.errors or self.unreadable)

    def error(self, text: str) -> None:
        if len(self.errors) < MAX_ERRORS_SHOWN:
            self.errors.append(text)


Route = Callable[[Alert], tuple[tuple[str, int], ...]]


def salvage(source: Path, target: Outbox, route: Route) -> Report:
    """Queue every readable undelivered alert of `source` in `target` (same ids).

    `route` gives the deliveries of an alert whose delivery rows are unreadable.
    Raises sqlite3.DatabaseError when the file cannot be read at all.
    """
    report = Report()
    with tempfile.TemporaryDirectory(prefix="mailgw-salvage-") as tmp:
        copy = Path(tmp) / "outbox.db"
        shutil.copyfile(source, copy)
        if Path(f"{source}-wal").exists():  # committed transactions not yet in the file
            shutil.copyfile(f"{source}-wal", f"{copy}-wal")
        _pad(copy, report)
        conn = sqlite3.connect(copy, isolation_level=None)
        conn.text_factory = lambda b: b.decode("utf-8", "replace")
        try:
            _salvage(conn, target, route, report)
        finally:
            conn.close()
    return report


def _salvage(conn: sqlite3.Connection, target: Outbox, route: Route, report: Report) -> None:
    tables = [
        r[0]
        for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name GLOB 'alert_*'"
        )
    ]
    top = _top_seq(conn, tables, report)
    deliveries: dict[int, list[tuple[str, str, int]]] = {}
    unknown: set[int] = set()
    for row in _rows(
        conn,
        "SELECT alert_seq, route, state, priority FROM delivery WHERE alert_seq BETWEEN ? AND ?",
        0,
        top,
        report,
        "delivery",
        unknown,
    ):
        deliveries.setdefault(int(row[0]), []).append((str(row[1]), str(row[2]), int(row[3])))
    batch: list[Routed] = []
    held: list[tuple[str, str]] = []  # (alert id, route) held aside there
    for table in tables:
        lo, hi = _range(table, top)
        missing: set[int] = set()
        sql = f"SELECT {_ALERT_COLS} FROM {table} WHERE seq BETWEEN ? AND ?"
        for row in _rows(conn, sql, lo, hi, report, table, missing):
            seq = int(row[0])
            try:
                alert = alert_from_row(row)
            except (ValueError, TypeError, KeyError) as exc:
                report.unreadable += 1
                report.error(f"{table} seq {seq}: {exc}")
                continue
            routed = _requeue(alert, seq, deliveries, unknown, route, report)
            if routed is None:
                continue
            if find_seq(target.conn, alert.id) is not None:
                report.already_queued += 1
                continue
            batch.append(routed)
            held += [(alert.id, r) for r, state, _ in deliveries.get(seq, []) if state == "held"]
            if len(batch) >= BATCH:
                report.requeued += _add(target, batch, held, report)
                batch, held = [], []
        # A damaged seq counts as lost only if something still had to be sent for it,
        # and (alert_kept) if its own shard is gone: otherwise the alert lives there.
        shards = set(tables)
        report.unreadable += len(
            [
                s
                for s in missing
                if (s in unknown or _open(deliveries.get(s, [])))
                and (table != "alert_kept" or f"alert_{s // SHARD_ROWS}" not in shards)
            ]
        )
    if batch:
        report.requeued += _add(target, batch, held, report)


def _pad(path: Path, report: Report) -> None:
    """A truncated file (a card that lost its tail) makes SQLite refuse to read even
    the schema. Zero pages up to the size its header gives: then only the pages that
    were lost read as damage, and the rest can be read around them."""
    with path.open("r+b") as f:
        header = f.read(100)
        if len(header) < 100 or not header.startswith(b"SQLite format 3\0"):
            return
        page = int.from_bytes(header[16:18], "big")
        page = 65536 if page == 1 else page
        pages = int.from_bytes(header[28:32], "big")
        size = f.seek(0, 2)
        if page and pages and size < pages * page:
            report.error(f"the file is truncated: {size // page} of {pages} pages remain")
            f.truncate(pages * page)


def _open(rows: list[tuple[str, str, int]]) -> bool:
    return any(state in UNDELIVERED for _, state, _ in rows)


def _requeue(
    alert: Alert,
    seq: int,
    deliveries: dict[int, list[tuple[str, str, int]]],
    unknown: set[int],
    route: Route,
    report: Report,
) -> Routed | None:
    rows = deliveries.get(seq)
    if rows is None:
        if seq not in unknown:
            return None  # no delivery left: sent and pruned
        report.unknown_state += 1
        return Routed(alert, route(alert))
    if not _open(rows):
        return None  # every delivery went out
    return Routed(alert, tuple((r, p) for r, state, p in rows if r and state in UNDELIVERED))


def _add(
    target: Outbox,
    batch: list[Routed],
    held: list[tuple[str, str]],
    report: Report,
) -> int:
    """Queue `batch` again; a delivery that was held aside there (a poison message) is
    held here too: queued, it would crash the daemon three more times before the hold
    caught it again."""
    target.add(batch)
    if held:
        with target.transaction() as c:
            for alert_id, r in held:
                found = find_seq(c, alert_id)
                if found is None:
                    continue
                report.held += c.execute(
                    "UPDATE delivery SET state = 'held', last_error = ?"
                    " WHERE alert_seq = ? AND route = ? AND state = 'queued'",
                    (HELD_AGAIN, found[0], r),
                ).rowcount
    return len(batch)


def _top_seq(conn: sqlite3.Connection, tables: list[str], report: Report) -> int:
    """The highest sequence number to look for."""
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
        if row is not None:
            return int(row[0])
    except (sqlite3.DatabaseError, ValueError) as exc:
        report.error(f"meta: {exc}")
    shards = [int(t[6:]) for t in tables if t[6:].isdigit()]
    return (max(shards, default=0) + 1) * SHARD_ROWS


def _range(table: str, top: int) -> tuple[int, int]:
    if table[6:].isdigit():
        k = int(table[6:])
        return k * SHARD_ROWS, (k + 1) * SHARD_ROWS - 1
    return 0, top  # alert_kept: rows from any shard


def _rows(
    conn: sqlite3.Connection,
    sql: str,
    lo: int,
    hi: int,
    report: Report,
    what: str,
    damaged: set[int],
) -> Iterator[tuple[Any, ...]]:
    """Rows with seq in lo..hi, reading around damage; the seqs that failed go in
    `damaged` (a seq there may have had no row at all: damage hides which)."""
    for start in range(lo, hi + 1, CHUNK):
        yield from _bisect(conn, sql, start, min(hi, start + CHUNK - 1), report, what, damaged)


def _bisect(
    conn: sqlite3.Connection,
    sql: str,
    lo: int,
    hi: int,
    report: Report,
    what: str,
    damaged: set[int],
) -> Iterator[tuple[Any, ...]]:
    try:
        rows = conn.execute(sql, (lo, hi)).fetchall()
    except sqlite3.DatabaseError as exc:
        if lo == hi:
            damaged.add(lo)
            report.error(f"{what}: seq {lo}: {exc}")
            return
        mid = (lo + hi) // 2
        yield from _bisect(conn, sql, lo, mid, report, what, damaged)
        yield from _bisect(conn, sql, mid + 1, hi, report, what, damaged)
        return
    yield from rows
