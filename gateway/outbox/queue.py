"""The queue: claim due deliveries, apply outcomes, prune, drop shards no row needs.

Functions over an open transaction (the Outbox opens it and keeps its counters).
Claiming walks a partial index over queued rows per priority, so its cost does not
depend on how many rows are queued, deferred or sent.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable

from gateway.outbox.model import MAX_PRIORITY, Claimed, Outcome, State
from gateway.outbox.rows import SHARD_ROWS, alert_tables, fetch_alerts


def claim(c: sqlite3.Connection, limit: int, now: float) -> list[Claimed]:
    """Take up to `limit` due deliveries (`due <= now`, monotonic), highest priority
    first, oldest first; they become `sending`."""
    picked: list[tuple[int, str, int, str | None, str]] = []
    for prio in range(MAX_PRIORITY, -1, -1):
        rows = c.execute(
            "SELECT alert_seq, route, attempts, rcpts, kind FROM delivery"
            " INDEXED BY delivery_due"
            " WHERE state = 'queued' AND priority = ? AND due <= ?"
            " ORDER BY due, alert_seq LIMIT ?",
            (prio, now, limit - len(picked)),
        ).fetchall()
        picked.extend(rows)
        if len(picked) >= limit:
            break
    if not picked:
        return []
    c.executemany(
        "UPDATE delivery SET state = 'sending' WHERE alert_seq = ? AND route = ?",
        [(seq, route) for seq, route, *_ in picked],
    )
    # Storm control folded these into the mail: a digest's lines, a lead's repeats.
    member_seqs = {
        (seq, route): [
            m
            for (m,) in c.execute(
                "SELECT alert_seq FROM delivery WHERE owner = ? AND route = ?"
                " AND alert_seq != ? ORDER BY alert_seq",
                (seq, route, seq),
            )
        ]
        for seq, route, *_ in picked
    }
    wanted = {seq for seq, *_ in picked}
    for seqs in member_seqs.values():
        wanted.update(seqs)
    alerts = fetch_alerts(c, wanted)
    return [
        Claimed(
            alerts[seq],
            route,
            attempts,
            seq,
            tuple(rcpts.split("\n")) if rcpts else None,
            kind,
            tuple(alerts[m] for m in member_seqs[(seq, route)] if m in alerts),
        )
        for seq, route, attempts, rcpts, kind in picked
    ]


def finish(c: sqlite3.Connection, outcomes: Iterable[Outcome], now: float) -> int:
    """Apply outcomes; how many live deliveries were settled (sent, with what it carried)."""
    done = 0
    for o in outcomes:
        seq, route = o.key
        if o.state == State.SENT:
            c.execute(
                "UPDATE delivery SET state = 'sent', updated_at = ?, attempts ="
                " attempts + 1, last_error = ? WHERE alert_seq = ? AND route = ?",
                (now, o.error, seq, route),
            )
            # What storm control folded into this mail went out with it.
            done += (
                1
                + c.execute(
                    "UPDATE delivery SET state = 'sent', updated_at = ? WHERE owner = ?"
                    " AND route = ? AND state = 'suppressed'",
                    (now, seq, route),
                ).rowcount
            )
        elif o.state == State.DEAD:
            c.execute(
                "UPDATE delivery SET state = 'dead', updated_at = ?, attempts ="
                " attempts + ?, last_error = ? WHERE alert_seq = ? AND route = ?",
                (now, int(o.count_attempt), o.error, seq, route),
            )
        elif o.state == State.QUEUED:
            c.execute(
                "UPDATE delivery SET state = 'queued', due = ?, updated_at = ?,"
                " attempts = attempts + ?, last_error = coalesce(?, last_error),"
                " rcpts = coalesce(?, rcpts) WHERE alert_seq = ? AND route = ?",
                (
                    o.due,
                    now,
                    int(o.count_attempt),
                    o.error,
                    "\n".join(o.rcpts) if o.rcpts else None,
                    seq,
                    route,
                ),
            )
        else:
            raise ValueError(f"not an outcome state: {o.state!r}")
    return done


def release_all(c: sqlite3.Connection) -> int:
    return int(c.execute("UPDATE delivery SET state = 'queued' WHERE state = 'sending'").rowcount)


def prune(c: sqlite3.Connection, older_than: float, limit: int) -> int:
    c.execute("DELETE FROM storm_lead WHERE until < ?", (time.time(),))
    rows = c.execute(
        "SELECT alert_seq, route FROM delivery INDEXED BY delivery_sent"
        " WHERE state = 'sent' AND updated_at < ? LIMIT ?",
        (older_than, limit),
    ).fetchall()
    if not rows:
        return 0
    c.executemany("DELETE FROM delivery WHERE alert_seq = ? AND route = ?", rows)
    c.execute("DELETE FROM seen_run WHERE at < ?", (older_than,))
    # A sendmail message's bytes (gateway/outbox/raw.py) go with its last delivery.
    c.execute(
        "DELETE FROM raw_message WHERE NOT EXISTS"
        " (SELECT 1 FROM delivery WHERE delivery.alert_seq = raw_message.alert_seq)"
    )
    return len(rows)


def drop_free_shards(c: sqlite3.Connection) -> list[str]:
    """Drop every full shard no delivery needs (copying the few rows that pin one to
    `alert_kept`); the tables dropped."""
    dropped: list[str] = []
    row = c.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
    next_seq = int(row[0]) if row else 1
    for table in alert_tables(c)[:-1]:
        k = int(table[6:])
        lo, hi = k * SHARD_ROWS, (k + 1) * SHARD_ROWS - 1
        if hi >= next_seq - 1:
            break  # still being filled
        pinned = c.execute(
            "SELECT count(DISTINCT alert_seq) FROM delivery WHERE alert_seq BETWEEN ? AND ?",
            (lo, hi),
        ).fetchone()[0]
        if pinned > SHARD_ROWS // 16:
            continue
        if pinned:
            c.execute(
                f"INSERT INTO alert_kept SELECT * FROM {table} WHERE seq IN"
                " (SELECT alert_seq FROM delivery WHERE alert_seq BETWEEN ? AND ?)",
                (lo, hi),
            )
        c.execute(f"DROP TABLE {table}")
        dropped.append(table)
    c.execute(
        "DELETE FROM alert_kept WHERE NOT EXISTS"
        " (SELECT 1 FROM delivery WHERE delivery.alert_seq = alert_kept.seq)"
    )
    return dropped
