"""The crash-safe SQLite outbox.

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
around them and, measured here, writes ~3 KB per deleted 600-byte row; dropping
a table whose deliveries are all gone writes ~16 bytes per row. So pruning drops
whole shards. A shard still pinned by a few long-lived rows (dead letters, a
backlog's tail) has those rows copied into `alert_kept` and is dropped anyway.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.alert import Alert, Severity
from gateway.clock import Stamp, boot_id
from gateway.errors import GatewayError, OutboxCorrupt, OutboxFull, StoreUnavailable, Unstorable
from gateway.routing import render
from gateway.seen import Run, merge, split_key
from gateway.storm import Bucket, Lead, Policy, decide

log = logging.getLogger(__name__)

SCHEMA_VERSION = 6
STATES = ("queued", "sending", "sent", "dead", "unrouted", "suppressed")
MAX_PRIORITY = 9
LIVE_STATES = ("queued", "sending", "dead", "unrouted", "suppressed")

SHARD_ROWS = 4096
RECOUNT_EVERY = 1.0  # seconds between recounts of live rows while at the bound
MAX_BOOTS_REMEMBERED = 4096  # device boots whose newest run is kept in memory

_ALERT_TABLE = """
    CREATE TABLE IF NOT EXISTS {name} (
        seq          INTEGER PRIMARY KEY,
        id           TEXT    NOT NULL UNIQUE,
        topic        TEXT    NOT NULL,
        source       TEXT    NOT NULL,
        sensor       TEXT    NOT NULL,
        severity     INTEGER NOT NULL,
        message      TEXT    NOT NULL,
        event_time   TEXT,
        received_at  REAL    NOT NULL,
        boottime     REAL    NOT NULL,
        boot_id      TEXT    NOT NULL,
        clock_synced INTEGER NOT NULL,
        fields       TEXT    NOT NULL DEFAULT '{{}}',
        notes        TEXT    NOT NULL DEFAULT ''
    )"""

# Each entry upgrades the schema from version i to i+1. Never edit a released
# step: devices in the field sit at every version and upgrade in order.
MIGRATIONS: tuple[str, ...] = (
    # 0 → 1: deliveries, metadata, and the table for alerts outliving their shard.
    f"""
    {_ALERT_TABLE.format(name="alert_kept")};
    CREATE TABLE delivery (
        alert_seq  INTEGER NOT NULL,
        route      TEXT    NOT NULL,
        state      TEXT    NOT NULL,
        priority   INTEGER NOT NULL,
        due        REAL    NOT NULL DEFAULT 0,
        attempts   INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        updated_at REAL    NOT NULL,
        PRIMARY KEY (alert_seq, route)
    ) WITHOUT ROWID;
    CREATE INDEX delivery_due ON delivery (priority, due, alert_seq) WHERE state = 'queued';
    CREATE INDEX delivery_sent ON delivery (updated_at) WHERE state = 'sent';
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
    """,
    # 1 → 2: retransmission memory for the serial protocol (device, boot, seq).
    """
    CREATE TABLE seen (
        key      TEXT PRIMARY KEY,
        alert_id TEXT NOT NULL,
        at       REAL NOT NULL
    ) WITHOUT ROWID;
    """,
    # 2 → 3: recipients still to do after a partial delivery (some got it, some 4xx).
    """
    ALTER TABLE delivery ADD COLUMN rcpts TEXT;
    """,
    # 3 → 4: storm control: digests, repeats folded into another mail, policy state.
    """
    ALTER TABLE delivery ADD COLUMN kind TEXT NOT NULL DEFAULT 'mail';
    ALTER TABLE delivery ADD COLUMN owner INTEGER;
    CREATE INDEX delivery_owner ON delivery (owner, route) WHERE owner IS NOT NULL;
    CREATE TABLE storm_lead (
        route TEXT NOT NULL, key TEXT NOT NULL, seq INTEGER NOT NULL, until REAL NOT NULL,
        PRIMARY KEY (route, key)
    ) WITHOUT ROWID;
    CREATE TABLE storm_bucket (
        route TEXT PRIMARY KEY, tokens REAL NOT NULL, at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE storm_digest (route TEXT PRIMARY KEY, seq INTEGER NOT NULL) WITHOUT ROWID;
    """,
    # 4 → 5: retransmission memory as runs of seqs per boot, not a row per alert
    # (gateway/seen.py). Each boot's keys become its runs: gaps and islands.
    """
    CREATE TABLE seen_run (
        boot TEXT    NOT NULL,
        lo   INTEGER NOT NULL,
        hi   INTEGER NOT NULL,
        at   REAL    NOT NULL,
        PRIMARY KEY (boot, lo)
    ) WITHOUT ROWID;
    INSERT INTO seen_run (boot, lo, hi, at)
        SELECT boot, min(n), max(n), max(at) FROM (
            SELECT boot, n, at, n - row_number() OVER (PARTITION BY boot ORDER BY n) AS island
            FROM (
                SELECT substr(key, 1, length(rtrim(key, '0123456789')) - 1) AS boot,
                       CAST(substr(key, length(rtrim(key, '0123456789')) + 1) AS INTEGER) AS n,
                       at
                FROM seen WHERE key GLOB '*/[0-9]*' AND rtrim(key, '0123456789') GLOB '*/'
            )
        ) GROUP BY boot, island;
    DROP TABLE seen;
    """,
    # 5 → 6: MQTT messages committed whose PUBACK the broker is not known to have had,
    # so that their redelivery is recognised (Outbox.add, gateway/sources/mqtt.py).
    """
    CREATE TABLE mqtt_pending (
        mid      INTEGER PRIMARY KEY,
        digest   BLOB    NOT NULL,
        alert_id TEXT    NOT NULL,
        conn     INTEGER NOT NULL
    ) WITHOUT ROWID;
    """,
)
assert len(MIGRATIONS) == SCHEMA_VERSION


@dataclass(frozen=True, slots=True)
class MqttKey:
    """What names an MQTT QoS 1 delivery to the gateway, for recognising its redelivery.

    mid: the broker's packet id. digest: blake2b of (client id, QoS, topic, payload).
    dup: the PUBLISH had its DUP flag (the broker sends it again). conn: a random token
    of the connection it came on (a new one per CONNACK).
    """

    mid: int
    digest: bytes
    dup: bool
    conn: int

    @property
    def name(self) -> str:
        """Its entry in Outbox.add's duplicates when recognised as a redelivery."""
        return f"mqtt:{self.mid}:{self.digest.hex()}"


@dataclass(frozen=True, slots=True)
class Routed:
    """An alert with the deliveries the router chose for it (route, priority)."""

    alert: Alert
    deliveries: tuple[tuple[str, int], ...]
    seen_key: str | None = None
    mqtt: MqttKey | None = None


@dataclass(frozen=True, slots=True)
class Claimed:
    alert: Alert
    route: str
    attempts: int
    seq: int
    rcpts: tuple[str, ...] | None = None  # None: all of the route's recipients
    kind: str = "mail"  # or "digest"
    members: tuple[Alert, ...] = ()  # mail: its counted repeats; digest: its other alerts

    @property
    def key(self) -> tuple[int, str]:
        return (self.seq, self.route)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one claimed delivery; applied in one transaction."""

    key: tuple[int, str]
    state: str  # sent | queued | dead
    due: float = 0.0
    error: str | None = None
    count_attempt: bool = True
    rcpts: tuple[str, ...] | None = None  # queued: only these recipients are left


def volatile_reason(path: Path) -> str | None:
    """Why `path` would not survive a power cut (tmpfs, overlay), or None."""
    try:
        target = os.path.realpath(path)
        best, fstype = "", ""
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                mount = parts[4].replace("\\040", " ")
                fs = parts[parts.index("-") + 1]
                inside = target == mount or target.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, fstype = mount, fs
    except (OSError, ValueError, IndexError):
        return None
    if fstype in ("tmpfs", "ramfs", "overlay", "squashfs", "zram"):
        return f"{path} is on {fstype} (mounted at {best})"
    return None


# One encoder for every row: json.dumps() with these options builds a new JSONEncoder
# per call, which cost more than encoding a serial alert's three fields.
_fields_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


ROWS_PER_INSERT = 64


def _insert_rows(
    c: sqlite3.Connection,
    into: str,
    width: int,
    rows: Sequence[tuple[Any, ...]],
    verb: str = "INSERT",
) -> None:
    """Insert rows up to ROWS_PER_INSERT to a statement rather than one a statement.

    executemany() steps the statement once per row, and gives up the GIL at every step;
    getting it back waits on whichever source thread holds it. Chunks of 64, then the
    rest in powers of two: at most seven statements per table, each one cached.
    """
    one = "(" + ", ".join("?" * width) + ")"
    i = 0
    while i < len(rows):
        n = min(ROWS_PER_INSERT, 1 << ((len(rows) - i).bit_length() - 1))
        sql = f"{verb} INTO {into} VALUES {', '.join([one] * n)}"
        c.execute(sql, [v for row in rows[i : i + n] for v in row])
        i += n


def _alert_row(a: Alert) -> tuple[Any, ...]:
    return (
        a.id,
        a.topic,
        a.source,
        a.sensor,
        int(a.severity),
        a.message,
        a.event_time,
        a.received.wall,
        a.received.boottime,
        a.received.boot_id,
        int(a.received.synced),
        _fields_json(dict(a.fields)) if a.fields else "{}",
        ",".join(a.notes),
    )


_ALERT_COLS = (
    "seq, id, topic, source, sensor, severity, message, event_time, received_at, boottime, "
    "boot_id, clock_synced, fields, notes"
)


def alert_from_row(row: Sequence[Any]) -> Alert:
    (
        _seq,
        aid,
        topic,
        source,
        sensor,
        sev,
        message,
        event_time,
        received_at,
        bt,
        boot,
        synced,
        fields,
        notes,
    ) = row
    return Alert(
        id=aid,
        topic=topic,
        source=source,
        sensor=sensor,
        severity=Severity(sev),
        message=message,
        event_time=event_time,
        received=Stamp(wall=received_at, boottime=bt, boot_id=boot, synced=bool(synced)),
        fields=json.loads(fields) if fields and fields != "{}" else {},
        notes=tuple(n for n in notes.split(",") if n),
    )


_SQLITE_FULL = 13
_CORRUPT_CODES = frozenset({11, 26})  # SQLITE_CORRUPT, SQLITE_NOTADB


def _text_ok(text: str | None) -> bool:
    if text is None or text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def unstorable(r: Routed) -> str | None:
    """Why this alert's own values can never be stored, or None.

    Decided from the alert alone, before any transaction: an error inside one may as
    well come from the outbox's own state (a damaged counter, a lock), and taking such
    an error for the alert's fault would acknowledge, and so lose, every alert.
    normalize() already repairs what this refuses; this guards the door for any other.
    """
    a = r.alert
    for name, text in (
        ("id", a.id),
        ("topic", a.topic),
        ("source", a.source),
        ("sensor", a.sensor),
        ("message", a.message),
        ("event_time", a.event_time),
    ):
        if not isinstance(text, str | None) or not _text_ok(text):
            return f"{name} is not valid Unicode text"
    if not isinstance(a.severity, int) or not 0 <= int(a.severity) <= MAX_PRIORITY:
        return f"severity {a.severity!r} is not a severity"
    for key, value in a.fields.items():
        if not isinstance(key, str) or not _text_ok(key):
            return "a field name is not valid Unicode text"
        if isinstance(value, str):
            if not _text_ok(value):
                return f"field {key!r} is not valid Unicode text"
        elif value is not None and not isinstance(value, bool | int | float):
            return f"field {key!r} is not a text, number or boolean"
    if r.seen_key is not None:
        try:
            split_key(r.seen_key)
        except ValueError as exc:
            return str(exc)
    return None


def sqlite_code(exc: BaseException) -> int | None:
    """SQLite's primary result code of an exception, or None."""
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else int(code) & 0xFF


def is_corruption(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.DatabaseError) and sqlite_code(exc) in _CORRUPT_CODES


def store_error(exc: BaseException, path: Path) -> BaseException:
    """What a failed ingest transaction means for the sources.

    OutboxFull: the disk is full (wait, do not acknowledge). Any other failure inside
    the transaction is StoreUnavailable: nothing was stored, the same batch may succeed
    later; the sources keep their alerts unacknowledged. (What an alert's own values
    make unstorable is found before the transaction: `unstorable`.)
    """
    if isinstance(exc, OutboxFull | StoreUnavailable | Unstorable):
        return exc
    code = sqlite_code(exc)
    if code == _SQLITE_FULL or (
        isinstance(exc, sqlite3.OperationalError) and "full" in str(exc).lower()
    ):
        return OutboxFull(f"the disk holding {path} is full: {exc}")
    if isinstance(exc, Exception):
        return StoreUnavailable(f"cannot write the outbox {path}: {exc}")
    return exc  # KeyboardInterrupt, SystemExit: not ours to translate


def shard_table(seq: int) -> str:
    return f"alert_{seq // SHARD_ROWS}"


def alert_tables(conn: sqlite3.Connection) -> list[str]:
    """Shard tables, oldest first, then `alert_kept`."""
    names = [
        r[0]
        for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name GLOB 'alert_[0-9]*'"
        )
    ]
    return [*sorted(names, key=lambda n: int(n[6:])), "alert_kept"]


def fetch_alerts(conn: sqlite3.Connection, seqs: Iterable[int]) -> dict[int, Alert]:
    """Alerts by sequence number, from their shard or from `alert_kept`."""
    existing = set(alert_tables(conn))
    by_table: dict[str, list[int]] = {}
    for seq in sorted(set(seqs)):
        table = shard_table(seq)
        by_table.setdefault(table if table in existing else "alert_kept", []).append(seq)
    found: dict[int, Alert] = {}
    for table, group in by_table.items():
        for i in range(0, len(group), 500):
            chunk = group[i : i + 500]
            marks = ",".join("?" * len(chunk))
            for row in conn.execute(
                f"SELECT {_ALERT_COLS} FROM {table} WHERE seq IN ({marks})", chunk
            ):
                found[row[0]] = alert_from_row(row)
    return found


def find_seq(conn: sqlite3.Connection, alert_id: str) -> tuple[int, str] | None:
    """(sequence number, table) of an alert id; each shard has an index on id."""
    for table in reversed(alert_tables(conn)):
        row = conn.execute(f"SELECT seq FROM {table} WHERE id = ?", (alert_id,)).fetchone()
        if row is not None:
            return int(row[0]), table
    return None


def _decode_text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
        )
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 10000")
    # A flipped bit in a stored text (an SD card's doing) must cost a replacement
    # character in one mail, not a UnicodeDecodeError in every claim of the queue.
    conn.text_factory = _decode_text
    if not readonly:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        # Zeroing freed pages would double the wear of pruning for no benefit here.
        conn.execute("PRAGMA secure_delete = OFF")
    return conn


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
    ) -> None:
        self.path = Path(path)
        self.max_messages = max_messages
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
        # The newest run of each boot, as committed (gateway/seen.py): new seqs nearly
        # always extend it, so most batches need no query. Only this object writes runs.
        self._last_run: dict[str, Run] = {}
        self.conn = self._open_checked()
        try:
            self._migrate()
            if recover:  # only the daemon may: another process's `sending` rows are live
                self._recover()
            self.live = self._count_live()
        except sqlite3.Error as exc:
            self.conn.close()
            if not is_corruption(exc):
                raise self._unavailable(exc) from exc
            # quick_check passed, yet reading it found corruption: the same as failing it.
            self.conn = self._set_aside(str(exc))
            self._migrate()
            if recover:
                self._recover()
            self.live = self._count_live()
        self._recounted = time.monotonic()

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
            n = c.execute("UPDATE delivery SET state = 'queued' WHERE state = 'sending'").rowcount
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

    def _count_live(self) -> int:
        marks = ",".join("?" * len(LIVE_STATES))
        return int(
            self.conn.execute(
                f"SELECT count(*) FROM delivery WHERE state IN ({marks})", LIVE_STATES
            ).fetchone()[0]
        )

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
        retransmission, the `MqttKey.name` of an MQTT redelivery (see _mqtt_redelivered).
        Raises OutboxFull, storing nothing, when the
        bound would be exceeded or the disk is full. `now` (wall) and `mono`
        (monotonic) are the clocks storm control runs on; tests pass their own.
        """
        for r in () if checked else batch:  # `checked`: the writer has just done so
            if (why := unstorable(r)) is not None:
                raise Unstorable(f"alert {r.alert.id}: {why}")
        new_deliveries = sum(len(r.deliveries) or 1 for r in batch)
        if (
            self.live + new_deliveries > self.max_messages
            and time.monotonic() - self._recounted > RECOUNT_EVERY
        ):
            # Another process (`mailgw queue delete`, `send`) may have changed the count.
            # At most once a second: the count scans the table, and while the outbox is
            # full every source retries (chaos found the writer starving the relay).
            self.live = self._count_live()
            self._recounted = time.monotonic()
        if self.live + new_deliveries > self.max_messages:
            raise OutboxFull(
                f"outbox holds {self.live} undelivered messages, bound is "
                f"outbox.max_messages = {self.max_messages}"
            )
        now = time.time() if now is None else now
        mono = time.monotonic() if mono is None else mono
        duplicates: list[str] = []
        policies = self.policies
        try:
            with self.transaction() as c:
                row = c.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
                seq = int(row[0]) if row else 1
                rows: dict[str, list[tuple[Any, ...]]] = {}
                deliveries: list[tuple[Any, ...]] = []
                stormed = 0
                keys = [None if r.seen_key is None else split_key(r.seen_key) for r in batch]
                fresh = self._record_keys(c, keys, now)
                pending: dict[int, tuple[Any, ...]] = {}  # mid → its mqtt_pending row
                for r, key in zip(batch, keys, strict=True):
                    if r.seen_key is not None:
                        if key not in fresh:
                            duplicates.append(r.seen_key)
                            continue
                        fresh.remove(key)  # twice in one batch: store it once
                    if (mk := r.mqtt) is not None:
                        if mk.dup and self._mqtt_redelivered(c, mk, pending):
                            duplicates.append(mk.name)
                            continue
                        pending[mk.mid] = (mk.mid, mk.digest, r.alert.id, mk.conn)
                    rows.setdefault(shard_table(seq), []).append((seq, *_alert_row(r.alert)))
                    for rt, p in r.deliveries:
                        policy = policies.get(rt)
                        if policy is None or not policy.active:
                            deliveries.append((seq, rt, "queued", p, now))
                        else:
                            stormed += self._storm(c, policy, r.alert, seq, rt, p, now, mono)
                    if not r.deliveries:
                        deliveries.append((seq, "", "unrouted", int(r.alert.severity), now))
                    seq += 1
                created: set[str] = set()
                for table, chunk in rows.items():
                    if table not in self._shards:
                        c.execute(_ALERT_TABLE.format(name=table))
                        created.add(table)
                    _insert_rows(c, f"{table} ({_ALERT_COLS})", 14, chunk)
                _insert_rows(
                    c, "delivery (alert_seq, route, state, priority, updated_at)", 5, deliveries
                )
                _insert_rows(c, "mqtt_pending", 4, list(pending.values()), "INSERT OR REPLACE")
                added = len(deliveries) + stormed
                c.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('next_seq', ?)", (str(seq),)
                )
        except BaseException as exc:
            self._last_run.clear()  # rolled back: what it learnt of runs was not committed
            err = store_error(exc, self.path)
            if err is exc:
                raise
            raise err from exc
        # Only now: a rolled-back CREATE TABLE must not be remembered as existing, or
        # every later batch would insert into a table that is not there.
        self._shards |= created
        self.live += added
        return duplicates

    @staticmethod
    def _mqtt_redelivered(
        c: sqlite3.Connection, mk: MqttKey, pending: dict[int, tuple[Any, ...]]
    ) -> bool:
        """Is this DUP delivery the broker's redelivery of a message committed already?

        Yes if its packet id has a row with the same digest: the broker cannot hold two
        messages under one packet id, and reuses an id only once it has our PUBACK, after
        which the MQTT source deletes the row as soon as it learns so (a confirmation
        round trip, mqtt.py). The row now belongs to this connection: it is acknowledged
        again here, and only this connection's confirmation may retire it.
        """
        if mk.mid in pending:  # the original is in this very transaction
            if pending[mk.mid][1] != mk.digest:
                return False
            pending[mk.mid] = (*pending[mk.mid][:3], mk.conn)
            return True
        row = c.execute("SELECT digest FROM mqtt_pending WHERE mid = ?", (mk.mid,)).fetchone()
        if row is None or bytes(row[0]) != mk.digest:
            return False
        c.execute("UPDATE mqtt_pending SET conn = ? WHERE mid = ?", (mk.conn, mk.mid))
        return True

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

    def _record_keys(
        self, c: sqlite3.Connection, keys: Sequence[tuple[str, int] | None], now: float
    ) -> set[tuple[str, int]]:
        """Record the batch's retransmission keys; return the (boot, seq) that were new
        (the rest are retransmissions of stored alerts). See gateway/seen.py."""
        by_boot: dict[str, list[int]] = {}
        for key in keys:
            if key is not None:
                by_boot.setdefault(key[0], []).append(key[1])
        fresh: set[tuple[str, int]] = set()
        for boot, seqs in by_boot.items():
            near, newest = self._near_runs(c, boot, min(seqs), max(seqs))
            new, runs = merge(near, seqs)
            if len(self._last_run) >= MAX_BOOTS_REMEMBERED:
                self._last_run.clear()
            # The boot's newest run now: the merge's last (which absorbed the old newest
            # if it was near), unless the boot has a newer one the batch did not touch.
            if newest is None or newest in near or newest[0] < runs[-1][0]:
                newest = runs[-1]
            self._last_run[boot] = newest
            if not new:
                continue
            fresh.update((boot, s) for s in new)
            kept = {lo for lo, _ in runs}
            for lo, _ in near:
                if lo not in kept:
                    c.execute("DELETE FROM seen_run WHERE boot = ? AND lo = ?", (boot, lo))
            for run in set(runs) - set(near):
                c.execute(
                    "INSERT OR REPLACE INTO seen_run (boot, lo, hi, at) VALUES (?, ?, ?, ?)",
                    (boot, *run, now),
                )
        return fresh

    def _near_runs(
        self, c: sqlite3.Connection, boot: str, first: int, last: int
    ) -> tuple[list[Run], Run | None]:
        """The runs that seqs first..last can fall in or join, in order; and the boot's
        newest run (None: it has none yet)."""
        newest = self._last_run.get(boot)
        if newest is not None and first >= newest[0]:
            # Every older run ends below newest[0] - 1, so below first - 1: only this one.
            return ([newest] if newest[1] >= first - 1 else []), newest
        # Newest first (which also tells the newest), until a run ends below them: runs
        # are disjoint and sorted. Usually one or two rows.
        near: list[Run] = []
        newest = None
        cur = c.execute("SELECT lo, hi FROM seen_run WHERE boot = ? ORDER BY lo DESC", (boot,))
        for lo, hi in cur:
            newest = newest or (lo, hi)
            if hi < first - 1:
                break
            if lo <= last + 1:
                near.append((lo, hi))
        cur.close()
        near.reverse()
        return near, newest

    _INSERT = (
        "INSERT INTO delivery (alert_seq, route, state, priority, due, updated_at, kind, owner)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    )

    def _storm(
        self,
        c: sqlite3.Connection,
        policy: Policy,
        alert: Alert,
        seq: int,
        route: str,
        prio: int,
        now: float,
        mono: float,
    ) -> int:
        """Storm control for one (alert, route): decide, insert its delivery, keep state."""
        key, lead, bucket = "", None, None
        if policy.dedupe_window:
            text = render(policy.key, alert.template_values())
            key = hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()
            row = c.execute(
                "SELECT l.seq, l.until, d.state FROM storm_lead l LEFT JOIN delivery d"
                " ON d.alert_seq = l.seq AND d.route = l.route WHERE l.route = ? AND l.key = ?",
                (route, key),
            ).fetchone()
            if row is not None:
                lead = Lead(row[0], row[2] == "queued", row[1])
        if policy.rate is not None:
            row = c.execute(
                "SELECT tokens, at FROM storm_bucket WHERE route = ?", (route,)
            ).fetchone()
            if row is not None:
                bucket = Bucket(row[0], row[1])
        d = decide(policy, alert.severity, now, lead, bucket)
        if d.bucket is not None:
            c.execute(
                "INSERT OR REPLACE INTO storm_bucket (route, tokens, at) VALUES (?, ?, ?)",
                (route, d.bucket.tokens, d.bucket.at),
            )
        if d.kind == "mail":
            c.execute(self._INSERT, (seq, route, "queued", prio, 0.0, now, "mail", None))
            if d.lead_until is not None:
                c.execute(
                    "INSERT OR REPLACE INTO storm_lead (route, key, seq, until)"
                    " VALUES (?, ?, ?, ?)",
                    (route, key, seq, d.lead_until),
                )
        elif d.kind == "repeat":
            assert lead is not None
            c.execute(self._INSERT, (seq, route, "suppressed", prio, 0.0, now, "mail", lead.seq))
        else:
            row = c.execute(
                "SELECT g.seq FROM storm_digest g JOIN delivery d ON d.alert_seq = g.seq"
                " AND d.route = g.route WHERE g.route = ? AND d.state = 'queued'",
                (route,),
            ).fetchone()
            if row is not None:  # the route's open digest takes it
                c.execute(self._INSERT, (seq, route, "suppressed", prio, 0.0, now, "mail", row[0]))
            else:  # this alert opens a digest, due when the period ends
                due = mono + policy.digest_every
                c.execute(self._INSERT, (seq, route, "queued", prio, due, now, "digest", seq))
                c.execute(
                    "INSERT OR REPLACE INTO storm_digest (route, seq) VALUES (?, ?)", (route, seq)
                )
        return 1

    # --- relay side --------------------------------------------------------

    def claim(self, limit: int, now: float | None = None) -> list[Claimed]:
        """Take up to `limit` due deliveries, highest priority first, oldest first."""
        now = time.monotonic() if now is None else now
        picked: list[tuple[int, str, int, str | None, str]] = []
        with self.transaction() as c:
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
                self._finish(outcomes)
            finally:
                self.conn.execute("PRAGMA synchronous = FULL")
        else:
            self._finish(outcomes)

    def _finish(self, outcomes: Iterable[Outcome]) -> None:
        now = time.time()
        done = 0
        with self.transaction() as c:
            for o in outcomes:
                seq, route = o.key
                if o.state == "sent":
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
                elif o.state == "dead":
                    c.execute(
                        "UPDATE delivery SET state = 'dead', updated_at = ?, attempts ="
                        " attempts + ?, last_error = ? WHERE alert_seq = ? AND route = ?",
                        (now, int(o.count_attempt), o.error, seq, route),
                    )
                elif o.state == "queued":
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
        self.live -= done

    def release_all(self) -> int:
        """Put every `sending` delivery back (orderly shutdown mid-batch)."""
        with self.transaction() as c:
            return c.execute(
                "UPDATE delivery SET state = 'queued' WHERE state = 'sending'"
            ).rowcount

    def prune(self, older_than: float, limit: int = 500) -> int:
        """Delete up to `limit` sent deliveries finished before `older_than` (wall time)."""
        with self.transaction() as c:
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
            self._last_run.clear()
        return len(rows)

    def drop_free_shards(self) -> int:
        """Drop every full shard no delivery needs; rescue the few rows that pin one."""
        dropped = 0
        with self.transaction() as c:
            row = c.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
            next_seq = int(row[0]) if row else 1
            for table in alert_tables(c)[:-1]:
                k = int(table[6:])
                lo, hi = k * SHARD_ROWS, (k + 1) * SHARD_ROWS - 1
                if hi >= next_seq - 1:
                    break  # still being filled
                pinned = c.execute(
                    "SELECT count(DISTINCT alert_seq) FROM delivery"
                    " WHERE alert_seq BETWEEN ? AND ?",
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
                self._shards.discard(table)
                dropped += 1
            c.execute(
                "DELETE FROM alert_kept WHERE NOT EXISTS"
                " (SELECT 1 FROM delivery WHERE delivery.alert_seq = alert_kept.seq)"
            )
        return dropped

    def refresh_live(self) -> None:
        """Recount (another process, such as `mailgw send`, may have added rows)."""
        self.live = self._count_live()


# --- read-side queries, shared by the daemon's status and the CLI ------------


def counts(conn: sqlite3.Connection, now: float | None = None) -> dict[str, Any]:
    now = time.monotonic() if now is None else now
    result: dict[str, Any] = {state: 0 for state in STATES}
    for state, n in conn.execute("SELECT state, count(*) FROM delivery GROUP BY state"):
        result[state] = n
    result["deferred"] = conn.execute(
        "SELECT count(*) FROM delivery INDEXED BY delivery_due WHERE state = 'queued' AND due > ?",
        (max(now, 1e-9),),
    ).fetchone()[0]
    by_prio = conn.execute(
        "SELECT priority, count(*) FROM delivery WHERE state = 'queued' GROUP BY priority"
    ).fetchall()
    result["queued_by_priority"] = {str(p): n for p, n in by_prio}
    first = conn.execute(
        "SELECT min(alert_seq) FROM delivery WHERE state IN ('queued', 'sending')"
    ).fetchone()[0]
    oldest = None
    if first is not None:
        found = fetch_alerts(conn, [first]).get(first)
        oldest = found.received.wall if found else None
    result["oldest_queued_age_s"] = None if oldest is None else max(0.0, time.time() - oldest)
    return result


def find(conn: sqlite3.Connection, alert_id: str) -> tuple[Alert, list[dict[str, Any]]] | None:
    located = find_seq(conn, alert_id)
    if located is None:
        return None
    seq = located[0]
    deliveries = [
        dict(
            zip(
                ("route", "state", "priority", "attempts", "last_error", "updated_at"),
                d,
                strict=True,
            )
        )
        for d in conn.execute(
            "SELECT route, state, priority, attempts, last_error, updated_at FROM delivery"
            " WHERE alert_seq = ?",
            (seq,),
        )
    ]
    return fetch_alerts(conn, [seq])[seq], deliveries


def listing(
    conn: sqlite3.Connection, states: Sequence[str], limit: int = 100
) -> list[dict[str, Any]]:
    marks = ",".join("?" * len(states))
    rows = conn.execute(
        "SELECT alert_seq, route, state, priority, attempts, last_error FROM delivery"
        f" WHERE state IN ({marks}) ORDER BY alert_seq LIMIT ?",
        (*states, limit),
    ).fetchall()
    alerts = fetch_alerts(conn, (r[0] for r in rows))
    out = []
    for seq, route, state, priority, attempts, last_error in rows:
        a = alerts.get(seq)
        if a is None:
            continue
        out.append(
            {
                "id": a.id,
                "route": route,
                "state": state,
                "priority": priority,
                "attempts": attempts,
                "last_error": last_error,
                "received_at": a.received.wall,
                "topic": a.topic,
                "severity": str(a.severity),
                "message": a.message,
            }
        )
    return out


def retry(conn: sqlite3.Connection, alert_id: str | None) -> int:
    """Make deliveries due now: one alert's, or (None) every queued and dead one."""
    now = time.time()
    conn.execute("BEGIN IMMEDIATE")
    try:
        if alert_id is None:
            n = conn.execute(
                "UPDATE delivery SET state = 'queued', due = 0, updated_at = ?"
                " WHERE state IN ('queued', 'dead') AND route != ''",
                (now,),
            ).rowcount
        else:
            located = find_seq(conn, alert_id)
            n = (
                0
                if located is None
                else conn.execute(
                    "UPDATE delivery SET state = 'queued', due = 0, updated_at = ?"
                    " WHERE state IN ('queued', 'dead') AND route != '' AND alert_seq = ?",
                    (now, located[0]),
                ).rowcount
            )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return int(n)


def delete(conn: sqlite3.Connection, alert_id: str) -> int:
    conn.execute("BEGIN IMMEDIATE")
    try:
        located = find_seq(conn, alert_id)
        n = 0
        if located is not None:
            seq, table = located
            # What storm control folded into its mails (repeats, digest lines) goes too.
            n = conn.execute(
                "DELETE FROM delivery WHERE owner = ? AND state = 'suppressed'", (seq,)
            ).rowcount
            n += conn.execute("DELETE FROM delivery WHERE alert_seq = ?", (seq,)).rowcount
            conn.execute(f"DELETE FROM {table} WHERE seq = ?", (seq,))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return int(n)
