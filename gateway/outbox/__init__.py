"""The crash-safe SQLite outbox (a package by job).

schema (tables, migrations) · model (Routed, Claimed, Outcome, State) · rows (alert rows,
shards, the connection) · faults (whose fault a failure is) · store (the Outbox: open,
recover, add) · queue (claim, finish, prune) · seen, seen_runs (serial retransmission
memory) · storm_state · mqtt_pending · queries (status and the CLI) · writer (the one
writer thread and group commit).

Durability: WAL mode with synchronous=FULL, so a transaction that has returned
survives power loss. Sources acknowledge only after `add()` returns (invariant 1).

Layout, chosen for SD-card wear: an alert is written once into `alert` (the
large, immutable row) and its deliveries into `delivery` (small rows that change
state). State changes then rewrite a few small pages instead of the pages that
hold message text. Many alerts share one transaction (group commit): at ~2,600
single-row commits/s a commit per alert would cost 14 KB of writes each.

A delivery is one mail to send: (alert, route). Its states:

    queued ──claim──▶ sending ──2xx──▶ sent ──retention──▶ (pruned)
      ▲                  │
      └─ 4xx / network ──┤
                         └─ 5xx / expired ──▶ dead   (kept until an operator acts)
    unrouted: no route matched; kept and shown, never dropped.
    held: in flight at HOLD_AFTER starts in a row (it crashed or stalled the daemon
      each time: a poison message); set aside with the reason, never claimed, never
      expired, until `mailgw queue retry ID` (gateway/outbox/queue.py).
    suppressed: storm control folded it into another mail (`owner`): a repeat counted
      on its key's queued lead, or a line of the route's digest. It becomes sent when
      that mail is sent.

A delivery's `kind` is `mail` or `digest`. A digest row is owned by its own first
alert (`owner = alert_seq`); its other alerts are `suppressed` rows with that owner.
Storm state (gateway/storm.py) lives in `storm_lead`, `storm_bucket` and
`storm_digest`, so a restart neither forgets a window nor refills a bucket.

`due` is a time.monotonic() value of the boot recorded in `meta.due_boot`, so a
wall-clock jump cannot stall or storm retries. After a reboot every queued
delivery is due at once (a queue run at start, as Postfix does).

Claiming walks a partial index over queued rows per priority, so its cost does
not depend on how many rows are queued, deferred or sent.

Alert rows live in shard tables of SHARD_ROWS consecutive sequence numbers
(`alert_<k>`). Deleting rows one by one from a B-tree rebalances the pages
around them, rewriting several times each row's size on the SD card; dropping a
table whose deliveries are all gone costs next to nothing (docs/PERFORMANCE.md has
the figures). So pruning drops whole shards. A shard still pinned by a few
long-lived rows (dead letters, a backlog's tail) has those rows copied into
`alert_kept` and is dropped anyway.
"""

from gateway.outbox.faults import is_corruption, sqlite_code, store_error, unstorable
from gateway.outbox.model import (
    LIVE_STATES,
    MAX_PRIORITY,
    STATES,
    Claimed,
    MqttKey,
    Outcome,
    Routed,
    State,
)
from gateway.outbox.queries import counts, delete, export, find, listing, retry
from gateway.outbox.rows import (
    _ALERT_COLS,
    SHARD_ROWS,
    alert_from_row,
    alert_tables,
    connect,
    fetch_alerts,
    find_seq,
    shard_table,
    volatile_reason,
)
from gateway.outbox.schema import MIGRATIONS, SCHEMA_VERSION
from gateway.outbox.store import Outbox

__all__ = [
    "LIVE_STATES",
    "MAX_PRIORITY",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "SHARD_ROWS",
    "STATES",
    "_ALERT_COLS",
    "Claimed",
    "MqttKey",
    "Outbox",
    "Outcome",
    "Routed",
    "State",
    "alert_from_row",
    "alert_tables",
    "connect",
    "counts",
    "delete",
    "export",
    "fetch_alerts",
    "find",
    "find_seq",
    "is_corruption",
    "listing",
    "retry",
    "shard_table",
    "sqlite_code",
    "store_error",
    "unstorable",
    "volatile_reason",
]
