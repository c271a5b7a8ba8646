from __future__ import annotations

import itertools
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway import outbox as ob_mod
from gateway.alert import Draft, Severity, normalize
from gateway.errors import OutboxCorrupt, OutboxFull, Unstorable
from gateway.outbox import MIGRATIONS, MqttKey, Outbox, Outcome, Routed
from gateway.outbox.schema import _ALERT_TABLE


def alert(msg: str = "m", sev: Severity = Severity.WARNING, topic: str = "alerts/x") -> Routed:
    a = normalize(msg.encode(), Draft(topic, "mqtt", "s", sev))
    return Routed(a, (("ops", int(sev)),))


def open_ob(path: Path, **kw: object) -> Outbox:
    return Outbox(path / "outbox.db", **kw)  # type: ignore[arg-type]


def test_wal_and_full_sync(tmp_path: Path) -> None:
    ob = open_ob(tmp_path)
    assert ob.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert ob.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert ob.conn.execute("PRAGMA user_version").fetchone()[0] == ob_mod.SCHEMA_VERSION


def test_state_machine_queued_sending_sent_dead(tmp_path: Path) -> None:
    ob = open_ob(tmp_path)
    ob.add([alert("a"), alert("b"), alert("c")])
    assert ob.live == 3
    claimed = ob.claim(10)
    assert [c.alert.message for c in claimed] == ["a", "b", "c"]
    assert ob.claim(10) == []  # sending rows are not claimed twice
    counts = ob_mod.counts(ob.conn)
    assert counts["sending"] == 3
    ob.finish(
        [
            Outcome(claimed[0].key, "sent"),
            Outcome(claimed[1].key, "dead", error="550 5.1.1 no such user"),
            Outcome(claimed[2].key, "queued", due=time.monotonic() + 300, error="451 try later"),
        ]
    )
    counts = ob_mod.counts(ob.conn)
    assert (counts["sent"], counts["dead"], counts["queued"], counts["deferred"]) == (1, 1, 1, 1)
    assert ob.live == 2  # sent rows no longer count against the bound
    assert ob.claim(10) == []  # the deferred one is not due yet
    later = ob.claim(10, now=time.monotonic() + 301)
    assert [c.alert.message for c in later] == ["c"] and later[0].attempts == 1
    dead = ob_mod.listing(ob.conn, ["dead"])
    assert dead[0]["last_error"] == "550 5.1.1 no such user"


def test_claim_orders_by_priority_then_age(tmp_path: Path) -> None:
    ob = open_ob(tmp_path)
    ob.add(
        [
            alert("info1", Severity.INFO),
            alert("warn1"),
            alert("crit1", Severity.CRITICAL),
            alert("info2", Severity.INFO),
            alert("crit2", Severity.CRITICAL),
        ]
    )
    order = [c.alert.message for c in ob.claim(3)] + [c.alert.message for c in ob.claim(10)]
    assert order == ["crit1", "crit2", "warn1", "info1", "info2"]


def test_claim_uses_the_partial_index(tmp_path: Path) -> None:
    ob = open_ob(tmp_path)
    plan = ob.conn.execute(
        "EXPLAIN QUERY PLAN SELECT alert_seq, route, attempts FROM delivery INDEXED BY "
        "delivery_due WHERE state = 'queued' AND priority = ? AND due <= ? ORDER BY due, "
        "alert_seq LIMIT ?",
        (3, 0.0, 10),
    ).fetchall()
    text = " ".join(str(r[-1]) for r in plan)
    assert "USING INDEX delivery_due (priority=? AND due<?)" in text, text
    assert "TEMP B-TREE" not in text


def test_outbox_full_stores_nothing(tmp_path: Path) -> None:
    ob = open_ob(tmp_path, max_messages=10)
    ob.add([alert(str(i)) for i in range(8)])
    with pytest.raises(OutboxFull, match="max_messages = 10"):
        ob.add([alert(str(i)) for i in range(3)])
    assert ob_mod.counts(ob.conn)["queued"] == 8
    ob.add([alert("x"), alert("y")])  # exactly at the bound is fine
    claimed = ob.claim(5)
    ob.finish([Outcome(c.key, "sent") for c in claimed])
    ob.add([alert(str(i)) for i in range(5)])  # sent ones made room


def test_unrouted_alerts_are_kept_and_counted(tmp_path: Path) -> None:
    ob = open_ob(tmp_path)
    a = normalize(b"lost?", Draft("nowhere", "local", "s"))
    ob.add([Routed(a, ())])
    assert ob_mod.counts(ob.conn)["unrouted"] == 1
    assert ob.claim(10) == []


def test_retransmission_key_stores_once(tmp_path: Path) -> None:
    ob = open_ob(tmp_path)
    first = alert("once")
    assert ob.add([Routed(first.alert, first.deliveries, seen_key="dev/boot/7")]) == []
    again = alert("once")
    assert ob.add([Routed(again.alert, again.deliveries, seen_key="dev/boot/7")]) == ["dev/boot/7"]
    assert ob_mod.counts(ob.conn)["queued"] == 1
    # In one batch: a retransmission of a stored alert, a frame retransmitted within the
    # batch (stored once), a boot id with quotes and brackets.
    batch = [
        Routed(alert("old").alert, first.deliveries, seen_key="dev/boot/7"),
        Routed(alert("new").alert, first.deliveries, seen_key='dev/b"o[o]t/8'),
        Routed(alert("new").alert, first.deliveries, seen_key='dev/b"o[o]t/8'),
        Routed(alert("plain").alert, first.deliveries),
    ]
    assert ob.add(batch) == ["dev/boot/7", 'dev/b"o[o]t/8']
    assert ob_mod.counts(ob.conn)["queued"] == 3
    assert ob.add(batch[1:2]) == ['dev/b"o[o]t/8']
    stored = [m for (m,) in ob.conn.execute("SELECT message FROM alert_0 ORDER BY seq")]
    assert stored == ["once", "new", "plain"]
    runs = ob.conn.execute("SELECT boot, lo, hi FROM seen_run ORDER BY boot").fetchall()
    assert runs == [('dev/b"o[o]t', 8, 8), ("dev/boot", 7, 7)]
    # A key that is not one: the alert can never be stored as given (rejected, not retried).
    with pytest.raises(Unstorable, match="not a retransmission key"):
        ob.add([Routed(first.alert, first.deliveries, seen_key="dev/boot/x7")])


@pytest.mark.parametrize("size", [1, 63, 64, 65, 127, 200])
def test_batches_of_any_size_store_every_row_once(tmp_path: Path, size: int) -> None:
    """Rows go in chunks of 64 and then powers of two: every size lands whole."""
    ob = open_ob(tmp_path)
    template = alert("x")
    old = [Routed(alert(f"old {i}").alert, template.deliveries, f"d/b/{i}") for i in range(3)]
    ob.add(old)
    batch = [Routed(alert(f"m {i}").alert, template.deliveries, f"d/b/{i}") for i in range(size)]
    assert ob.add(batch) == [f"d/b/{i}" for i in range(min(3, size))]
    assert ob_mod.counts(ob.conn)["queued"] == max(3, size)
    stored = {m for (m,) in ob.conn.execute("SELECT message FROM alert_0")}
    assert stored == {f"old {i}" for i in range(3)} | {f"m {i}" for i in range(3, size)}
    assert ob.conn.execute("SELECT lo, hi FROM seen_run").fetchall() == [(0, max(3, size) - 1)]


@settings(max_examples=150, deadline=None)
@example(batches=[[("a/1", 1)], [("a/1", 0)], [("a/1", 2)]])  # a run growing downwards
@given(
    st.lists(
        st.lists(
            st.tuples(st.sampled_from(["a/1", "a/2", "b/1"]), st.integers(0, 40)), max_size=12
        ),
        max_size=8,
    )
)
def test_retransmission_memory_matches_a_set(
    tmp_path_factory: pytest.TempPathFactory, batches: list[list[tuple[str, int]]]
) -> None:
    """Whatever order seqs arrive in (gaps, retransmissions, repeats within a batch),
    each (boot, seq) is stored exactly once, and the runs hold exactly what was stored."""
    ob = open_ob(tmp_path_factory.mktemp("seen"))
    template = alert("x")
    model: set[tuple[str, int]] = set()
    for batch in batches:
        keys = [f"{boot}/{n}" for boot, n in batch]
        routed = [Routed(alert(k).alert, template.deliveries, k) for k in keys]
        expected_dupes = []
        fresh = set()
        for boot, n in batch:
            if (boot, n) in model or (boot, n) in fresh:
                expected_dupes.append(f"{boot}/{n}")
            else:
                fresh.add((boot, n))
        assert ob.add(routed) == expected_dupes
        model |= fresh
    stored = sorted(
        m
        for t in ob_mod.alert_tables(ob.conn)
        for (m,) in ob.conn.execute(f"SELECT message FROM {t}")
    )
    assert stored == sorted(f"{boot}/{n}" for boot, n in model)
    covered = {
        (boot, n)
        for boot, lo, hi in ob.conn.execute("SELECT boot, lo, hi FROM seen_run")
        for n in range(lo, hi + 1)
    }
    assert covered == model
    # As few rows as can be: no two runs of a boot touch.
    runs = ob.conn.execute("SELECT boot, lo, hi FROM seen_run ORDER BY boot, lo").fetchall()
    for (b1, _, hi), (b2, lo, _) in itertools.pairwise(runs):
        assert b1 != b2 or lo > hi + 1
    ob.close()


def test_restart_requeues_sending_and_new_boot_makes_everything_due(tmp_path: Path) -> None:
    ob = open_ob(tmp_path, boot="boot-1")
    ob.add([alert("a"), alert("b")])
    _a, b = ob.claim(10)
    ob.finish([Outcome(b.key, "queued", due=time.monotonic() + 3600)])
    ob.close()  # `a` is left in `sending`, as after a crash
    ob = open_ob(tmp_path, boot="boot-1")
    assert [c.alert.message for c in ob.claim(10)] == ["a"]  # same boot: b still deferred
    ob.close()
    ob = open_ob(tmp_path, boot="boot-2")
    # `a` was in flight at two crashes: a suspect, claimed alone (gateway/outbox/queue.py)
    (a,) = ob.claim(10)
    assert a.alert.message == "a"
    ob.finish([Outcome(a.key, "sent")])
    assert [c.alert.message for c in ob.claim(10)] == ["b"]


def test_same_message_id_material_survives_restart(tmp_path: Path) -> None:
    ob = open_ob(tmp_path)
    r = alert("same")
    ob.add([r])
    first = ob.claim(1)[0]
    ob.close()
    ob = open_ob(tmp_path)
    again = ob.claim(1)[0]
    assert again.alert == first.alert  # same id, same stamp, same everything


def test_prune_removes_old_sent_rows_only(tmp_path: Path) -> None:
    ob = open_ob(tmp_path)
    ob.add([alert(str(i)) for i in range(5)])
    claimed = ob.claim(3)
    ob.finish([Outcome(c.key, "sent") for c in claimed])
    assert ob.prune(time.time() - 3600) == 0  # not old enough
    assert ob.prune(time.time() + 1, limit=2) == 2
    assert ob.prune(time.time() + 1) == 1
    assert ob.conn.execute("SELECT count(*) FROM delivery").fetchone()[0] == 2
    assert ob_mod.counts(ob.conn)["queued"] == 2
    assert ob.drop_free_shards() == 0  # the only shard is still being filled


def test_full_shards_are_dropped_and_pinned_rows_rescued(tmp_path: Path) -> None:
    ob = open_ob(tmp_path, max_messages=10**6)
    n = ob_mod.SHARD_ROWS * 3
    ob.add([alert(str(i)) for i in range(n)])
    keep_dead, keep_queued = None, None
    while claimed := ob.claim(1000):
        outcomes = []
        for c in claimed:
            if c.alert.message == "5":
                keep_dead = c.alert.id
                outcomes.append(Outcome(c.key, "dead", error="550 no"))
            elif c.alert.message == str(ob_mod.SHARD_ROWS + 7):
                keep_queued = c.alert.id
                outcomes.append(Outcome(c.key, "queued", due=time.monotonic() + 10**6))
            else:
                outcomes.append(Outcome(c.key, "sent"))
        ob.finish(outcomes)
    while ob.prune(time.time() + 1, limit=5000):
        pass
    # seqs start at 1: shards 0-2 are full (0 and 1 pinned by one row each), 3 is filling.
    assert ob.drop_free_shards() == 3
    assert ob_mod.alert_tables(ob.conn) == ["alert_3", "alert_kept"]
    assert keep_dead and keep_queued
    found = ob_mod.find(ob.conn, keep_dead)
    assert found is not None and found[0].message == "5" and found[1][0]["state"] == "dead"
    again = ob.claim(10, now=time.monotonic() + 10**7)
    assert [c.alert.id for c in again] == [keep_queued]
    ob.finish([Outcome(again[0].key, "sent")])
    ob.prune(time.time() + 1)
    assert ob_mod.delete(ob.conn, keep_dead) == 1
    ob.drop_free_shards()
    assert ob.conn.execute("SELECT count(*) FROM alert_kept").fetchone()[0] == 0


def test_migrates_from_version_0_and_keeps_data(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    conn = sqlite3.connect(db)
    conn.executescript(MIGRATIONS[0] + "; PRAGMA user_version = 1;")
    conn.executescript(_ALERT_TABLE.format(name="alert_0"))
    conn.execute(
        "INSERT INTO alert_0 (seq, id, topic, source, sensor, severity, message, received_at,"
        " boottime, boot_id, clock_synced) VALUES (1, 'id-1', 't', 'mqtt', 's', 2, 'old', 1.0,"
        " 1.0, 'b', 1)"
    )
    conn.execute("INSERT INTO meta VALUES ('next_seq', '2')")
    conn.execute(
        "INSERT INTO delivery (alert_seq, route, state, priority, updated_at)"
        " VALUES (1, 'ops', 'queued', 2, 1.0)"
    )
    conn.commit()
    conn.close()
    ob = Outbox(db)
    assert ob.conn.execute("PRAGMA user_version").fetchone()[0] == ob_mod.SCHEMA_VERSION
    assert ob.conn.execute("SELECT count(*) FROM seen_run").fetchone()[0] == 0
    assert [c.alert.message for c in ob.claim(5)] == ["old"]


def test_migration_5_turns_seen_keys_into_runs(tmp_path: Path) -> None:
    """An outbox from before runs: its retransmission keys still count after the upgrade."""
    db = tmp_path / "outbox.db"
    conn = sqlite3.connect(db)
    for step in range(4):
        conn.executescript(MIGRATIONS[step])
    conn.execute("PRAGMA user_version = 4")
    keys = ["dev1/b7/1", "dev1/b7/2", "dev1/b7/3", "dev1/b7/5", "dev1/b7/10", "dev2/b7/0"]
    conn.executemany(
        "INSERT INTO seen (key, alert_id, at) VALUES (?, 'x', ?)",
        [(k, float(i)) for i, k in enumerate(keys)],
    )
    conn.commit()
    conn.close()
    ob = Outbox(db)
    runs = ob.conn.execute("SELECT boot, lo, hi, at FROM seen_run ORDER BY boot, lo").fetchall()
    assert runs == [
        ("dev1/b7", 1, 3, 2.0),
        ("dev1/b7", 5, 5, 3.0),
        ("dev1/b7", 10, 10, 4.0),
        ("dev2/b7", 0, 0, 5.0),
    ]
    template = alert("x")
    batch = [Routed(alert(k).alert, template.deliveries, k) for k in [*keys, "dev1/b7/4"]]
    assert ob.add(batch) == keys  # all known; only seq 4 is new, and it joins two runs
    assert ob.conn.execute(
        "SELECT lo, hi FROM seen_run WHERE boot = 'dev1/b7' ORDER BY lo"
    ).fetchall() == [(1, 5), (10, 10)]


def test_fresh_file_goes_through_every_migration(tmp_path: Path) -> None:
    ob = open_ob(tmp_path)
    tables = {r[0] for r in ob.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"alert_kept", "delivery", "meta", "seen_run", "mqtt_pending"} <= tables


def test_migration_6_adds_mqtt_pending_and_keeps_data(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    ob = Outbox(db)
    ob.add([alert("before the upgrade")])
    ob.conn.executescript("DROP TABLE mqtt_pending; DROP TABLE watch; PRAGMA user_version = 5;")
    ob.close()
    ob = Outbox(db)
    assert ob.conn.execute("PRAGMA user_version").fetchone()[0] == ob_mod.SCHEMA_VERSION
    assert ob.conn.execute("SELECT count(*) FROM mqtt_pending").fetchone()[0] == 0
    assert ob.live == 1


def _mqtt(msg: str, mid: int, dup: bool, conn: int = 1) -> Routed:
    r = alert(msg)
    digest = msg.encode().ljust(16, b"_")[:16]
    return Routed(r.alert, r.deliveries, mqtt=MqttKey(mid, digest, dup, conn))


def _messages(ob: Outbox) -> list[str]:
    return sorted(r[0] for r in ob.conn.execute("SELECT message FROM alert_0"))


def test_an_mqtt_redelivery_is_recognised_by_packet_id_and_digest(tmp_path: Path) -> None:
    ob = open_ob(tmp_path)
    first = _mqtt("door open", 7, dup=False)
    assert ob.add([first]) == []
    # The same packet id and content, DUP: the broker sending it again. Acknowledged as
    # a copy, and the row now belongs to the connection it came again on.
    again = _mqtt("door open", 7, dup=True, conn=2)
    assert ob.add([again]) == [again.mqtt.name]  # type: ignore[union-attr]
    assert ob.conn.execute("SELECT conn FROM mqtt_pending WHERE mid = 7").fetchone() == (2,)
    # Not a copy: another packet id, other content under that id, or no DUP flag.
    assert ob.add([_mqtt("door open", 8, dup=True)]) == []
    assert ob.add([_mqtt("door shut", 7, dup=True)]) == []  # now the row of 7 is this one
    assert ob.add([_mqtt("door shut", 7, dup=False)]) == []
    assert _messages(ob) == ["door open", "door open", "door shut", "door shut"]
    # The original and its redelivery in one transaction: stored once.
    pair = [_mqtt("window", 9, dup=False), _mqtt("window", 9, dup=True)]
    assert ob.add(pair) == [pair[1].mqtt.name]  # type: ignore[union-attr]
    assert _messages(ob).count("window") == 1


def test_confirmed_rows_are_forgotten_and_a_sweep_keeps_one_connection(tmp_path: Path) -> None:
    ob = open_ob(tmp_path)
    ob.add([_mqtt("a", 1, False, conn=1), _mqtt("b", 2, False, conn=1)])
    ob.add([_mqtt("c", 3, False, conn=2)])
    a, c = _mqtt("a", 1, False).mqtt, _mqtt("c", 3, False).mqtt
    assert a is not None and c is not None
    # A key of another connection, or with another digest, is not this row.
    assert ob.mqtt_settled([(1, a.digest, 2), (1, c.digest, 1)]) == 0
    assert ob.mqtt_settled([(1, a.digest, 1)]) == 1
    # The sweep: every row that did not come (again) on connection 2.
    assert ob.mqtt_settled([], keep_conn=2) == 1
    assert ob.conn.execute("SELECT mid FROM mqtt_pending").fetchall() == [(3,)]
    # Forgotten, a redelivery is stored again: a copy, never a loss.
    assert ob.add([_mqtt("a", 1, dup=True)]) == []
    assert _messages(ob).count("a") == 2


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    sqlite3.connect(db).execute("PRAGMA user_version = 99").connection.commit()
    with pytest.raises(OutboxCorrupt, match="newer than this mailgw"):
        Outbox(db)


def test_corrupt_file_is_moved_aside_not_deleted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "outbox.db"
    db.write_bytes(b"this is not a database" * 100)
    ob = Outbox(db)
    aside = list(tmp_path.glob("outbox.db.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not")
    assert "is corrupt" in caplog.text and "moved to" in caplog.text
    ob.add([alert("fresh")])
    assert ob_mod.counts(ob.conn)["queued"] == 1


def test_volatile_state_dir_is_refused(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if ob_mod.volatile_reason(shm) is None:
        pytest.skip("/dev/shm is not tmpfs on this machine")
    target = shm / f"mailgw-test-{os.getpid()}"
    try:
        with pytest.raises(OutboxCorrupt, match="allow_volatile"):
            Outbox(target / "outbox.db")
        Outbox(target / "outbox.db", allow_volatile=True).close()
    finally:
        for p in sorted(target.glob("*")):
            p.unlink()
        target.rmdir()
    assert ob_mod.volatile_reason(tmp_path) is None


def test_cost_of_claim_does_not_grow_with_sent_or_deferred_rows(tmp_path: Path) -> None:
    # Asserted on the rows SQLite visits (VM steps), not on time: deterministic.
    ob = open_ob(tmp_path)

    def steps() -> int:
        ob.add([alert("probe", Severity.INFO)])
        counter = [0]

        def tick() -> int:
            counter[0] += 1
            return 0

        ob.conn.set_progress_handler(tick, 1)
        claimed = ob.claim(1)
        ob.conn.set_progress_handler(None, 1)
        ob.finish([Outcome(c.key, "sent") for c in claimed])
        return counter[0]

    small = steps()
    far = time.monotonic() + 10**6
    batch = [alert(str(i), Severity.CRITICAL) for i in range(5000)]
    ob.add(batch)
    claimed = ob.claim(5000)
    ob.finish(
        [Outcome(c.key, "queued", due=far) for c in claimed[:2500]]
        + [Outcome(c.key, "sent") for c in claimed[2500:]]
    )
    assert steps() < small * 1.5


CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[2])
from gateway.alert import Draft, normalize
from gateway.outbox import Outbox, Routed
ob = Outbox(sys.argv[1], max_messages=10**9)
batch_no = int(sys.argv[3])
while True:
    size = 1 + batch_no % 50
    rows = [Routed(normalize(f"batch {batch_no} row {i}".encode(),
                             Draft("alerts/crash", "mqtt", "s")), (("ops", 2),))
            for i in range(size)]
    ob.add(rows)
    print(json.dumps([batch_no, size]), flush=True)
    batch_no += 1
"""


def test_kill_9_never_loses_a_committed_batch(tmp_path: Path) -> None:
    seed = int(os.environ.get("MAILGW_TEST_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    print(f"crash test seed {seed} (rerun with MAILGW_TEST_SEED={seed})")
    db = tmp_path / "outbox.db"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    root = str(Path(__file__).resolve().parent.parent)
    committed: dict[int, int] = {}
    next_batch = 0
    for _ in range(25):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(db), root, str(next_batch)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        first = proc.stdout.readline()  # wait until it is committing
        assert first, "child died before its first commit"
        b, size = json.loads(first)
        committed[b] = size
        time.sleep(rng.uniform(0.0, 0.15))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        for line in out.splitlines():
            try:
                b, size = json.loads(line)
            except ValueError:
                continue  # a line cut by the kill: that commit's result was not seen
            committed[b] = size
        next_batch = max(committed) + 1_000  # keep batches distinguishable across runs
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    stored: dict[int, int] = {}
    for table in ob_mod.alert_tables(conn):
        for (msg,) in conn.execute(f"SELECT message FROM {table}"):
            b = int(msg.split()[1])
            stored[b] = stored.get(b, 0) + 1
    for b, size in committed.items():
        assert stored.get(b) == size, f"batch {b}: committed {size} rows, found {stored.get(b)}"
    for b, n in stored.items():  # nothing half-written: a batch is all there or absent
        assert n == 1 + b % 50, f"batch {b} is partial ({n} rows)"
    assert len(committed) >= 25
