"""Apply a drain plan (gateway/drain.py) to the outbox: one transaction, all or nothing.

Runs in the writer thread (`Writer.run(lambda ob: fold(ob, ...))`), so it is the one
writer and sees the queue as the relay left it. Only `queued` rows are folded: what the
relay has claimed (`sending`) goes out as it is.

A drain digest is storm control's digest (kind `digest`, its alerts `suppressed` rows
pointing at it through `owner`; claimed, composed and settled by the same code), led by
an alert of the gateway's own: source `gateway`, sensor `drain`, topic
`gateway/<device>/drain/<route>`. That alert is stored with the fold, so the digest's
Message-ID (its id) is the same on every resend after a crash, and its message and
fields say why the backlog was folded. Its delivery has priority 0: the critical alerts,
which keep their own mails, are claimed first whatever a route's priority.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Collection
from dataclasses import dataclass, field

from gateway.alert import Alert, Severity, new_alert_id
from gateway.clock import Stamp
from gateway.drain import (
    DIGEST_CAP,
    DRAIN_SENSOR,
    DRAIN_SOURCE,
    Plan,
    RouteBacklog,
    chunks,
    human_time,
    needed,
    plan,
)
from gateway.outbox.rows import _ALERT_COLS, _alert_row, alert_tables, fetch_alerts, shard_table
from gateway.outbox.schema import _ALERT_TABLE
from gateway.outbox.store import Outbox

DIGEST_PRIORITY = 0
FOLDABLE = frozenset({"mail", "digest"})  # delivery kinds made of alerts


@dataclass(slots=True)
class _Row:
    seq: int
    severity: int
    kept: bool
    members: list[tuple[int, int]] = field(default_factory=list)  # (seq, severity)


@dataclass(frozen=True, slots=True)
class Folded:
    """A fold as committed: the plan and the digests' alert ids by route."""

    plan: Plan
    leads: dict[str, list[str]]


def queued_count(c: sqlite3.Connection) -> int:
    """Queued mails (deferred ones too): one walk of the partial index, cheap."""
    return int(
        c.execute(
            "SELECT count(*) FROM delivery INDEXED BY delivery_due WHERE state = 'queued'"
        ).fetchone()[0]
    )


def backlog(c: sqlite3.Connection, routes: Collection[str]) -> dict[str, dict[int, _Row]]:
    """Every queued delivery by route, with its alert's severity and what it carries.

    Linear in the queue: one walk of the queued rows, one of the rows folded into them,
    and one range read per shard that holds any of their alerts."""
    queued = c.execute(
        "SELECT alert_seq, route, rcpts, kind FROM delivery INDEXED BY delivery_due"
        " WHERE state = 'queued'"
    ).fetchall()
    members = c.execute(
        "SELECT owner, route, alert_seq FROM delivery"
        " WHERE state = 'suppressed' AND owner IS NOT NULL AND owner != alert_seq"
    ).fetchall()
    alerts = _severities(c, [q[0] for q in queued] + [m[2] for m in members])
    by_route: dict[str, dict[int, _Row]] = {}
    for seq, route, rcpts, kind in queued:
        sev, drain_lead = alerts.get(seq, (int(Severity.CRITICAL), False))  # unreadable: kept
        kept = (
            route not in routes
            # Only alerts fold: a `raw` mail (`mailgw sendmail`) is its stored bytes, and
            # a line in a digest would be all of it that ever went out.
            or kind not in FOLDABLE
            or rcpts is not None  # half delivered: the rest go as they are
            or sev >= Severity.CRITICAL
            or drain_lead  # folded already
        )
        by_route.setdefault(route, {})[seq] = _Row(seq, sev, kept)
    for owner, route, seq in members:
        row = by_route.get(route, {}).get(owner)
        if row is None:
            continue  # its mail is in flight, dead or gone: not ours to move
        sev = alerts.get(seq, (int(Severity.CRITICAL), False))[0]
        row.members.append((seq, sev))
        if sev >= Severity.CRITICAL:
            row.kept = True  # a critical repeat stays on its mail
    return by_route


def _severities(c: sqlite3.Connection, seqs: list[int]) -> dict[int, tuple[int, bool]]:
    """seq → (severity, whether it is a drain digest's lead), read by shard ranges."""
    existing = set(alert_tables(c))
    by_table: dict[str, list[int]] = {}
    for seq in seqs:
        table = shard_table(seq)
        by_table.setdefault(table if table in existing else "alert_kept", []).append(seq)
    out: dict[int, tuple[int, bool]] = {}
    for table, group in by_table.items():
        for seq, sev, source, sensor in c.execute(
            f"SELECT seq, severity, source, sensor FROM {table} WHERE seq BETWEEN ? AND ?",
            (min(group), max(group)),
        ):
            out[seq] = (sev, source == DRAIN_SOURCE and sensor == DRAIN_SENSOR)
    return out


def counted(rows: dict[str, dict[int, _Row]]) -> dict[str, RouteBacklog]:
    out = {}
    for route, by_seq in rows.items():
        kept = sum(1 for r in by_seq.values() if r.kept)
        foldable = [r for r in by_seq.values() if not r.kept]
        out[route] = RouteBacklog(kept, len(foldable), sum(1 + len(r.members) for r in foldable))
    return out


def fold(
    outbox: Outbox,
    *,
    rate: tuple[int, float],
    within: float,
    routes: Collection[str],
    device_id: str,
    rate_text: str,
    now: Stamp | None = None,
    cap: int = DIGEST_CAP,
) -> Folded | None:
    """Fold the backlog when it would take longer than `within` at `rate`; None when
    it would not (the usual answer, from one count)."""
    c = outbox.conn
    if not needed(queued_count(c), rate, within):
        return None
    now = now or Stamp.now()
    with outbox.transaction() as c:
        rows = backlog(c, routes)
        p = plan(counted(rows), rate, within, cap)
        if p is None:
            return None
        leads = _apply(c, rows, p, now, device_id, rate_text, within)
    outbox.live += sum(p.digests.values())  # the folded rows were live, and still are
    return Folded(p, leads)


def _apply(
    c: sqlite3.Connection,
    rows: dict[str, dict[int, _Row]],
    p: Plan,
    now: Stamp,
    device_id: str,
    rate_text: str,
    within: float,
) -> dict[str, list[str]]:
    row = c.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
    next_seq = int(row[0]) if row else 1
    leads: dict[str, list[str]] = {}
    moves: list[tuple[int, float, int, str]] = []
    for route, n in p.digests.items():
        severity = {}
        for r in rows[route].values():
            if not r.kept:
                severity[r.seq] = r.severity
                severity.update(r.members)
        for i, part in enumerate(chunks(sorted(severity), n)):
            # The digest is as old as the newest alert it folds: outbox.max_age expires
            # it no sooner than it would have expired any of them alone.
            newest = fetch_alerts(c, [part[-1]]).get(part[-1])
            lead = Alert(
                id=new_alert_id(now.wall),
                topic=f"gateway/{device_id}/drain/{route}",
                source=DRAIN_SOURCE,
                sensor=DRAIN_SENSOR,
                severity=Severity(max(severity[s] for s in part)),
                message=(
                    f"drain plan: {p.mails:,} queued mails would have taken "
                    f"{human_time(p.seconds)} at {rate_text} (smtp.drain_within "
                    f"{human_time(within)}); this digest folds {len(part):,} alerts of "
                    f"route {route} (part {i + 1} of {n})"
                ),
                received=newest.received if newest is not None else now,
                fields={
                    "drain_alerts": len(part),
                    "drain_part": f"{i + 1}/{n}",
                    "drain_backlog_mails": p.mails,
                    "drain_would_take_s": round(p.seconds),
                    "drain_rate": rate_text,
                },
            )
            table = shard_table(next_seq)
            c.execute(_ALERT_TABLE.format(name=table))
            c.execute(
                f"INSERT INTO {table} ({_ALERT_COLS}) VALUES ({', '.join('?' * 14)})",
                (next_seq, *_alert_row(lead)),
            )
            c.execute(
                "INSERT INTO delivery (alert_seq, route, state, priority, due, updated_at,"
                " kind, owner) VALUES (?, ?, 'queued', ?, 0, ?, 'digest', ?)",
                (next_seq, route, DIGEST_PRIORITY, now.wall, next_seq),
            )
            moves += [(next_seq, now.wall, s, route) for s in part]
            leads.setdefault(route, []).append(lead.id)
            next_seq += 1
    c.executemany(
        "UPDATE delivery SET state = 'suppressed', owner = ?, updated_at = ?"
        " WHERE alert_seq = ? AND route = ?",
        moves,
    )
    c.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('next_seq', ?)", (str(next_seq),))
    return leads
