"""Which serial alerts the outbox holds, to store a retransmission once: runs of seqs.

A device numbers its frames 0, 1, 2, ... in each boot, so the seqs stored for one boot
are a few runs of consecutive numbers: a run ends only where a seq is not an alert
(a PING's) or has not arrived yet (still being retransmitted). The outbox keeps one
row per run, `(boot, lo, hi)`, and rewrites it as the run grows. One row per alert
instead cost a quarter of the writer's CPU with eight busy ports: eight insertion
points in one B-tree split pages at every commit, and the table grew by ~65 bytes an
alert for the whole retention period.

Pure: runs in, runs out. The outbox loads the runs a batch can touch and writes back
what changed.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence

Run = tuple[int, int]  # lo, hi: both stored, and every seq between


def split_key(key: str) -> tuple[str, int]:
    """A retransmission key `<device id>/<boot id>/<seq>` as (boot, seq)."""
    boot, sep, seq = key.rpartition("/")
    if not sep or not (seq.isascii() and seq.isdigit()):
        raise ValueError(f"{key!r} is not a retransmission key (device/boot/seq)")
    return boot, int(seq)


def merge(runs: Sequence[Run], seqs: Iterable[int]) -> tuple[set[int], list[Run]]:
    """The seqs not yet stored, and the runs once they are.

    `runs` are sorted, disjoint and not adjacent (as merge() returns them); so is the
    result. Seqs already in a run, or given twice, are not new twice.
    """
    los = [lo for lo, _ in runs]
    new: set[int] = set()
    for s in seqs:
        i = bisect.bisect_right(los, s) - 1
        if i < 0 or runs[i][1] < s:
            new.add(s)
    if not new:
        return new, list(runs)
    merged: list[list[int]] = []
    for lo, hi in sorted([*runs, *((s, s) for s in new)]):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return new, [(lo, hi) for lo, hi in merged]
