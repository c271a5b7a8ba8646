"""Self-alert conditions, sans-IO (gateway/selfwatch.py): hysteresis and the rate limit."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.selfwatch import Bounds, SelfWatch

B = Bounds(raise_after=60.0, clear_after=30.0, min_interval=900.0)


def test_raised_after_holding_resolved_after_clearing() -> None:
    w = SelfWatch()
    assert w.update("mqtt", True, 0.0, 1000.0, B, "broker gone") is None
    assert w.update("mqtt", True, 59.0, 1059.0, B) is None
    up = w.update("mqtt", True, 60.0, 1060.0, B)
    assert up is not None and (up.kind, up.detail) == ("raised", "broker gone")
    assert w.update("mqtt", True, 500.0, 1500.0, B) is None  # once
    assert w.update("mqtt", False, 600.0, 1600.0, B) is None
    down = w.update("mqtt", False, 630.0, 1630.0, B)
    # From when it began to hold (1000) to when it was seen clear (1600).
    assert down is not None and down.kind == "resolved" and down.lasted == 600.0


def test_a_blink_shorter_than_raise_after_says_nothing() -> None:
    w = SelfWatch()
    w.update("serial/a", True, 0.0, 0.0, B)
    assert w.update("serial/a", False, 10.0, 10.0, B) is None
    assert w.update("serial/a", True, 20.0, 20.0, B) is None
    assert w.update("serial/a", True, 79.0, 79.0, B) is None  # the clock restarted at 20


def test_a_flapping_link_gives_a_few_mails_not_hundreds() -> None:
    w = SelfWatch()
    quick = Bounds(raise_after=0.0, clear_after=0.0, min_interval=900.0)
    changes = []
    for i in range(1000):  # down one second, up the next, for 2000 s
        changes.append(w.update("mqtt", i % 2 == 0, float(i * 2), float(i * 2), quick))
        changes.append(w.update("mqtt", False, float(i * 2 + 1), float(i * 2 + 1), quick))
    got = [c for c in changes if c is not None]
    assert len(got) <= 6
    assert [c.kind for c in got][:2] == ["raised", "resolved"]
    later = [c for c in got if c.kind == "raised"][1]
    assert later.flaps > 100  # the next raise says how often it came and went


def test_a_raised_condition_restored_after_a_restart_is_resolved_not_raised_again() -> None:
    w = SelfWatch()
    w.restore("outbox", raised=True, raised_wall=100.0)
    assert w.update("outbox", True, 0.0, 200.0, B) is None
    w.update("outbox", False, 1.0, 300.0, B)
    c = w.update("outbox", False, 31.0, 330.0, B)
    assert c is not None and c.kind == "resolved" and c.lasted == 200.0


def test_the_state_found_at_the_start_is_not_a_flap() -> None:
    # The broker is not yet connected at the first check, connects, and later goes
    # away for good: one episode, not "came and went 1 more times".
    w = SelfWatch()
    q = Bounds(raise_after=10.0, clear_after=5.0, min_interval=900.0)
    assert w.update("mqtt", True, 0.0, 0.0, q, "not connected") is None
    assert w.update("mqtt", False, 1.0, 1.0, q) is None
    assert w.update("mqtt", True, 50.0, 50.0, q, "disconnected") is None
    up = w.update("mqtt", True, 60.0, 60.0, q)
    assert up is not None and up.kind == "raised" and up.flaps == 0


def test_blinks_after_the_start_are_counted_as_flaps() -> None:
    w = SelfWatch()
    q = Bounds(raise_after=10.0, clear_after=5.0, min_interval=900.0)
    w.update("mqtt", False, 0.0, 0.0, q)
    for t in (10.0, 20.0):  # two blinks shorter than raise_after
        w.update("mqtt", True, t, t, q)
        w.update("mqtt", False, t + 1, t + 1, q)
    w.update("mqtt", True, 50.0, 50.0, q)
    up = w.update("mqtt", True, 60.0, 60.0, q)
    assert up is not None and up.flaps == 2


def test_how_long_it_lasted_counts_from_when_it_began_to_hold() -> None:
    # Down from 1000 to 1029 (wall): raised at 1010, resolved at 1034; it lasted 29 s.
    w = SelfWatch()
    q = Bounds(raise_after=10.0, clear_after=5.0, min_interval=900.0)
    w.update("mqtt", False, 0.0, 990.0, q)
    w.update("mqtt", True, 10.0, 1000.0, q)
    assert w.update("mqtt", True, 20.0, 1010.0, q) is not None
    assert w.update("mqtt", False, 39.0, 1029.0, q) is None
    down = w.update("mqtt", False, 44.0, 1034.0, q)
    assert down is not None and down.kind == "resolved" and down.lasted == 29.0


def test_put_back_undoes_a_change_whose_alert_was_not_stored() -> None:
    w = SelfWatch()
    q = Bounds(0.0, 0.0, 0.0)
    before = w.snapshot("store")
    assert w.update("store", True, 0.0, 0.0, q) is not None
    w.put_back("store", before)
    assert w.update("store", True, 1.0, 1.0, q) is not None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.floats(0, 400)), max_size=80))
def test_raises_and_resolves_alternate(plan: list[tuple[bool, float]]) -> None:
    w = SelfWatch()
    now, kinds = 0.0, []
    for holds, dt in plan:
        now += dt
        c = w.update("x", holds, now, now, B)
        if c is not None:
            kinds.append(c.kind)
    assert all(k == ("raised" if i % 2 == 0 else "resolved") for i, k in enumerate(kinds))


def test_a_resolve_says_how_things_are_now() -> None:
    w = SelfWatch()
    q = Bounds(0.0, 0.0, 0.0)
    w.update("outbox", True, 0.0, 0.0, q, "the outbox holds 90 of 100")
    c = w.update("outbox", False, 1.0, 1.0, q, "the outbox holds 3 of 100")
    assert c is not None and c.detail == "the outbox holds 3 of 100"
