"""gateway.smarthost.Host without I/O: the sessions a smarthost allows after it turned
one away, and when it may be tried (the failover order is the first usable host)."""

from __future__ import annotations

import random
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from gateway.config import SmtpSection
from gateway.runtime import Runtime
from gateway.smarthost import CROWDED_FOR, Host


def host(sessions: int = 4) -> Host:
    cfg = SmtpSection(
        host="smtp.example.com", port=587, tls="starttls", sender="a@b.c", sessions=sessions
    )
    return Host(0, cfg, Runtime(), random.Random(1), Path("/nonexistent"))


def test_a_refusal_shrinks_the_limit_for_a_while_then_it_comes_back() -> None:
    h = host(4)
    h.opened()
    h.opened()
    h.crowded(100.0, "421 too many connections")
    assert h.allowed(100.0) == 3  # one fewer, never fewer than work now
    h.crowded(101.0, "421 too many connections")
    assert h.allowed(101.0) == 2 and h.status["limit"] == 2
    h.crowded(102.0, "421 too many connections")
    assert h.allowed(102.0) == 2  # two of ours work: the server allows two
    assert h.allowed(102.0 + CROWDED_FOR - 1) == 2
    assert h.allowed(102.0 + CROWDED_FOR) == 4


def test_a_session_that_opens_while_crowded_raises_the_limit() -> None:
    h = host(4)
    h.opened()
    h.crowded(0.0, "421")
    h.crowded(0.0, "421")
    h.crowded(0.0, "421")
    assert h.allowed(0.0) == 1
    h.opened()  # was still logging in when the others were turned away
    assert h.allowed(0.0) == 2


@given(st.lists(st.tuples(st.sampled_from(["open", "close", "crowd"]), st.floats(0, 5))))
def test_the_limit_stays_between_one_and_sessions(steps: list[tuple[str, float]]) -> None:
    h = host(4)
    now = 0.0
    for op, dt in steps:
        now += dt
        if op == "open" and h.open < 4:
            h.opened()
        elif op == "close":
            h.closed()
        elif op == "crowd":
            h.crowded(now, "421")
            assert h.allowed(now) >= max(1, h.open)
        assert 1 <= h.allowed(now) <= 4
        assert h.status["sessions"] == h.open >= 0


def test_a_held_host_is_not_usable_until_its_probe() -> None:
    h = host()
    assert h.usable(0.0)
    h.uplink.down(unreachable=False, now=0.0)
    assert not h.usable(0.5)
    assert h.usable(h.uplink.probe_at)
