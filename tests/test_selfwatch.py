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
    assert down is not None and down.kind == "resolved" and down.lasted == 570.0


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
    assert c is not None and c.kind == "resolved" and c.lasted == 230.0


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
