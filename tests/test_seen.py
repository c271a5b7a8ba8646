"""Retransmission memory as runs of seqs (gateway/outbox/seen.py), against a plain set."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.outbox.seen import Run, merge, split_key


@given(st.lists(st.lists(st.integers(0, 60), max_size=20), max_size=10))
def test_runs_hold_exactly_the_seqs_given(batches: list[list[int]]) -> None:
    runs: list[Run] = []
    model: set[int] = set()
    for seqs in batches:
        new, runs = merge(runs, seqs)
        assert new == set(seqs) - model
        model |= new
        assert {n for lo, hi in runs for n in range(lo, hi + 1)} == model
        assert all(lo <= hi for lo, hi in runs)
        assert all(b[0] > a[1] + 1 for a, b in itertools.pairwise(runs))


def test_a_boot_numbering_its_frames_is_one_run() -> None:
    new, runs = merge([], range(1000))
    assert len(new) == 1000 and runs == [(0, 999)]
    assert merge(runs, [5, 999]) == (set(), [(0, 999)])


@pytest.mark.parametrize(
    "key", ["dev/boot", "dev/boot/", "dev/boot/-1", "dev/boot/1e3", "7", "a/b/٣"]
)
def test_a_key_without_a_decimal_seq_is_refused(key: str) -> None:
    with pytest.raises(ValueError, match="not a retransmission key"):
        split_key(key)


def test_split_key_takes_the_last_level_as_the_seq() -> None:
    assert split_key("sim-1/boot:7/42") == ("sim-1/boot:7", 42)
