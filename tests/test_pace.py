"""The smarthost-wide token bucket (gateway/pace.py) as values: the time passed in,
no sleeps. The property: over any window of t seconds no more than burst + rate·t
sends start, whatever the pattern of asking."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.pace import Bucket, describe


def test_an_idle_bucket_sends_at_once_then_spaces_evenly() -> None:
    b = Bucket(30, 60.0, now=0.0)  # Microsoft 365's 30/min
    assert b.wait(0.0) == 0.0
    b.take(0.0)
    assert b.wait(0.0) == pytest.approx(2.0)
    assert b.wait(1.5) == pytest.approx(0.5)
    assert b.wait(2.0) == 0.0
    b.take(2.0)
    assert b.tokens(2.0) == pytest.approx(0.0)


def test_tokens_never_exceed_the_burst() -> None:
    b = Bucket(5, 1.0, now=0.0, burst=3)
    assert b.tokens(1e6) == 3.0
    for _ in range(3):
        assert b.wait(1e6) == 0.0
        b.take(1e6)
    assert b.wait(1e6) == pytest.approx(0.2)


def test_a_clock_that_goes_back_refills_nothing() -> None:
    b = Bucket(1, 10.0, now=100.0)
    b.take(100.0)
    assert b.tokens(50.0) == 0.0 and b.wait(50.0) == pytest.approx(10.0)


def test_a_send_without_a_token_is_paid_by_the_next() -> None:
    b = Bucket(1, 1.0, now=0.0)
    b.take(0.0)
    b.take(0.0)  # owed
    assert b.wait(0.0) == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("count", "period", "text"),
    [
        (30, 60.0, "30/min"),
        (1000, 3600.0, "1000/h"),
        (5, 1.0, "5/s"),
        (5, 600.0, "5/10min"),
        (100, 86400.0, "100/d"),
        (3, 90.0, "3/90s"),
    ],
)
def test_describe(count: int, period: float, text: str) -> None:
    assert describe(count, period) == text


@pytest.mark.parametrize("bad", [(0, 60.0), (1, 0.0), (1, -1.0)])
def test_nonsense_is_refused(bad: tuple[int, float]) -> None:
    with pytest.raises(ValueError):
        Bucket(*bad, now=0.0)


@given(
    count=st.integers(1, 50),
    period=st.sampled_from([1.0, 2.5, 60.0]),
    burst=st.integers(1, 5),
    asks=st.lists(st.floats(0.0, 5.0, allow_nan=False), min_size=1, max_size=60),
)
def test_no_window_holds_more_than_rate_times_t_plus_burst(
    count: int, period: float, burst: int, asks: list[float]
) -> None:
    """A relay that asks at arbitrary moments and sends whenever allowed."""
    b = Bucket(count, period, now=0.0, burst=burst)
    now, sent = 0.0, []
    for gap in asks:
        now += gap
        while b.wait(now) == 0.0:
            b.take(now)
            sent.append(now)
    rate = count / period
    for i, start in enumerate(sent):
        for j in range(i, len(sent)):
            assert j - i + 1 <= burst + rate * (sent[j] - start) + 1e-6


@given(
    burst=st.integers(1, 3),
    steps=st.lists(
        st.tuples(st.integers(0, 3), st.floats(0.0, 4.0, allow_nan=False), st.booleans()),
        min_size=1,
        max_size=80,
    ),
)
def test_parallel_sessions_interleaved_never_exceed_the_rate(
    burst: int, steps: list[tuple[int, float, bool]]
) -> None:
    """Four sessions as gateway/relay_worker.py drives them: claim no more rows than
    tokens (none taken), log in for a while (or fail to), then take a token right
    before each send and give the rest back when there is none."""
    b = Bucket(30, 60.0, now=0.0, burst=burst)
    now, sent = 0.0, []
    claimed = [0, 0, 0, 0]
    for worker, gap, fails in steps:
        now += gap
        if claimed[worker] == 0:
            if b.wait(now) == 0.0:
                claimed[worker] = max(1, int(b.tokens(now)))
            continue
        if fails:  # the login failed (crowded, failover): the rows go back unsent
            claimed[worker] = 0
            continue
        while claimed[worker] and b.try_take(now):
            sent.append(now)
            claimed[worker] -= 1
        claimed[worker] = 0
    rate = 30 / 60.0
    for i, start in enumerate(sent):
        for j in range(i, len(sent)):
            assert j - i + 1 <= burst + rate * (sent[j] - start) + 1e-6


def test_a_token_is_spent_at_the_send_not_before_a_slow_login() -> None:
    """The review's case: session A claims (burst 1), logs in slowly; B sends at 10 s;
    A's login then ends: no second send at 10 s (it was two, with a refund)."""
    b = Bucket(30, 60.0, now=0.0)
    assert b.wait(0.0) == 0.0  # A claims one row, takes nothing yet
    assert b.try_take(10.0)  # B
    assert not b.try_take(10.0)  # A, after its login: the row goes back, in order
    assert b.try_take(12.0)
