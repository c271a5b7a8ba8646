"""The uplink's schedules (gateway/uplink.py) as values: no sockets, no sleeps, the
monotonic time passed in and the jitter drawn from a seeded Random."""

from __future__ import annotations

import itertools
import math
import random

from hypothesis import given
from hypothesis import strategies as st

from gateway.uplink import (
    FIRST_PROBE,
    POISON_BREAKS,
    TCP_PROBE_EVERY,
    TCP_PROBE_SLOW_TIMEOUT,
    TCP_PROBE_TIMEOUT,
    Blame,
    Breaks,
    Uplink,
    probe_delay,
    retry_delay,
    throttle_delay,
)


def test_retry_delay_doubles_with_jitter_and_cap() -> None:
    rng = random.Random(1)
    delays = [retry_delay(n, 300, 3600, rng) for n in range(1, 8)]
    assert 240 <= delays[0] <= 300 and 480 <= delays[1] <= 600
    assert all(d <= 3600 for d in delays) and delays[-1] >= 2880


def test_probe_delay_is_capped() -> None:
    rng = random.Random(1)
    t, first_minute = 0.0, 1
    while (t := t + probe_delay(first_minute, 60, rng)) < 60:
        first_minute += 1
    assert first_minute < 10
    assert [round(probe_delay(n, 60, rng) / 2) * 2 for n in (1, 2, 3)] == [2, 4, 8]
    assert probe_delay(20, 60, rng) <= 60


def test_an_up_uplink_holds_nothing() -> None:
    up = Uplink(60.0, random.Random(1))
    assert not up.holding(0.0) and not up.tcp_probe_due(1e9)
    assert up.nudge() is False  # nothing to hurry
    assert up.up(5.0) is None


def test_unreachable_probes_by_tcp_only() -> None:
    up = Uplink(60.0, random.Random(1))
    delay = up.down(unreachable=True, now=100.0)
    assert delay == FIRST_PROBE and up.down_since == 100.0
    assert up.holding(101.0) and not up.tcp_probe_due(101.0)
    # No session until a probe connects: its first step is the same connect.
    assert up.tcp_probe_due(100.0 + FIRST_PROBE) and up.probe_at == math.inf
    up.tcp_probed(False, now=102.0)
    assert 102.0 + 0.9 * TCP_PROBE_EVERY <= up.tcp_probe_at <= 102.0 + TCP_PROBE_EVERY
    assert up.holding(110.0)
    up.tcp_probed(True, now=111.0)  # the path is back: a session at once
    assert not up.holding(111.0) and up.tcp_probe_at == math.inf and up.tcp_probes == 2
    assert up.up(111.5) == 11.5
    assert up.failures == 0 and up.down_since is None


def test_later_unreachable_failures_probe_at_most_every_tcp_probe_every() -> None:
    up = Uplink(600.0, random.Random(1))
    now = 0.0
    for _ in range(10):
        delay = up.down(unreachable=True, now=now)
        assert up.tcp_probe_at <= now + TCP_PROBE_EVERY
        now += delay
    assert up.down_since == 0.0 and up.failures == 10


def test_refused_sessions_back_off_exponentially_without_tcp_probes() -> None:
    up = Uplink(60.0, random.Random(1))
    delays = [up.down(unreachable=False, now=0.0) for _ in range(8)]
    assert up.tcp_probe_at == math.inf
    assert 0.9 * FIRST_PROBE <= delays[0] <= FIRST_PROBE
    assert all(b > a for a, b in itertools.pairwise(delays[:5]))  # 2, 4, 8, 16, 32
    assert max(delays) <= 60.0


def test_flush_and_nudge() -> None:
    up = Uplink(60.0, random.Random(1))
    up.down(unreachable=False, now=0.0)
    assert up.holding(1.0)
    up.flush()
    assert not up.holding(1.0)
    up.down(unreachable=True, now=10.0)
    assert up.nudge() and up.tcp_probe_due(10.0)


@given(
    st.lists(st.tuples(st.booleans(), st.floats(0, 1e4)), min_size=1, max_size=30),
    st.integers(0, 2**32),
)
def test_down_never_schedules_past_probe_max_nor_in_the_past(
    failures: list[tuple[bool, float]], seed: int
) -> None:
    up = Uplink(120.0, random.Random(seed))
    now = 0.0
    for unreachable, gap in failures:
        now += gap
        delay = up.down(unreachable, now)
        assert up.next_probe > now and up.next_probe <= now + max(120.0, TCP_PROBE_EVERY)
        assert math.isclose(up.next_probe, now + delay)


def test_a_broken_session_is_the_uplinks_fault_until_others_go_between() -> None:
    b = Breaks()
    assert b.broke("m", sent=0) == (Blame.UPLINK, 1)
    assert b.broke("m", sent=3) == (Blame.UPLINK, 2)
    assert b.broke("m", sent=5) == (Blame.MESSAGE, POISON_BREAKS)
    assert b.broke("m", sent=5) == (Blame.UPLINK, 1)  # charged: counted afresh


def test_the_same_message_breaking_with_nothing_sent_is_the_uplink_down() -> None:
    b = Breaks()
    for n in range(1, POISON_BREAKS):
        assert b.broke("m", sent=7) == (Blame.UPLINK, n)
    assert b.broke("m", sent=7) == (Blame.UPLINK_DOWN, POISON_BREAKS)
    b.settled("m")  # it went through at last
    assert b.broke("m", sent=9) == (Blame.UPLINK, 1)


def test_every_sixth_tcp_probe_waits_for_a_slow_link() -> None:
    up = Uplink(60.0, random.Random(1))
    up.down(unreachable=True, now=0.0)
    timeouts = []
    for i in range(12):
        timeouts.append(up.tcp_probe_timeout())
        up.tcp_probed(False, now=float(i))
    assert timeouts.count(TCP_PROBE_SLOW_TIMEOUT) == 2
    assert timeouts.count(TCP_PROBE_TIMEOUT) == 10 and TCP_PROBE_TIMEOUT < 1.0


def test_throttle_pauses_double_from_thirty_seconds_to_the_cap() -> None:
    assert [throttle_delay(n, 600.0) for n in range(1, 8)] == [30, 60, 120, 240, 480, 600, 600]
    assert throttle_delay(1, 1.0) == 1.0  # a cap below the first pause bounds it too
    assert throttle_delay(10**9, 600.0) == 600.0  # no float overflow after a long siege


@given(st.integers(1, 10_000), st.floats(1.0, 86400.0))
def test_a_throttle_pause_is_bounded_and_grows(times: int, cap: float) -> None:
    d = throttle_delay(times, cap)
    assert 0 < d <= cap and d <= throttle_delay(times + 1, cap)


def test_the_relay_throttle_pause_grows_then_starts_afresh_after_an_accepted_mail() -> None:
    from gateway.config import SmtpSection
    from gateway.runtime import Runtime
    from gateway.waits import Waits

    smtp = SmtpSection(host="h", port=587, tls="starttls", sender="a@b", throttle_max=100.0)
    waits = Waits(Uplink(60.0, random.Random(1)), Runtime(), smtp)
    clock = [1000.0]
    waits.clock = lambda: clock[0]
    delays = []
    for _ in range(4):
        delays.append(waits.refusal("throttle", "421 4.7.0 slow down").delay)
        clock[0] += delays[-1]  # the next one after this pause
    assert delays == [30.0, 60.0, 100.0, 100.0]
    clock[0] += 100
    refused = waits.refusal("throttle", "x")
    assert refused.state == "throttled" and "slow down" in str(refused)
    clock[0] += refused.delay
    waits.accepted()
    assert waits.refusal("throttle", "x").delay == 30.0
    assert waits.refusal("quota", "x").state == "paused"  # the other pauses are unchanged
