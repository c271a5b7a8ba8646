"""Storm control's state in the outbox: leads, buckets and open digests.

The decision is policy (gateway/storm.py, pure); this applies it inside the ingest
transaction, so a restart neither forgets a window nor refills a bucket.
"""

from __future__ import annotations

import sqlite3

from gateway.alert import Alert
from gateway.config import Policy
from gateway.storm import Bucket, Lead, decide

_INSERT = (
    "INSERT INTO delivery (alert_seq, route, state, priority, due, updated_at, kind, owner)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)


def store_storm(
    c: sqlite3.Connection,
    policy: Policy,
    alert: Alert,
    seq: int,
    route: str,
    prio: int,
    now: float,
    mono: float,
    key: str | None = None,
) -> int:
    """Storm control for one (alert, route): decide, insert its delivery, keep state.

    `key`: the alert's dedupe key on this route, computed by the caller from the route's
    template (gateway/ingest.py: storage applies policy, it does not render it). Without
    one the alert is its own key: never a repeat of another.
    """
    lead, bucket = None, None
    key = key or alert.id
    if policy.dedupe_window:
        row = c.execute(
            "SELECT l.seq, l.until, d.state FROM storm_lead l LEFT JOIN delivery d"
            " ON d.alert_seq = l.seq AND d.route = l.route WHERE l.route = ? AND l.key = ?",
            (route, key),
        ).fetchone()
        if row is not None:
            lead = Lead(row[0], row[2] == "queued", row[1])
    if policy.rate is not None:
        row = c.execute("SELECT tokens, at FROM storm_bucket WHERE route = ?", (route,)).fetchone()
        if row is not None:
            bucket = Bucket(row[0], row[1])
    d = decide(policy, alert.severity, now, lead, bucket)
    if d.bucket is not None:
        c.execute(
            "INSERT OR REPLACE INTO storm_bucket (route, tokens, at) VALUES (?, ?, ?)",
            (route, d.bucket.tokens, d.bucket.at),
        )
    if d.kind == "mail":
        c.execute(_INSERT, (seq, route, "queued", prio, 0.0, now, "mail", None))
        if d.lead_until is not None:
            c.execute(
                "INSERT OR REPLACE INTO storm_lead (route, key, seq, until) VALUES (?, ?, ?, ?)",
                (route, key, seq, d.lead_until),
            )
    elif d.kind == "repeat":
        assert lead is not None
        c.execute(_INSERT, (seq, route, "suppressed", prio, 0.0, now, "mail", lead.seq))
    else:
        row = c.execute(
            "SELECT g.seq FROM storm_digest g JOIN delivery d ON d.alert_seq = g.seq"
            " AND d.route = g.route WHERE g.route = ? AND d.state = 'queued'",
            (route,),
        ).fetchone()
        if row is not None:  # the route's open digest takes it
            c.execute(_INSERT, (seq, route, "suppressed", prio, 0.0, now, "mail", row[0]))
        else:  # this alert opens a digest, due when the period ends
            due = mono + policy.digest_every
            c.execute(_INSERT, (seq, route, "queued", prio, due, now, "digest", seq))
            c.execute(
                "INSERT OR REPLACE INTO storm_digest (route, seq) VALUES (?, ?)", (route, seq)
            )
    return 1
