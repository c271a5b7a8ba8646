"""The Outbox: opened by its one writer, it stores alerts and moves their deliveries.

Durability: WAL mode with synchronous=FULL, so a transaction that has returned
survives power loss. Sources acknowledge only after `add()` returns (invariant 1).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gateway.clock import boot_id
from gateway.config import Policy
from gateway.errors import GatewayError, OutboxCorrupt, OutboxFull, StoreUnavailable, Unstorable
from gateway.outbox import held, mqtt_pending, queue, receipts
from gateway.outbox.faults import is_corruption, sqlite_code, store_error, unstorable
from gateway.outbox.model import Claimed, Outcome, Routed
from gateway.outbox.room import Held, Room, unrouted_room
from gateway.outbox.rows import (
    _ALERT_COLS,
    _alert_row,
    _insert_rows,
    connect,
    shard_table,
    volatile_reason,
)
from gateway.outbox.schema import _ALERT_TABLE, MIGRATIONS, SCHEMA_VERSION
from gateway.outbox.seen import split_key
from gateway.outbox.seen_runs import SeenRuns
from gateway.outbox.storm_state import store_storm

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _BatchRows:
    """What one add() writes, decided inside its transaction."""

    alerts: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)  # shard → rows
    deliveries: list[tuple[Any, ...]] = field(default_factory=list)
    pending: dict[int, tuple[Any, ...]] = field(default_factory=dict)  # mid → mqtt row
    marks: list[tuple[str, str, str]] = field(default_factory=list)  # watch rows
    receipts: list[tuple[int, str, str, Any]] = field(default_factory=list)  # requests
    now: float = 0.0
    duplicates: list[str] = field(default_factory=list)
    added: int = 0  # live deliveries added (storm control's included), readings not
    next_seq: int = 1
    unrouted: int = 0  # unrouted readings kept
    pruned: int = 0  # expired unrouted readings deleted to make room for these
    tried_prune: bool = False
    not_kept: list[str] = field(default_factory=list)  # ids of readings over their share


RECOUNT_EVERY = 1.0
_PRUNE_IN_ADD = 500  # expired readings deleted at most by one add() whose share is full
_NO_KEYS: dict[str, str] = {}  # seconds between recounts of live rows while at the bound


class Outbox:
    """The outbox, opened by its one writer. Not thread-safe: one thread uses it."""

    def __init__(
        self,
        path: Path,
        *,
        max_messages: int = 100_000,
        allow_volatile: bool = False,
        boot: str | None = None,
        recover: bool = True,
        policies: Mapping[str, Policy] | None = None,
        room: Room | None = None,
    ) -> None:
        self.path = Path(path)
        # The shares of local mail and unrouted readings (gateway/outbox/room.py).
        self.room = room or Room(max_messages)
        # Unrouted readings kept now; `live` counts alerts and local mail only.
        self.unrouted = 0
        # The ids of readings the last add() acknowledged without keeping (the writer
        # hands them to the sources' counters).
        self.not_kept: list[str] = []
        self._unrouted_full = False
        self._unrouted_said = -1e9  # monotonic: when "keeps no more" was last said
        self._unrouted_told = False  # and the "again" that ends it is still to say
        # Storm control by route name; replaced whole on reload (the writer reads it).
        self.policies: Mapping[str, Policy] = policies or {}
        self.boot = boot or boot_id()
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not allow_volatile and (why := volatile_reason(self.path.parent)):
            raise OutboxCorrupt(
                f"refusing to keep the outbox where a power cut erases it: {why}. Mount "
                "persistent storage at the state directory, or set outbox.allow_volatile = true "
                "if losing queued alerts on power loss is acceptable"
            )
        self._shards: set[str] = set()
        # The newest run of each boot, as committed (gateway/outbox/seen.py): new seqs nearly
        # always extend it, so most batches need no query. Only this object writes runs.
        self._runs = SeenRuns()
        self.conn = self._open_checked()
        try:
            self._migrate()
            if recover:  # only the daemon may: another process's `sending` rows are live
                self._recover()
            self._recount()
        except sqlite3.Error as exc:
            self.conn.close()
            if not is_corruption(exc):
                raise self._unavailable(exc) from exc
            # quick_check passed, yet reading it found corruption: the same as failing it.
            self.conn = self._set_aside(str(exc))
            self._migrate()
            if recover:
                self._recover()
            self._recount()
        self._recounted = time.monotonic()

    @property
    def max_messages(self) -> int:
        return self.room.max_messages

    @max_messages.setter
    def max_messages(self, bound: int) -> None:
        # The shares are of the bound: they follow it.
        self.room = replace(self.room, max_messages=bound)

    # --- opening ---------------------------------------------------------

    def _open_checked(self) -> sqlite3.Connection:
        """Open and check the file; move it aside only if it is really corrupt.

        A file that is locked by another process, on a full disk or behind an I/O error
        is healthy as far as we know: raise StoreUnavailable or OutboxFull (the daemon
        waits and tries again). Taking it for corruption would start an empty outbox and
        strand every alert queued in it.
        """
        try:
            conn = connect(self.path)
        except sqlite3.Error as exc:
            if not is_corruption(exc):
                raise self._unavailable(exc) from exc
            reason = str(exc)
        else:
            try:
                result = conn.execute("PRAGMA quick_check").fetchone()[0]
            except sqlite3.Error as exc:
                conn.close()
                if not is_corruption(exc):
                    raise self._unavailable(exc) from exc
                reason = str(exc)
            else:
                if result == "ok":
                    return conn
                conn.close()
                reason = f"quick_check says: {result}"
        return self._set_aside(reason)

    def _set_aside(self, reason: str) -> sqlite3.Connection:
        """Move a corrupt file aside (never delete it) and start an empty outbox."""
        aside = self._move_aside()
        log.critical(
            "the outbox %s is corrupt (%s); it was moved to %s and a new, empty outbox "
            "started. Alerts in the old file are NOT lost: inspect or salvage it with "
            "`mailgw queue salvage %s`",
            self.path,
            reason,
            aside,
            aside,
        )
        return connect(self.path)

    def _unavailable(self, exc: BaseException) -> GatewayError:
        """An error that leaves the file as it is, said for the operator."""
        err = store_error(exc, self.path)
        if isinstance(err, OutboxFull):
            return OutboxFull(
                f"the disk holding {self.path} is full ({exc}); free some space "
                "(df -h, journalctl --vacuum-size=...); the outbox is kept as it is"
            )
        code = sqlite_code(exc)
        if code in (5, 6):  # SQLITE_BUSY, SQLITE_LOCKED
            return StoreUnavailable(
                f"the outbox {self.path} is locked by another process ({exc}); is another "
                f"mailgw or an sqlite3 shell holding it? (fuser -v {self.path})"
            )
        if isinstance(err, GatewayError):
            return StoreUnavailable(f"cannot open the outbox {self.path}: {exc}")
        return StoreUnavailable(f"cannot open the outbox {self.path}: {exc!r}")

    def _move_aside(self) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{self.path}{suffix}")
            if src.exists():
                src.rename(f"{aside}{suffix}")
        return aside

    def _migrate(self) -> None:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise OutboxCorrupt(
                f"{self.path} has schema version {version}, newer than this mailgw "
                f"understands ({SCHEMA_VERSION}); upgrade mailgw or restore a backup"
            )
        if version == 0:
            log.info("creating a new outbox at %s", self.path)
        for step in range(version, SCHEMA_VERSION):
            # executescript() commits first; wrap each step so it lands whole or not at all.
            self.conn.executescript(
                f"BEGIN IMMEDIATE; {MIGRATIONS[step]}; PRAGMA user_version = {step + 1}; COMMIT;"
            )
            if version > 0:
                log.info("outbox schema migrated from version %d to %d", step, step + 1)

    def _recover(self) -> None:
        with self.transaction() as c:
            n, held = queue.recover_in_flight(c, time.time())
            row = c.execute("SELECT value FROM meta WHERE key = 'due_boot'").fetchone()
            if row is None or row[0] != self.boot:
                c.execute("UPDATE delivery SET due = 0 WHERE state = 'queued' AND due != 0")
                c.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('due_boot', ?)", (self.boot,)
                )
        if n:
            log.warning(
                "%d deliveries were in flight when the gateway stopped; they are queued "
                "again and will be sent with their original Message-ID",
                n,
            )
        for alert_id, route in held:
            log.error(
                "alert %s (route %s) was in flight at each of the last %d crashes or stalls "
                "of the gateway; it is held aside and will not be sent again until "
                "`mailgw queue retry %s` (see `mailgw queue list --state held`)",
                alert_id,
                route or "-",
                queue.HOLD_AFTER,
                alert_id,
            )

    def _recount(self) -> Held:
        """Count what is held by kind; `live` is what counts against max_messages."""
        now = held.held(self.conn)
        self.live = now.counted
        self.unrouted = now.unrouted
        return now

    def close(self) -> None:
        self.conn.close()

    # --- transactions ----------------------------------------------------

    class _Tx:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def __enter__(self) -> sqlite3.Connection:
            self.conn.execute("BEGIN IMMEDIATE")
            return self.conn

        def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
            if exc_type is None:
                try:
                    self.conn.execute("COMMIT")
                except sqlite3.Error:
                    # A COMMIT that fails (disk full, I/O error) may leave the transaction
                    # open; every later BEGIN would then fail too.
                    if self.conn.in_transaction:
                        self.conn.execute("ROLLBACK")
                    raise
            elif self.conn.in_transaction:  # SQLite may have rolled back already (FULL)
                self.conn.execute("ROLLBACK")

    def transaction(self) -> Outbox._Tx:
        return Outbox._Tx(self.conn)

    # --- ingest ------------------------------------------------------------

    def add(
        self,
        batch: Sequence[Routed],
        now: float | None = None,
        mono: float | None = None,
        *,
        checked: bool = False,
    ) -> list[str]:
        """Store alerts in one transaction; return once committed.

        Returns the keys of alerts skipped as already stored: the `seen_key` of a serial
        retransmission, the `MqttKey.name` of an MQTT redelivery (mqtt_pending.py).
        Raises Unstorable (storing nothing) for an alert whose own values cannot be
        stored, unless `checked` (the writer has just checked); OutboxFull, storing
        nothing, when the bound would be exceeded or the disk is full; StoreUnavailable
        for any other failure. `now` (wall) and `mono` (monotonic) are the clocks storm
        control runs on; tests pass their own.
        """
        for r in () if checked else batch:
            if (why := unstorable(r)) is not None:
                raise Unstorable(f"alert {r.alert.id}: {why}")
        # Unrouted readings hold no room of the alerts' (their own share, in _rows).
        if counted := sum(len(r.deliveries) for r in batch):
            self._check_bound(counted)
        now = time.time() if now is None else now
        mono = time.monotonic() if mono is None else mono
        try:
            with self.transaction() as c:
                batch_rows = self._rows(c, batch, now, mono)
                created = self._write(c, batch_rows)
        except BaseException as exc:
            self._runs.forget()  # rolled back: what it learnt of runs was not committed
            err = store_error(exc, self.path)
            if err is exc:
                raise
            raise err from exc
        # Only now: a rolled-back CREATE TABLE must not be remembered as existing, or
        # every later batch would insert into a table that is not there.
        self._shards |= created
        self.live += batch_rows.added
        self.unrouted += batch_rows.unrouted - batch_rows.pruned
        self.not_kept = batch_rows.not_kept
        if batch_rows.not_kept:
            self._say_unrouted_full(True)
        elif batch_rows.unrouted and self.unrouted * 4 < self.room.unrouted_limit * 3:
            self._say_unrouted_full(False)
        return batch_rows.duplicates

    def _say_unrouted_full(self, full: bool) -> None:
        """Once when readings stop being kept, once when their share is below three
        quarters again; under a steady overload (expired readings make room now and
        then) at most once an hour: the count in status says the rest."""
        now = time.monotonic()
        if full == self._unrouted_full:
            return
        self._unrouted_full = full
        if full and now - self._unrouted_said > 3600:
            self._unrouted_said = now
            self._unrouted_told = True
            log.warning(
                "the outbox keeps no more unrouted readings: %d are kept, the share is "
                "outbox.unrouted_percent = %d%% of max_messages, each kept for "
                "outbox.keep_unrouted = %.0f s. New ones are still acknowledged and seen "
                "by silence watchers, only not kept for `mailgw queue list` (counted as "
                "unrouted_share_full); alerts are not affected",
                self.unrouted,
                self.room.unrouted_percent,
                self.room.keep_unrouted,
            )
        elif not full and self._unrouted_told:
            self._unrouted_told = False
            log.info("the outbox keeps unrouted readings again")

    def _check_bound(self, new_deliveries: int) -> None:
        if (
            self.live + new_deliveries > self.max_messages
            and time.monotonic() - self._recounted > RECOUNT_EVERY
        ):
            # Another process (`mailgw queue delete`, `send`) may have changed the count.
            # At most once a second: the count scans the table, and while the outbox is
            # full every source retries; a recount per retry would starve the relay.
            self._recount()
            self._recounted = time.monotonic()
        if self.live + new_deliveries > self.max_messages:
            raise OutboxFull(
                f"outbox holds {self.live} undelivered messages, bound is "
                f"outbox.max_messages = {self.max_messages}"
            )

    def _rows(
        self, c: sqlite3.Connection, batch: Sequence[Routed], now: float, mono: float
    ) -> _BatchRows:
        """Inside the transaction: what the batch adds (retransmissions, redeliveries
        and storm control decided), and the sequence number after it."""
        out = _BatchRows(now=now)
        row = c.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
        seq = int(row[0]) if row else 1
        keys = [None if r.seen_key is None else split_key(r.seen_key) for r in batch]
        fresh = self._runs.record(c, keys, now)
        policies = self.policies
        for r, key in zip(batch, keys, strict=True):
            if r.seen_key is not None:
                if key not in fresh:
                    out.duplicates.append(r.seen_key)
                    continue
                fresh.remove(key)  # twice in one batch: store it once
            if (mk := r.mqtt) is not None:
                if mk.dup and mqtt_pending.redelivered(c, mk, out.pending):
                    out.duplicates.append(mk.name)
                    continue
                out.pending[mk.mid] = (mk.mid, mk.digest, r.alert.id, mk.conn)
            if not r.deliveries and not self._keep_unrouted(c, out, now):
                # Acknowledged, and seen by the watchers (ingest's observers), not kept.
                out.not_kept.append(r.alert.id)
                out.marks.extend(r.marks)
                continue
            out.alerts.setdefault(shard_table(seq), []).append((seq, *_alert_row(r.alert)))
            out.marks.extend(r.marks)
            storm_keys = dict(r.storm_keys) if r.storm_keys else _NO_KEYS
            for rt, p in r.deliveries:
                policy = policies.get(rt)
                if policy is None or not policy.active:
                    out.deliveries.append((seq, rt, "queued", p, now))
                else:
                    key_text = storm_keys.get(rt)
                    out.added += store_storm(c, policy, r.alert, seq, rt, p, now, mono, key_text)
            if r.receipt is not None:
                out.receipts.extend((seq, rt, r.alert.id, r.receipt) for rt, _ in r.deliveries)
            if not r.deliveries:
                out.deliveries.append((seq, "", "unrouted", int(r.alert.severity), now))
                out.unrouted += 1
            seq += 1
        out.next_seq = seq
        out.added += len(out.deliveries) - out.unrouted
        return out

    def _keep_unrouted(self, c: sqlite3.Connection, out: _BatchRows, now: float) -> bool:
        """Is there room to keep one more unrouted reading? When its share is full,
        first delete those past outbox.keep_unrouted (at most once per batch)."""
        held_now = self.unrouted + out.unrouted - out.pruned
        if unrouted_room(self.room, held_now) > 0:
            return True
        if out.tried_prune or held_now == 0:
            return False
        out.tried_prune = True  # nothing more expires within one batch
        # A bounded delete: this runs in the transaction that acknowledges alerts; the
        # minute's housekeeping prune takes the rest.
        out.pruned += held.prune_unrouted(c, now - self.room.keep_unrouted, _PRUNE_IN_ADD)
        return unrouted_room(self.room, self.unrouted + out.unrouted - out.pruned) > 0

    def _write(self, c: sqlite3.Connection, rows: _BatchRows) -> set[str]:
        """Insert what `_rows` decided; the shard tables this created."""
        created: set[str] = set()
        for table, chunk in rows.alerts.items():
            if table not in self._shards:
                c.execute(_ALERT_TABLE.format(name=table))
                created.add(table)
            _insert_rows(c, f"{table} ({_ALERT_COLS})", 14, chunk)
        _insert_rows(
            c, "delivery (alert_seq, route, state, priority, updated_at)", 5, rows.deliveries
        )
        _insert_rows(c, "mqtt_pending", 4, list(rows.pending.values()), "INSERT OR REPLACE")
        if rows.receipts:
            receipts.insert(c, rows.receipts, rows.now)
        if rows.marks:
            c.executemany(
                "INSERT OR REPLACE INTO watch (kind, key, state) VALUES (?, ?, ?)", rows.marks
            )
        c.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('next_seq', ?)",
            (str(rows.next_seq),),
        )
        return created

    def mqtt_settled(
        self, keys: Iterable[tuple[int, bytes, int]] = (), keep_conn: int | None = None
    ) -> int:
        """Forget MQTT deliveries the broker no longer holds for us; how many rows went.

        `keys`: (packet id, digest, connection) of messages whose PUBACK the broker has
        had on that connection. With
        `keep_conn`, also every row that did not come (or come again) on that connection:
        on a new session the broker holds nothing for us; on a resumed one, what it was
        going to redeliver has arrived by then. Forgetting too much costs at most a
        duplicate; remembering too long could take a new message for a copy.
        """
        keys = list(keys)
        n = 0
        with self.transaction() as c:
            if keys:
                n += c.executemany(
                    "DELETE FROM mqtt_pending WHERE mid = ? AND digest = ? AND conn = ?", keys
                ).rowcount
            if keep_conn is not None:
                n += c.execute("DELETE FROM mqtt_pending WHERE conn != ?", (keep_conn,)).rowcount
        return n

    # --- relay side: the queue (gateway/outbox/queue.py) ------------------------

    def claim(self, limit: int, now: float | None = None) -> list[Claimed]:
        """Take up to `limit` due deliveries, highest priority first, oldest first."""
        with self.transaction() as c:
            return queue.claim(c, limit, time.monotonic() if now is None else now)

    def finish(self, outcomes: Iterable[Outcome], relaxed: bool = False) -> None:
        """Apply a batch of delivery outcomes in one transaction.

        `relaxed`: commit without waiting for the disk (synchronous=NORMAL): the outcome
        survives a crash of the process but not a power cut, until the next FULL commit.
        For outcomes that is enough: a lost `sent` means the mail goes again with its
        Message-ID (invariant 2), never a lost alert.
        """
        if relaxed:
            self.conn.execute("PRAGMA synchronous = NORMAL")
        try:
            outcomes = list(outcomes)
            with self.transaction() as c:
                now = time.time()
                done = queue.finish(c, outcomes, now)
                # In the same transaction: a receipt is due exactly when the outcome is
                # recorded (never before the 250; a crash before it resends the mail).
                receipts.settle(c, outcomes, now)
        finally:
            if relaxed:
                self.conn.execute("PRAGMA synchronous = FULL")
        self.live -= done

    def release_all(self) -> int:
        """Put every `sending` delivery back (orderly shutdown mid-batch)."""
        with self.transaction() as c:
            return queue.release_all(c)

    def prune(self, older_than: float, limit: int = 500) -> int:
        """Delete up to `limit` deliveries: sent ones finished before `older_than` (wall
        time), then unrouted readings older than outbox.keep_unrouted."""
        with self.transaction() as c:
            n = queue.prune(c, older_than, limit)
            gone = held.prune_unrouted(c, time.time() - self.room.keep_unrouted, limit - n)
            stale = held.prune_stale_local(c, time.time() - self.room.max_age, limit - n - gone)
        self._runs.forget()  # seen runs older than that went too
        self.unrouted -= gone
        if stale:
            self.live -= stale
            log.warning(
                "%d deliveries of local mail (sendmail) that were dead or unrouted for "
                "outbox.max_age were deleted, freeing local mail's share",
                stale,
            )
        return n + gone + stale

    def drop_free_shards(self) -> int:
        """Drop every full shard no delivery needs; rescue the few rows that pin one."""
        with self.transaction() as c:
            dropped = queue.drop_free_shards(c)
        self._shards.difference_update(dropped)
        return len(dropped)

    def refresh_live(self) -> None:
        """Recount (another process, such as `mailgw send`, may have added rows)."""
        self._recount()
