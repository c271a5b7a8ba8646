"""What the outbox holds by kind (gateway/outbox/room.py), counted over a connection.

Functions over an open connection or transaction; the Outbox keeps the running
counts and recounts with these.
"""

from __future__ import annotations

import sqlite3

from gateway.outbox.room import Held


def held(c: sqlite3.Connection) -> Held:
    """Live deliveries of alerts and of local mail (kind 'raw', routed or not), and
    unrouted readings. Local mail nobody could route stays local mail: it holds local
    mail's share, not the readings'."""
    alerts, local, unrouted = c.execute(
        "SELECT coalesce(sum(state != 'unrouted' AND kind != 'raw'), 0),"
        " coalesce(sum(kind = 'raw'), 0),"
        " coalesce(sum(state = 'unrouted' AND kind != 'raw'), 0)"
        " FROM delivery WHERE state != 'sent'"
    ).fetchone()
    return Held(int(alerts), int(local), int(unrouted))


def local_held(c: sqlite3.Connection, uid: int) -> tuple[int, int]:
    """Live local deliveries: of every user, and of `uid`. Walks raw_message (local
    mail only, pruned with its deliveries), not the whole queue."""
    total, mine = c.execute(
        # CROSS JOIN keeps this order (SQLite does not reorder it): raw_message outer,
        # delivery looked up by its key, never the other way round.
        "SELECT count(*), coalesce(sum(r.uid = ?), 0) FROM raw_message r"
        " CROSS JOIN delivery d ON d.alert_seq = r.alert_seq WHERE d.state != 'sent'",
        (uid,),
    ).fetchone()
    return int(total), int(mine)


def prune_unrouted(c: sqlite3.Connection, older_than: float, limit: int) -> int:
    """Delete up to `limit` unrouted readings stored before `older_than` (wall time);
    how many went. Their alert rows go with their shard (queue.drop_free_shards)."""
    if limit <= 0:
        return 0
    rows = c.execute(
        "SELECT alert_seq, route FROM delivery INDEXED BY delivery_unrouted"
        " WHERE state = 'unrouted' AND updated_at < ? AND kind != 'raw' LIMIT ?",
        (older_than, limit),
    ).fetchall()
    c.executemany("DELETE FROM delivery WHERE alert_seq = ? AND route = ?", rows)
    return len(rows)


def prune_stale_local(c: sqlite3.Connection, older_than: float, limit: int) -> int:
    """Delete up to `limit` deliveries of local mail that were dead or unrouted before
    `older_than` (wall time), and the stored message once none is left; how many went.

    They count against local mail's shares while kept (so one user's refused or
    unroutable mail stays inside that user's share, never in alerts' room or another
    user's), and would hold them forever: nothing claims them, so nothing expires them.
    Kept for outbox.max_age, as long as the gateway tries an undelivered message, then
    gone, which frees the share without anyone's help."""
    if limit <= 0:
        return 0
    rows = c.execute(
        # CROSS JOIN: raw_message (local mail only) outer, never the whole queue.
        "SELECT d.alert_seq, d.route FROM raw_message r CROSS JOIN delivery d"
        " ON d.alert_seq = r.alert_seq"
        " WHERE d.state IN ('dead', 'unrouted') AND d.updated_at < ? LIMIT ?",
        (older_than, limit),
    ).fetchall()
    if not rows:
        return 0
    c.executemany("DELETE FROM delivery WHERE alert_seq = ? AND route = ?", rows)
    c.executemany(
        "DELETE FROM raw_message WHERE alert_seq = ? AND NOT EXISTS"
        " (SELECT 1 FROM delivery WHERE delivery.alert_seq = ?)",
        [(seq, seq) for seq in {seq for seq, _ in rows}],
    )
    c.executemany("DELETE FROM delivery_crash WHERE alert_seq = ? AND route = ?", rows)
    return len(rows)
