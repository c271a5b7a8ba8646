"""The state of the gateway's own watches in the outbox: the `watch` table and the
daemon's last sign of life.

Rows are (kind, key, state): kind `silence` (key: a source, state: JSON of
gateway/silence.Source) or `self` (key: a condition, state: JSON of raised and since).
A row that reports a change rides the alert's own transaction (`Routed.marks`); the
periodic save here only refreshes when sources were last seen and `meta.alive_at`,
the wall time the daemon was last known alive, from which a restart learns how long
the gateway itself was down.
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.outbox.queries import counts
from gateway.outbox.rows import alert_tables
from gateway.outbox.store import Outbox


def load(outbox: Outbox) -> tuple[list[tuple[str, str, str]], float | None]:
    """Every watch row, and the wall time the daemon was last alive (None: never)."""
    rows = outbox.conn.execute("SELECT kind, key, state FROM watch").fetchall()
    alive = outbox.conn.execute("SELECT value FROM meta WHERE key = 'alive_at'").fetchone()
    return [(str(k), str(key), str(s)) for k, key, s in rows], (float(alive[0]) if alive else None)


def save(
    outbox: Outbox,
    rows: Sequence[tuple[str, str, str]],
    alive_at: float,
    forget: Sequence[tuple[str, str]] = (),
) -> None:
    """Refresh watch rows and the sign of life in one small transaction.

    Written without an fsync of its own (synchronous=NORMAL, as delivery outcomes): a
    power cut may cost the last few seconds of "last seen", which only makes a later
    silence mail say a little less than it could. What fired is never in it.
    """
    c = outbox.conn
    c.execute("PRAGMA synchronous=NORMAL")
    try:
        with outbox.transaction():
            c.executemany("INSERT OR REPLACE INTO watch (kind, key, state) VALUES (?, ?, ?)", rows)
            c.executemany("DELETE FROM watch WHERE kind = ? AND key = ?", forget)
            c.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('alive_at', ?)", (repr(alive_at),)
            )
    finally:
        c.execute("PRAGMA synchronous=FULL")


def activity(outbox: Outbox, since: float) -> dict[str, dict[str, int]]:
    """For the heartbeat: alerts taken (received since `since`, wall) and mails sent
    since then, each by route ('' for unrouted), and the queue by state."""
    c = outbox.conn
    taken: dict[str, int] = {}
    for table in alert_tables(c):
        for route, n in c.execute(
            f"SELECT d.route, count(*) FROM {table} a JOIN delivery d ON d.alert_seq = a.seq"
            " WHERE a.received_at >= ? GROUP BY d.route",
            (since,),
        ):
            taken[route] = taken.get(route, 0) + n
    mailed = {
        str(route): int(n)
        for route, n in c.execute(
            "SELECT route, count(*) FROM delivery WHERE state = 'sent' AND updated_at >= ?"
            " GROUP BY route",
            (since,),
        )
    }
    queue = {k: v for k, v in counts(c).items() if isinstance(v, int)}
    return {"taken": taken, "mailed": mailed, "queue": queue}
