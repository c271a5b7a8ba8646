"""Outbox benchmarks: group-commit ingest vs raw SQLite, and disk bytes per alert.

python -m bench outbox
"""

from __future__ import annotations

import sqlite3
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import best_rate, row, write_bytes
from gateway.alert import Draft, normalize
from gateway.outbox import MIGRATIONS, Outbox, Outcome, Routed
from gateway.outbox.rows import _alert_row
from gateway.outbox.schema import _ALERT_TABLE
from gateway.outbox.writer import Writer

N = 20_000
MESSAGE = "x" * 440  # with topic, ids and stamps: a ~500-byte alert


def make_alerts(n: int) -> list[Routed]:
    draft = Draft("alerts/bench/temp", "mqtt", "temp")
    return [Routed(normalize(f"{i} {MESSAGE}".encode(), draft), (("ops", 2),)) for i in range(n)]


def raw_group_commit(tmp: Path, alerts: list[Routed], per_commit: int) -> int:
    """The ceiling: the same rows, same schema, bare executemany per transaction."""
    db = tmp / f"raw-{time.monotonic_ns()}.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.executescript(MIGRATIONS[0])
    conn.executescript(_ALERT_TABLE.format(name="alert"))
    now = time.time()
    for i in range(0, len(alerts), per_commit):
        chunk = alerts[i : i + per_commit]
        conn.execute("BEGIN")
        cur = conn.cursor()
        for r in chunk:
            cur.execute(
                "INSERT INTO alert (seq, id, topic, source, sensor, severity, message, event_time,"
                " received_at, boottime, boot_id, clock_synced, fields, notes)"
                " VALUES (NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                _alert_row(r.alert),
            )
            cur.execute(
                "INSERT INTO delivery (alert_seq, route, state, priority, updated_at)"
                " VALUES (?, 'ops', 'queued', 2, ?)",
                (cur.lastrowid, now),
            )
        conn.execute("COMMIT")
    conn.close()
    return len(alerts)


def ours_batches(tmp: Path, alerts: list[Routed], per_commit: int) -> int:
    ob = Outbox(tmp / f"ours-{time.monotonic_ns()}.db", max_messages=10**9, allow_volatile=True)
    for i in range(0, len(alerts), per_commit):
        ob.add(alerts[i : i + per_commit])
    ob.close()
    return len(alerts)


def ours_writer(tmp: Path, alerts: list[Routed]) -> int:
    """What sources do: one submission per alert, from 4 threads; the writer groups them."""
    ob = Outbox(tmp / f"writer-{time.monotonic_ns()}.db", max_messages=10**9, allow_volatile=True)
    writer = Writer(ob)
    writer.start()
    left = [len(alerts)]
    lock = threading.Lock()
    finished = threading.Event()

    def done(_: object) -> None:
        with lock:
            left[0] -= 1
            if left[0] == 0:
                finished.set()

    def produce(part: list[Routed]) -> None:
        for r in part:
            writer.submit([r], done)

    threads = [threading.Thread(target=produce, args=(alerts[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    finished.wait(300)
    writer.stop()
    ob.close()
    return len(alerts)


def lifecycle_bytes(tmp: Path, alerts: list[Routed]) -> float:
    """Bytes written to disk per alert: insert, claim, mark sent, prune, checkpoint."""
    ob = Outbox(tmp / "life.db", max_messages=10**9, allow_volatile=True)
    before = write_bytes()
    for i in range(0, len(alerts), 100):
        ob.add(alerts[i : i + 100])
    while claimed := ob.claim(100):
        ob.finish([Outcome(c.key, "sent") for c in claimed])
    while ob.prune(time.time() + 1, limit=500):
        pass
    ob.drop_free_shards()
    ob.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    ob.close()
    return (write_bytes() - before) / len(alerts)


def run() -> list[dict[str, Any]]:
    alerts = make_alerts(N)
    with tempfile.TemporaryDirectory(dir=Path.cwd() / "bench") as d:
        tmp = Path(d)
        raw100 = best_rate(lambda: raw_group_commit(tmp, alerts, 100))
        ours100 = best_rate(lambda: ours_batches(tmp, alerts, 100))
        writer = best_rate(lambda: ours_writer(tmp, alerts))
        few = alerts[:1000]
        raw1 = best_rate(lambda: raw_group_commit(tmp, few, 1), repeats=1)
        ours1 = best_rate(lambda: ours_batches(tmp, few, 1), repeats=1)
        per_alert = lifecycle_bytes(tmp, alerts)
    return [
        row(
            "outbox ingest, 100 alerts/commit",
            ours100,
            "alerts/s",
            raw100,
            "raw sqlite3 100 rows/commit",
            "ratio >= 0.8",
        ),
        row(
            "outbox ingest via writer, 1 alert/submit",
            writer,
            "alerts/s",
            raw100,
            "raw sqlite3 100 rows/commit",
        ),
        row(
            "outbox ingest, 1 alert/commit (contrast)",
            ours1,
            "alerts/s",
            raw1,
            "raw sqlite3 1 row/commit",
        ),
        row(
            "disk bytes written per 500 B alert", per_alert, "bytes", None, "", "<= 3072 (SD wear)"
        ),
    ]
