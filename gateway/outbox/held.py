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
