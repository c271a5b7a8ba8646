"""The serial retransmission memory in the outbox: runs of seqs per device boot.

One row per run (gateway/outbox/seen.py), not per alert. The newest run of each boot is
kept in memory as committed: new seqs nearly always extend it, so most batches need no
query. Only the one writer's SeenRuns writes runs.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from gateway.outbox.seen import Run, merge

MAX_BOOTS_REMEMBERED = 4096  # device boots whose newest run is kept in memory


class SeenRuns:
    def __init__(self) -> None:
        self._last_run: dict[str, Run] = {}

    def forget(self) -> None:
        """Drop what memory holds (a rollback, or rows pruned): read again from disk."""
        self._last_run.clear()

    def record(
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
            near, newest = self._near(c, boot, min(seqs), max(seqs))
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

    def _near(
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
