from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from gateway.alert import Draft, normalize
from gateway.errors import OutboxFull
from gateway.outbox import Outbox, Routed, counts
from gateway.outbox.writer import Stored, Writer


def routed(i: int) -> Routed:
    return Routed(normalize(f"m{i}".encode(), Draft("alerts/x", "mqtt", "s")), (("ops", 2),))


def test_group_commit_acks_only_after_commit(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "outbox.db")
    writer = Writer(ob)
    writer.start()
    results: list[object] = []
    seen_committed: list[int] = []
    done_all = threading.Event()
    reader = Outbox(tmp_path / "outbox.db", recover=False)

    def done(result: object) -> None:
        # Runs after the commit: a second connection must already see the rows.
        seen_committed.append(counts(reader.conn)["queued"])
        results.append(result)
        if len(results) == 500:
            done_all.set()

    for i in range(500):
        writer.submit([routed(i)], done)
    assert done_all.wait(30)
    writer.stop()
    assert all(r == Stored([], {}) for r in results)
    assert min(seen_committed) >= 1 and seen_committed[-1] == 500
    # Many submissions shared a commit.
    assert writer.commits < 500
    assert writer.committed_alerts == 500


def test_full_outbox_fails_only_what_does_not_fit(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "outbox.db", max_messages=5)
    writer = Writer(ob)

    async def main() -> list[object]:
        writer.start()
        outcomes: list[object] = []
        for batch in (
            [routed(1), routed(2), routed(3)],
            [routed(4), routed(5), routed(6)],
            [routed(7)],
        ):
            try:
                outcomes.append(await writer.add(batch))
            except OutboxFull as exc:
                outcomes.append(exc)
        return outcomes

    outcomes = asyncio.run(main())
    writer.stop()
    empty = Stored([], {})
    assert outcomes[0] == empty and isinstance(outcomes[1], OutboxFull) and outcomes[2] == empty
    assert writer.full is False  # the last add fit again
    assert counts(ob.conn)["queued"] == 4


def test_calls_run_in_the_writer_thread_in_order(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "outbox.db")
    writer = Writer(ob)
    writer.start()
    names = [writer.call(lambda _ob: threading.current_thread().name) for _ in range(3)]
    assert {f.result(5) for f in names} == {"outbox-writer"}
    writer.stop()
    assert not writer.alive


def test_a_failing_callback_does_not_end_the_writer(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "outbox.db")
    writer = Writer(ob)
    writer.start()
    after = threading.Event()

    def broken(result: object) -> None:
        raise RuntimeError("a bug in a source")

    writer.submit([routed(1)], broken)
    writer.submit([routed(2)], lambda result: after.set())
    assert after.wait(10)
    assert writer.alive
    writer.stop()
    assert counts(ob.conn)["queued"] == 2


def test_lingering_batches_share_a_commit_and_an_urgent_one_ends_the_wait(
    tmp_path: Path,
) -> None:
    ob = Outbox(tmp_path / "outbox.db")
    writer = Writer(ob)
    writer.start()
    lazy_done = threading.Event()
    # Eight ports' batches submitted within the linger: one commit for all of them.
    for i in range(8):
        writer.submit([routed(i)], lambda r, i=i: lazy_done.set() if i == 7 else None, 5.0)
    urgent_done = threading.Event()
    writer.submit([routed(100)], lambda r: urgent_done.set())  # no linger: commit now
    # Far sooner than the 5 s linger: the urgent submission ended the wait.
    assert urgent_done.wait(2.0) and lazy_done.is_set()
    assert writer.commits == 1 and writer.committed_alerts == 9
    writer.stop()
    ob.close()
