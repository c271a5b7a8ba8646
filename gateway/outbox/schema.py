"""The outbox's schema: the first version's tables, then forward migrations.

Each entry of MIGRATIONS upgrades the schema from version i to i+1, keyed by
`PRAGMA user_version`. Never edit a released step: devices in the field sit at every
version and upgrade in order.
"""

from __future__ import annotations

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
    # (gateway/outbox/seen.py). Each boot's keys become its runs: gaps and islands.
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
    # 6 → 7: the state of the gateway's own watches (gateway/outbox/watch_state.py):
    # silence per source, raised self-alert conditions. A row changes in the same
    # transaction as the alert that reports the change, so neither outlives the other.
    """
    CREATE TABLE watch (
        kind  TEXT NOT NULL,
        key   TEXT NOT NULL,
        state TEXT NOT NULL,
        PRIMARY KEY (kind, key)
    ) WITHOUT ROWID;
    """,
    # 7 → 8: receipts asked for by publishers (gateway/receipts.py,
    # gateway/outbox/receipts.py), one per (alert, route), written in the alert's
    # transaction and made due in the one that records the delivery's outcome.
    # state: waiting → due → published; outcome: sent | dead. (IF NOT EXISTS: tests
    # and salvage rewind user_version over a newer file; the step must still apply.)
    """
    CREATE TABLE IF NOT EXISTS receipt (
        alert_seq   INTEGER NOT NULL,
        route       TEXT    NOT NULL,
        origin      TEXT    NOT NULL,
        reply       TEXT    NOT NULL,
        correlation BLOB    NOT NULL,
        v5          INTEGER NOT NULL DEFAULT 0,
        alert_id    TEXT    NOT NULL,
        state       TEXT    NOT NULL DEFAULT 'waiting',
        outcome     TEXT,
        reason      TEXT,
        mail_alert  TEXT,
        kind        TEXT,
        carried     TEXT,
        count       INTEGER NOT NULL DEFAULT 1,
        updated_at  REAL    NOT NULL,
        PRIMARY KEY (alert_seq, route)
    ) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS receipt_due ON receipt (origin, reply, alert_seq)
        WHERE state = 'due';
    CREATE INDEX IF NOT EXISTS receipt_waiting ON receipt (alert_seq) WHERE state = 'waiting';
    CREATE INDEX IF NOT EXISTS receipt_dead ON receipt (alert_seq) WHERE outcome = 'dead';
    """,
    # 8 → 9: messages that `sendmail` submitted, stored whole next to their alert row
    # (gateway/outbox/raw.py).
    # `drop` is the maildrop file's random name, so a pickup interrupted between the
    # commit and the unlink is recognised and not stored twice.
    """
    CREATE TABLE IF NOT EXISTS raw_message (
        alert_seq INTEGER PRIMARY KEY,
        drop_name TEXT    NOT NULL UNIQUE,
        uid       INTEGER NOT NULL,
        sender    TEXT    NOT NULL,
        rcpts     TEXT    NOT NULL,
        data      BLOB    NOT NULL
    );
    """,
    # 9 → 10: poison messages (gateway/outbox/queue.py). `delivery_crash` counts, per
    # delivery, the starts that found it in flight (`sending`) since it last settled;
    # one at HOLD_AFTER is set aside in state 'held' (the reason in last_error) instead
    # of being claimed into a crash loop. A table of its own, holding only suspects, so
    # that asking "is a suspect due or in flight" reads a few rows, not the queue; the
    # index answers "is anything in flight" as cheaply. (IF NOT EXISTS: see 7 → 8.)
    """
    CREATE TABLE IF NOT EXISTS delivery_crash (
        alert_seq INTEGER NOT NULL,
        route     TEXT    NOT NULL,
        crashes   INTEGER NOT NULL,
        PRIMARY KEY (alert_seq, route)
    ) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS delivery_sending ON delivery (alert_seq) WHERE state = 'sending';
    """,
    # 10 → 11: unrouted readings by age, for their retention (outbox.keep_unrouted,
    # gateway/outbox/room.py) and their count, without scanning every delivery.
    """
    CREATE INDEX IF NOT EXISTS delivery_unrouted ON delivery (updated_at)
        WHERE state = 'unrouted';
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
