"""Read-side queries and operator actions, shared by the daemon's status and the CLI."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator, Sequence
from typing import Any

from gateway.alert import Alert
from gateway.outbox.model import STATES
from gateway.outbox.rows import fetch_alerts, find_seq


def counts(conn: sqlite3.Connection, now: float | None = None) -> dict[str, Any]:
    now = time.monotonic() if now is None else now
    result: dict[str, Any] = {state: 0 for state in STATES}
    for state, n in conn.execute("SELECT state, count(*) FROM delivery GROUP BY state"):
        result[state] = n
    result["deferred"] = conn.execute(
        "SELECT count(*) FROM delivery INDEXED BY delivery_due WHERE state = 'queued' AND due > ?",
        (max(now, 1e-9),),
    ).fetchone()[0]
    by_prio = conn.execute(
        "SELECT priority, count(*) FROM delivery WHERE state = 'queued' GROUP BY priority"
    ).fetchall()
    result["queued_by_priority"] = {str(p): n for p, n in by_prio}
    first = conn.execute(
        "SELECT min(alert_seq) FROM delivery WHERE state IN ('queued', 'sending')"
    ).fetchone()[0]
    oldest = None
    if first is not None:
        found = fetch_alerts(conn, [first]).get(first)
        oldest = found.received.wall if found else None
    result["oldest_queued_age_s"] = None if oldest is None else max(0.0, time.time() - oldest)
    return result


def find(conn: sqlite3.Connection, alert_id: str) -> tuple[Alert, list[dict[str, Any]]] | None:
    located = find_seq(conn, alert_id)
    if located is None:
        return None
    seq = located[0]
    deliveries = [
        dict(
            zip(
                ("route", "state", "priority", "attempts", "last_error", "updated_at"),
                d,
                strict=True,
            )
        )
        for d in conn.execute(
            "SELECT route, state, priority, attempts, last_error, updated_at FROM delivery"
            " WHERE alert_seq = ?",
            (seq,),
        )
    ]
    return fetch_alerts(conn, [seq])[seq], deliveries


_ROW = "SELECT alert_seq, route, state, priority, attempts, last_error, updated_at FROM delivery"


def _described(conn: sqlite3.Connection, rows: list[Any]) -> list[dict[str, Any]]:
    alerts = fetch_alerts(conn, (r[0] for r in rows))
    out = []
    for seq, route, state, priority, attempts, last_error, updated_at in rows:
        a = alerts.get(seq)
        if a is None:
            continue
        out.append(
            {
                "id": a.id,
                "route": route,
                "state": state,
                "priority": priority,
                "attempts": attempts,
                "last_error": last_error,
                "received_at": a.received.wall,
                "updated_at": updated_at,
                "topic": a.topic,
                "source": a.source,
                "sensor": a.sensor,
                "severity": str(a.severity),
                "message": a.message,
            }
        )
    return out


def listing(
    conn: sqlite3.Connection, states: Sequence[str], limit: int = 100
) -> list[dict[str, Any]]:
    marks = ",".join("?" * len(states))
    rows = conn.execute(
        f"{_ROW} WHERE state IN ({marks}) ORDER BY alert_seq LIMIT ?", (*states, limit)
    ).fetchall()
    return _described(conn, rows)


def export(
    conn: sqlite3.Connection, states: Sequence[str], page: int = 500
) -> Iterator[dict[str, Any]]:
    """Every delivery in `states` as `listing` describes it, in pages along the primary
    key: memory stays one page's whatever the outbox holds, and each page is one short
    read, so the daemon's writer is never held up by a long export."""
    marks = ",".join("?" * len(states))
    after: tuple[int, str] = (-1, "")
    while True:
        rows = conn.execute(
            f"{_ROW} WHERE state IN ({marks}) AND (alert_seq, route) > (?, ?)"
            " ORDER BY alert_seq, route LIMIT ?",
            (*states, *after, page),
        ).fetchall()
        if not rows:
            return
        yield from _described(conn, rows)
        after = (rows[-1][0], rows[-1][1])


def retry(conn: sqlite3.Connection, alert_id: str | None) -> int:
    """Make deliveries due now: one alert's, or (None) every queued and dead one. A held
    delivery (gateway/outbox/queue.py) is released only by its id, its crashes forgotten."""
    now = time.time()
    conn.execute("BEGIN IMMEDIATE")
    try:
        if alert_id is None:
            n = conn.execute(
                "UPDATE delivery SET state = 'queued', due = 0, updated_at = ?"
                " WHERE state IN ('queued', 'dead') AND route != ''",
                (now,),
            ).rowcount
        else:
            located = find_seq(conn, alert_id)
            n = (
                0
                if located is None
                else conn.execute(
                    "UPDATE delivery SET state = 'queued', due = 0, updated_at = ?"
                    " WHERE state IN ('queued', 'dead', 'held') AND route != ''"
                    " AND alert_seq = ?",
                    (now, located[0]),
                ).rowcount
            )
            if located is not None:
                conn.execute("DELETE FROM delivery_crash WHERE alert_seq = ?", (located[0],))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return int(n)


def delete(conn: sqlite3.Connection, alert_id: str) -> int:
    conn.execute("BEGIN IMMEDIATE")
    try:
        located = find_seq(conn, alert_id)
        n = 0
        if located is not None:
            seq, table = located
            # What storm control folded into its mails (repeats, digest lines) goes too.
            n = conn.execute(
                "DELETE FROM delivery WHERE owner = ? AND state = 'suppressed'", (seq,)
            ).rowcount
            n += conn.execute("DELETE FROM delivery WHERE alert_seq = ?", (seq,)).rowcount
            conn.execute("DELETE FROM delivery_crash WHERE alert_seq = ?", (seq,))
            conn.execute(f"DELETE FROM {table} WHERE seq = ?", (seq,))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return int(n)
