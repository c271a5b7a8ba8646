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

# Poison messages. A message whose compose or send kills the daemon (out of memory, a
# crash in a library) or stalls it until the watchdog does would be claimed again at
# every start and kill it again: a crash loop until systemd gives up, and intake with
# it. So every start counts, on each delivery it finds `sending`, one crash (table
# `delivery_crash`; the row goes when the delivery settles: sent, deferred or dead). A
# delivery with a count is a suspect, claimed alone (nothing else in flight, nothing
# else claimed while it is), so that a crash counts against the one message that can
# be its cause and never against the alerts that happened to share its batch. At
# HOLD_AFTER it is held aside.
HOLD_AFTER = 3
_Row = tuple[int, str, int, str | None, str]  # alert_seq, route, attempts, rcpts, kind


def recover_in_flight(c: sqlite3.Connection, now: float) -> tuple[int, list[tuple[str, str]]]:
    """At the daemon's start: every `sending` delivery is queued again with one more
    crash counted, or held once it has HOLD_AFTER. Returns how many were queued again
    and the (alert id, route) of those held now."""
    c.execute(
        "INSERT INTO delivery_crash (alert_seq, route, crashes)"
        " SELECT alert_seq, route, 1 FROM delivery INDEXED BY delivery_sending"
        " WHERE state = 'sending'"
        " ON CONFLICT (alert_seq, route) DO UPDATE SET crashes = crashes + 1"
    )
    poisoned = c.execute(
        "SELECT k.alert_seq, k.route, k.crashes FROM delivery_crash k CROSS JOIN delivery d"
        " ON d.alert_seq = k.alert_seq AND d.route = k.route"
        " WHERE k.crashes >= ? AND d.state = 'sending'",
        (HOLD_AFTER,),
    ).fetchall()
    for seq, route, crashes in poisoned:
        c.execute(
            "UPDATE delivery SET state = 'held', updated_at = ?, last_error = ?"
            " WHERE alert_seq = ? AND route = ?",
            (
                now,
                f"held: in flight at {crashes} crashes or stalls of the gateway in a row "
                "(a message that kills it); `mailgw queue retry ID` releases it",
                seq,
                route,
            ),
        )
    n = c.execute("UPDATE delivery SET state = 'queued' WHERE state = 'sending'").rowcount
    alerts = fetch_alerts(c, [seq for seq, _, _ in poisoned])
    held = [(alerts[seq].id if seq in alerts else f"#{seq}", route) for seq, route, _ in poisoned]
    return int(n), held


def _suspect_turn(c: sqlite3.Connection, now: float) -> list[_Row] | None:
    """None when no suspect is due or in flight (claim as usual); else the rows to
    claim: the oldest due suspect alone when nothing is in flight, or nothing."""
    suspects = c.execute(
        "SELECT d.alert_seq, d.route, d.attempts, d.rcpts, d.kind, d.state, d.due"
        # CROSS JOIN: SQLite then walks the few suspects, never the deliveries.
        " FROM delivery_crash k CROSS JOIN delivery d"
        " ON d.alert_seq = k.alert_seq AND d.route = k.route"
        " WHERE d.state IN ('queued', 'sending') ORDER BY d.alert_seq"
    ).fetchall()
    if any(state == "sending" for *_, state, _ in suspects):
        return []
    due = [row[:5] for row in suspects if row[6] <= now]
    if not due:
        return None
    busy = c.execute(
        "SELECT 1 FROM delivery INDEXED BY delivery_sending WHERE state = 'sending' LIMIT 1"
    ).fetchone()
    return [] if busy else due[:1]


def _due(c: sqlite3.Connection, limit: int, now: float) -> list[_Row]:
    picked: list[_Row] = []
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
    return picked


def claim(c: sqlite3.Connection, limit: int, now: float) -> list[Claimed]:
    """Take up to `limit` due deliveries (`due <= now`, monotonic), highest priority
    first, oldest first; they become `sending`. A suspect (see HOLD_AFTER) goes alone."""
    turn = _suspect_turn(c, now)
    picked = _due(c, limit, now) if turn is None else turn
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
        elif o.state == State.QUEUED and o.crashed:
            _crashed(c, seq, route, now, o.error)
            continue  # still a suspect: its count is kept
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
        # Settled without a crash: no longer a suspect.
        c.execute("DELETE FROM delivery_crash WHERE alert_seq = ? AND route = ?", (seq, route))
    return done


def _crashed(c: sqlite3.Connection, seq: int, route: str, now: float, error: str | None) -> None:
    """The relay failed while this delivery was in flight, the daemon still up: one
    crash counted, as a start would count it; queued again, or held at HOLD_AFTER."""
    c.execute(
        "INSERT INTO delivery_crash (alert_seq, route, crashes) VALUES (?, ?, 1)"
        " ON CONFLICT (alert_seq, route) DO UPDATE SET crashes = crashes + 1",
        (seq, route),
    )
    (crashes,) = c.execute(
        "SELECT crashes FROM delivery_crash WHERE alert_seq = ? AND route = ?", (seq, route)
    ).fetchone()
    if crashes >= HOLD_AFTER:
        c.execute(
            "UPDATE delivery SET state = 'held', updated_at = ?, last_error = ?"
            " WHERE alert_seq = ? AND route = ?",
            (
                now,
                f"held: in flight at {crashes} crashes of the relay in a row ({error}); "
                "`mailgw queue retry ID` releases it",
                seq,
                route,
            ),
        )
    else:
        c.execute(
            "UPDATE delivery SET state = 'queued', due = 0, updated_at = ?,"
            " last_error = coalesce(?, last_error) WHERE alert_seq = ? AND route = ?",
            (now, error, seq, route),
        )


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
