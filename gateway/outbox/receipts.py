"""Receipts in the outbox: stored with their alert, made due with its outcome.

Functions over an open transaction, called by the Outbox: `insert` from add() (the
request lands with the alert, or neither does), `settle` from finish() (a receipt is
due in the transaction that records the smarthost's 250 or the dead letter, never
before it), and `due` / `published` for the sources that send them. See
gateway/receipts.py for what a receipt is.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from gateway.outbox.model import Outcome, State
from gateway.outbox.rows import fetch_alerts
from gateway.receipts import MAX_CARRIED, MAX_KEPT, SLOTS_FULL, Ask, Due
from gateway.runtime import Runtime

if TYPE_CHECKING:
    from gateway.outbox.store import Outbox

log = logging.getLogger(__name__)

KEEP_PUBLISHED = 86400.0  # seconds a published receipt is kept (to look at), then pruned
REFUSAL_LOG_EVERY = 60.0  # the cap's log line, at most this often, with the count since


class _Refusals:
    """Requests not kept at the cap: counted, and logged once a minute, not per batch
    (a publisher asking for every alert while nobody reads would flood the journal).
    `uncounted` waits for a source to move it into status (`take_refused`): the writer
    thread that refuses has no status of its own."""

    def __init__(self) -> None:
        self.since = 0
        self.logged_at = -REFUSAL_LOG_EVERY
        self.uncounted = 0
        self._lock = threading.Lock()

    def take(self) -> int:
        with self._lock:
            n, self.uncounted = self.uncounted, 0
        return n

    def add(self, n: int) -> None:
        with self._lock:
            self.uncounted += n
        self.since += n
        now = time.monotonic()
        if now - self.logged_at >= REFUSAL_LOG_EVERY:
            log.warning(
                "%d receipt requests were not kept: %d receipts already wait to be "
                "published; their alerts are stored and mailed as usual (counted as "
                "receipt_slots_full in mailgw status; is anything reading them? see "
                "OPERATIONS.md, Receipts)",
                self.since,
                MAX_KEPT,
            )
            self.since, self.logged_at = 0, now


_refusals = _Refusals()


def insert(c: sqlite3.Connection, rows: Sequence[tuple[int, str, str, Ask]], now: float) -> int:
    """Store requests (alert seq, route, alert id, ask) as `waiting`; how many were
    refused because MAX_KEPT receipts are already kept."""
    if not rows:
        return 0
    kept = c.execute("SELECT count(*) FROM receipt WHERE state != 'published'").fetchone()[0]
    room = max(0, MAX_KEPT - int(kept))
    taken = rows[:room]
    c.executemany(
        "INSERT OR IGNORE INTO receipt (alert_seq, route, origin, reply, correlation, v5,"
        " alert_id, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (seq, route, a.origin, a.reply, a.correlation, int(a.v5), aid, now)
            for seq, route, aid, a in taken
        ],
    )
    if len(taken) < len(rows):
        _refusals.add(len(rows) - len(taken))
    return len(rows) - len(taken)


# Which receipts an outcome makes due. A final one (sent, dead) takes those still
# waiting, and a `deferred` one not yet published (the final says more); `sent` also
# takes a `dead` one (an operator's retry went out). `deferred` is said once per receipt,
# to MQTT publishers only: RCPT (firmware_bridge/PROTOCOL.md v1) carries final outcomes.
_TAKES = {
    "deferred": "(r.state = 'waiting' AND r.outcome IS NULL AND r.origin = 'mqtt')",
    "dead": "(r.state = 'waiting' OR (r.state = 'due' AND r.outcome = 'deferred'))",
    "sent": "(r.state = 'waiting' OR r.outcome = 'dead'"
    " OR (r.state = 'due' AND r.outcome = 'deferred'))",
}


def settle(c: sqlite3.Connection, outcomes: Iterable[Outcome], now: float) -> int:
    """Make due the receipts of every mail these outcomes settle, or defer: a delivery
    queued again with a reason (a 4xx, a refused account that pauses the relay for
    minutes, a broken session) tells its waiting publishers `deferred` with that reason,
    once, so that nobody waits in silence for as long as the pause lasts; how many."""
    told = [
        (o, str(State(o.state)) if o.state in (State.SENT, State.DEAD) else "deferred")
        for o in outcomes
        if o.state in (State.SENT, State.DEAD) or (o.state == State.QUEUED and o.error)
    ]
    if (
        not told
        or not c.execute(
            "SELECT EXISTS (SELECT 1 FROM receipt INDEXED BY receipt_waiting"
            " WHERE state = 'waiting') OR EXISTS (SELECT 1 FROM receipt"
            " INDEXED BY receipt_dead WHERE outcome = 'dead') OR EXISTS (SELECT 1 FROM"
            " receipt INDEXED BY receipt_due WHERE state = 'due' AND outcome = 'deferred')"
        ).fetchone()[0]
    ):
        return 0  # the common case: nobody asked
    return sum(_settle_mail(c, o.key[0], o.key[1], what, o.error, now) for o, what in told)


def _settle_mail(
    c: sqlite3.Connection, seq: int, route: str, outcome: str, reason: str | None, now: float
) -> int:
    """The mail of delivery (seq, route) was accepted, dead-lettered or deferred: the
    receipts of every alert it carried (itself, a digest's lines, a lead's repeats) that
    this outcome takes (`_TAKES`).

    A dead letter an operator retried (`mailgw queue retry`) and that is now accepted
    gets a second receipt, `sent`: the publisher was told `dead`, and it is no longer so.
    """
    which = _TAKES[outcome]
    waiting = [
        r[0]
        for r in c.execute(
            f"SELECT r.alert_seq FROM receipt r WHERE r.alert_seq = ? AND r.route = ? AND {which}",
            (seq, route),
        )
    ]
    waiting += [
        r[0]
        for r in c.execute(
            "SELECT r.alert_seq FROM delivery d JOIN receipt r ON r.alert_seq = d.alert_seq"
            " AND r.route = d.route WHERE d.owner = ? AND d.route = ? AND d.alert_seq != ?"
            f" AND {which}",
            (seq, route, seq),
        )
    ]
    if not waiting:
        return 0
    members = [
        r[0]
        for r in c.execute(
            "SELECT alert_seq FROM delivery WHERE owner = ? AND route = ? AND alert_seq != ?"
            " ORDER BY alert_seq",
            (seq, route, seq),
        )
    ]
    row = c.execute(
        "SELECT kind FROM delivery WHERE alert_seq = ? AND route = ?", (seq, route)
    ).fetchone()
    kind = row[0] if row else "mail"
    listed = [seq, *members][:MAX_CARRIED]
    alerts = fetch_alerts(c, listed)
    carried = json.dumps([alerts[s].id for s in listed if s in alerts])
    lead = alerts[seq].id if seq in alerts else ""
    c.executemany(
        "UPDATE receipt SET state = 'due', outcome = ?, reason = ?, mail_alert = ?, kind = ?,"
        " carried = ?, count = ?, updated_at = ? WHERE alert_seq = ? AND route = ?",
        [(outcome, reason, lead, kind, carried, 1 + len(members), now, s, route) for s in waiting],
    )
    return len(waiting)


_DUE_COLS = (
    "alert_seq, route, origin, reply, correlation, v5, alert_id, outcome, reason,"
    " mail_alert, kind, carried, count, updated_at"
)


def due(c: sqlite3.Connection, origin: str, limit: int, reply: str | None = None) -> list[Due]:
    """Receipts due for `origin` (and `reply`, a serial port's name), oldest first."""
    where = "state = 'due' AND origin = ?" + ("" if reply is None else " AND reply = ?")
    args: tuple[object, ...] = (origin,) if reply is None else (origin, reply)
    rows = c.execute(
        f"SELECT {_DUE_COLS} FROM receipt INDEXED BY receipt_due WHERE {where}"
        " ORDER BY alert_seq LIMIT ?",
        (*args, limit),
    ).fetchall()
    return [_due(r) for r in rows]


def _due(r: Sequence[object]) -> Due:
    seq, route, origin, reply, corr, v5, aid, outcome, reason, lead, kind, carried, n, at = r
    try:
        ids = tuple(str(x) for x in json.loads(str(carried or "[]")))
    except ValueError:
        ids = ()
    return Due(
        alert_seq=int(str(seq)),
        route=str(route),
        origin=str(origin),
        reply=str(reply),
        correlation=bytes(corr) if isinstance(corr, bytes | bytearray) else str(corr).encode(),
        v5=bool(v5),
        alert_id=str(aid),
        outcome=str(outcome),
        reason=None if reason is None else str(reason),
        mail_alert=str(lead or aid),
        kind=str(kind or "mail"),
        carried=ids,
        count=int(str(n)),
        at=float(str(at)),
    )


def published(c: sqlite3.Connection, keys: Iterable[tuple[int, str, float]], now: float) -> int:
    """Mark receipts published (`Due.mark`: its key and the time its outcome was
    recorded); prune old published ones. A receipt whose outcome changed since it was
    taken (a `deferred` overtaken by `sent` while in flight) is not marked: the newer one
    is still to go. A `deferred` one goes back to waiting, for its final outcome.
    How many were marked."""
    n = c.executemany(
        "UPDATE receipt SET state = CASE outcome WHEN 'deferred' THEN 'waiting'"
        " ELSE 'published' END, updated_at = ? WHERE alert_seq = ? AND route = ?"
        " AND state = 'due' AND updated_at = ?",
        [(now, seq, route, at) for seq, route, at in keys],
    ).rowcount
    c.execute(
        "DELETE FROM receipt WHERE state = 'published' AND updated_at < ?",
        (now - KEEP_PUBLISHED,),
    )
    return int(n)


def forget_orphans(c: sqlite3.Connection) -> int:
    """Drop waiting requests whose delivery is gone (`mailgw queue delete`)."""
    return int(
        c.execute(
            "DELETE FROM receipt WHERE state = 'waiting' AND NOT EXISTS (SELECT 1 FROM"
            " delivery d WHERE d.alert_seq = receipt.alert_seq AND d.route = receipt.route)"
        ).rowcount
    )


# --- for the sources, through the writer (Writer.call) -------------------------------


def count_refused(runtime: Runtime) -> None:
    """Requests refused at MAX_KEPT since the last call, into status: the writer thread
    that refuses them has no status of its own; the sources' ticks bring them there."""
    n = _refusals.take()
    if n:
        runtime.rejected[SLOTS_FULL] += n


def take_due(ob: Outbox, origin: str, limit: int, reply: str | None = None) -> list[Due]:
    return due(ob.conn, origin, limit, reply)


def mark_published(ob: Outbox, keys: Sequence[tuple[int, str, float]]) -> int:
    with ob.transaction() as c:
        n = published(c, keys, time.time())
        forget_orphans(c)
    return n
