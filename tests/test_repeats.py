"""What keeps happening is said once, then ever more rarely (gateway/repeats.py), pure."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.repeats import Repeats


def test_said_once_then_after_a_minute_ten_minutes_and_hourly_with_a_count() -> None:
    r = Repeats()
    said = {t: n for t in range(0, 4 * 3600) if (n := r.occurred("x", float(t))) is not None}
    assert list(said)[:4] == [0, 60, 660, 4260]
    assert said[0] == 0 and said[60] == 60 and said[660] == 600
    assert len(said) == 6  # a line a second would have been 14,400


def test_over_says_whether_the_end_is_worth_saying_and_starts_afresh() -> None:
    r = Repeats()
    assert r.over("x") is False
    assert r.occurred("x", 0.0) == 0
    assert "x" in r and r.over("x") is True and "x" not in r
    assert r.occurred("x", 1.0) == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.0, 30.0), min_size=1, max_size=400))
def test_never_more_than_one_line_a_minute_and_every_occurrence_counted(
    gaps: list[float],
) -> None:
    r, now, said, counted = Repeats(), 0.0, [], 0
    for gap in gaps:
        now += gap
        if (n := r.occurred("x", now)) is not None:
            said.append(now)
            counted += n
    assert said[0] == gaps[0]  # the first occurrence is always said
    assert all(b - a >= 60.0 for a, b in itertools.pairwise(said))
    # Each occurrence after the first is either in a said count or still unsaid.
    unsaid = len(gaps) - 1 - counted
    assert unsaid >= 0
