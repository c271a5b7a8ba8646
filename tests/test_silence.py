"""The dead man's switch, sans-IO (gateway/silence.py), and its state in the outbox."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import outbox as ob_mod
from gateway.alert import Draft, normalize
from gateway.config import SilenceSection
from gateway.outbox import Outbox, Routed, watch_state
from gateway.silence import Event, Source, Watcher, describe, human, rule_for

COLD = SilenceSection(name="cold", match="alerts/cold-room-3/#", expect_every=900.0)
ANY = SilenceSection(name="any", match="#", sensor="door", expect_every=60.0)


def test_a_source_that_stops_is_reported_once_and_again_once_when_it_returns() -> None:
    w = Watcher([COLD])
    assert w.observe("alerts/cold-room-3/temp1", "temp1", 1000.0, 0.0) == []
    assert w.due(1899.0, 899.0) == []
    [silent] = w.due(1900.0, 900.0)
    assert (silent.kind, silent.key, silent.quiet_for) == (
        "silent",
        "alerts/cold-room-3/temp1|temp1",
        900.0,
    )
    assert w.due(5000.0, 4000.0) == []  # never twice for one silence
    [again] = w.observe("alerts/cold-room-3/temp1", "temp1", 5000.0, 4000.0)
    assert (again.kind, again.quiet_for) == ("again", 4000.0)
    assert w.observe("alerts/cold-room-3/temp1", "temp1", 5001.0, 4001.0) == []


@pytest.mark.parametrize(
    ("topic", "sensor", "rule"),
    [
        ("alerts/cold-room-3/temp1", "temp1", "cold"),
        ("alerts/cold-room-3/door", "door", "cold"),  # first rule wins
        ("alerts/truck/door", "door", "any"),
        ("alerts/truck/temp", "temp", None),  # `sensor` narrows the second rule
    ],
)
def test_the_first_matching_rule_watches_a_source(
    topic: str, sensor: str, rule: str | None
) -> None:
    found = rule_for([COLD, ANY], topic, sensor)
    assert (found.name if found else None) == rule


def test_sources_no_rule_watches_are_not_kept() -> None:
    w = Watcher([COLD])
    w.observe("alerts/other/x", "x", 0.0, 0.0)
    assert w.sources == {} and w.due(1e9, 1e9) == []


def test_a_restart_gives_a_fresh_window_and_says_how_long_the_gateway_was_down() -> None:
    w = Watcher([COLD])
    # Last seen at wall 0; the gateway was down 6000 s; it starts at monotonic 50.
    w.restore("alerts/cold-room-3/temp1|temp1", Source("cold", 0.0, 123.0), 6000.0, 50.0)
    assert w.due(7000.0, 50.0 + 899) == []  # not silence evidence: nobody listened
    [e] = w.due(7800.0, 950.0)
    assert e.down_for == 6000.0 and e.quiet_for == 7800.0
    assert "nothing for 2 h 10 min" in describe(e)
    assert "of which the gateway itself was down 1 h 40 min" in describe(e)


def test_a_fired_silence_stays_fired_across_a_restart() -> None:
    w = Watcher([COLD])
    w.restore("alerts/cold-room-3/t|t", Source("cold", 0.0, 0.0, fired=True), 100.0, 0.0)
    assert w.due(1e6, 1e6) == []
    [again] = w.observe("alerts/cold-room-3/t", "t", 2000.0, 10.0)
    assert again.kind == "again" and again.down_for == 100.0


def test_a_source_whose_rule_is_gone_is_forgotten() -> None:
    w = Watcher([COLD])
    w.restore("x|x", Source("removed", 0.0, 0.0), 0.0, 0.0)
    assert w.sources == {}


def test_an_unstored_silence_is_reported_again() -> None:
    w = Watcher([COLD])
    w.observe("alerts/cold-room-3/t", "t", 0.0, 0.0)
    [e] = w.due(900.0, 900.0)
    w.unfire(e.key)
    assert [x.kind for x in w.due(901.0, 901.0)] == ["silent"]


def test_a_wall_clock_that_went_back_does_not_shorten_the_silence() -> None:
    w = Watcher([COLD])
    w.observe("alerts/cold-room-3/t", "t", 1_000_000.0, 0.0)
    [e] = w.due(10.0, 900.0)  # NTP set the clock back
    assert e.quiet_for == 900.0


def test_hostile_topics_do_not_grow_the_table_without_end(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gateway.silence.MAX_SOURCES", 3)
    w = Watcher([SilenceSection(name="all", match="#", expect_every=60.0)])
    for i in range(10):
        w.observe(f"t/{i}", "s", 0.0, 0.0)
    assert len(w.sources) == 3 and w.dropped == 7


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0 s"), (40, "40 s"), (900, "15 min"), (7800, "2 h 10 min"), (90000, "1 d 1 h")],
)
def test_durations_read_as_a_person_says_them(seconds: float, text: str) -> None:
    assert human(seconds) == text


# Steps: ("tick", dt) advances time and asks due(); ("talk", dt) advances and observes.
steps = st.lists(st.tuples(st.sampled_from(["tick", "talk"]), st.floats(0, 2000)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(steps)
def test_never_twice_for_one_silence_and_always_again_after_silent(
    plan: list[tuple[str, float]],
) -> None:
    w = Watcher([COLD])
    now = 0.0
    w.observe("alerts/cold-room-3/t", "t", now, now)
    kinds: list[str] = []
    for step, dt in plan:
        now += dt
        events: list[Event] = (
            w.due(now, now) if step == "tick" else w.observe("alerts/cold-room-3/t", "t", now, now)
        )
        kinds += [e.kind for e in events]
    # silent and again alternate, starting with silent
    assert all(k == ("silent" if i % 2 == 0 else "again") for i, k in enumerate(kinds))
    assert w.sources["alerts/cold-room-3/t|t"].fired == (len(kinds) % 2 == 1)


# --- the state in the outbox ---------------------------------------------------------


def _alert(mark: tuple[str, str, str] | None) -> Routed:
    a = normalize(b"silent", Draft("gateway/gw/silence/x", "gateway", "x"))
    return Routed(a, (("ops", 2),), marks=(mark,) if mark else ())


def test_a_mark_commits_with_its_alert(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "outbox.db")
    state = json.dumps(
        {"rule": "cold", "last_wall": 1.0, "last_mono": 2.0, "fired": True, "down": 0}
    )
    ob.add([_alert(("silence", "x|x", state))])
    rows, alive = watch_state.load(ob)
    assert rows == [("silence", "x|x", state)] and alive is None


def test_a_mark_is_rolled_back_with_its_alert(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "outbox.db", max_messages=10)
    ob.conn.execute(
        "CREATE TRIGGER fail BEFORE INSERT ON watch BEGIN SELECT RAISE(ABORT, 'disk'); END"
    )
    with pytest.raises(Exception, match="disk"):
        ob.add([_alert(("silence", "x|x", "{}"))])
    assert ob.live == 0 and watch_state.load(ob)[0] == []


def test_save_keeps_last_seen_and_the_sign_of_life(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "outbox.db")
    watch_state.save(ob, [("silence", "k", "{}")], 1234.5)
    watch_state.save(ob, [], 1300.0, forget=[("silence", "k")])
    assert watch_state.load(ob) == ([], 1300.0)
    assert ob.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # back to FULL


def test_migration_7_adds_the_watch_table_and_keeps_data(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    ob = Outbox(db)
    ob.add([_alert(None)])
    ob.conn.executescript("DROP TABLE watch; PRAGMA user_version = 6;")
    ob.close()
    ob = Outbox(db)
    assert ob.conn.execute("PRAGMA user_version").fetchone()[0] == ob_mod.SCHEMA_VERSION >= 7
    assert ob.conn.execute("SELECT count(*) FROM watch").fetchone()[0] == 0
    assert ob.live == 1
    ob.close()
    assert sqlite3.connect(db).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_status_reads_the_watch_back_and_drops_what_is_not_text(tmp_path: Path) -> None:
    import os
    import time

    from gateway.status import read_runtime, render, report

    path = tmp_path / "status.json"
    watch = {"silent alerts/cold/t": "since 2026-01-01 00:00 UTC", "bad": 3, "raised x": None}
    path.write_text(json.dumps({"pid": os.getpid(), "started_at": time.time(), "watch": watch}))
    rt = read_runtime(path)
    assert rt is not None and rt["watch"] == {"silent alerts/cold/t": "since 2026-01-01 00:00 UTC"}
    text = render(report(tmp_path / "none.db", path))
    assert "watch      silent alerts/cold/t since 2026-01-01 00:00 UTC" in text


# --- a path that cannot be heard (the MQTT broker away) ----------------------------------

MQTT = frozenset({"mqtt"})


def test_sources_behind_a_paused_path_do_not_fire_and_get_a_fresh_window_on_its_return() -> None:
    w = Watcher([COLD])
    w.observe("alerts/cold-room-3/temp1", "temp1", 1000.0, 0.0, "mqtt")
    w.observe("alerts/cold-room-3/temp2", "temp2", 1000.0, 0.0, "serial")
    w.pause(MQTT, 100.0)  # the broker goes away
    fired = w.due(3000.0, 2000.0)
    # The serial sensor is still heard, and silent; the MQTT one is the broker's.
    assert [e.key for e in fired] == ["alerts/cold-room-3/temp2|temp2"]
    w.pause(frozenset(), 2500.0)  # the broker is back
    assert w.due(3399.0, 3399.0) == []  # within expect_every of the return
    [late] = w.due(3400.0, 3400.0)  # still quiet one window after the return
    assert late.key == "alerts/cold-room-3/temp1|temp1" and late.quiet_for == 2400.0


def test_a_source_that_speaks_after_the_return_is_not_reported() -> None:
    w = Watcher([COLD])
    w.observe("alerts/cold-room-3/temp1", "temp1", 1000.0, 0.0, "mqtt")
    w.pause(MQTT, 10.0)
    assert w.due(5000.0, 4000.0) == []
    w.pause(frozenset(), 4000.0)
    assert w.observe("alerts/cold-room-3/temp1", "temp1", 5001.0, 4001.0, "mqtt") == []
    assert w.due(5800.0, 4800.0) == []


def test_a_source_silent_before_the_outage_stays_reported_once() -> None:
    w = Watcher([COLD])
    w.observe("alerts/cold-room-3/temp1", "temp1", 1000.0, 0.0, "mqtt")
    assert len(w.due(1900.0, 900.0)) == 1
    w.pause(MQTT, 1000.0)
    w.pause(frozenset(), 2000.0)
    assert w.due(9000.0, 8000.0) == []  # fired already: no second mail
    [again] = w.observe("alerts/cold-room-3/temp1", "temp1", 9000.0, 8000.0, "mqtt")
    assert again.kind == "again"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.floats(0.0, 2000.0)), max_size=60))
def test_nothing_behind_a_paused_path_ever_fires(plan: list[tuple[bool, float]]) -> None:
    w = Watcher([COLD])
    w.observe("alerts/cold-room-3/temp1", "temp1", 0.0, 0.0, "mqtt")
    now = 0.0
    for paused, dt in plan:
        now += dt
        w.pause(MQTT if paused else frozenset(), now)
        fired = w.due(now, now)
        assert not (paused and fired)
        for e in fired:
            # Never sooner than a whole window after the path was last heard again.
            assert e.quiet_for >= COLD.expect_every
