"""The adapter (gateway/watch.py) in-process with a real outbox and writer: each
self-alert condition raised and resolved through the one door, routes named by the
config honoured, state read back at a start. The clock is the real one; every bound is
zero so nothing waits."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.alert import Draft, normalize
from gateway.config import Config, parse
from gateway.ingest import Ingest
from gateway.outbox import Outbox, alert_tables
from gateway.outbox.writer import Writer
from gateway.routing import Router
from gateway.runtime import Runtime
from gateway.watch import Watches
from tests.parts import wait_for

ROUTES = """
[[route]]
name = "ops"
match = "alerts/#"
to = ["ops@example.com"]

[[route]]
name = "fleet"
to = ["fleet@example.com"]
match = "nothing/#"
"""

QUICK = """
[selfalerts]
enabled = true
route = "fleet"
clear_after = "0s"
min_interval = "0s"
serial_after = "0s"
mqtt_after = "0s"
store_after = "0s"
clock_after = "0s"
"""


class Rig:
    def __init__(self, tmp: Path, extra: str) -> None:
        self.config: Config = parse(
            f'[gateway]\ndevice_id = "gw-w"\nstate_dir = "{tmp}/state"\n'
            f'runtime_dir = "{tmp}/run"\n{ROUTES}{extra}'
        )
        self.outbox = Outbox(self.config.outbox_path)
        self.writer = Writer(self.outbox)
        self.writer.start()
        self.runtime = Runtime()
        self.ingest = Ingest(self.writer, Router(self.config.routes), self.runtime)
        self.watches = Watches(self.config, self.ingest, self.runtime)
        self.writer.call(self.watches.restore).result(10)
        self.ingest.observers.append(self.watches.observed)

    def stored(self) -> list[tuple[str, str, str]]:
        """(topic, message, route) of every stored delivery."""

        def read(ob: Outbox) -> list[tuple[str, str, str]]:
            rows = []
            for t in alert_tables(ob.conn):
                rows += ob.conn.execute(
                    f"SELECT a.topic, a.message, d.route FROM {t} a JOIN delivery d"
                    " ON d.alert_seq = a.seq"
                ).fetchall()
            return rows

        return self.writer.call(read).result(10)

    def stop(self) -> None:
        self.writer.stop()
        self.outbox.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Callable[[str], Rig]]:
    made: list[Rig] = []

    def make(extra: str) -> Rig:
        made.append(Rig(tmp_path, extra))
        return made[-1]

    yield make
    for r in made:
        r.stop()


def _topics(r: Rig, word: str) -> list[str]:
    return [t for t, m, _ in r.stored() if word in m]


def test_each_condition_is_raised_and_resolved_on_the_configured_route(
    rig: Callable[[str], Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    r: Rig = rig(QUICK)
    monkeypatch.setattr("gateway.watch.clock_synced", lambda: False)
    full = collections.namedtuple("full", "total used free")(100 * 2**20, 99 * 2**20, 2**20)
    monkeypatch.setattr("gateway.watch.shutil.disk_usage", lambda p: full)
    r.runtime.uplink = "auth_failed"
    r.runtime.last_error = "535 5.7.8 bad credentials"
    r.watches.tick(outbox_live=0)
    for cond in ("clock", "disk", "auth"):
        wait_for(lambda cond=cond: f"gateway/gw-w/{cond}" in _topics(r, ""), what=cond)
    monkeypatch.setattr("gateway.watch.clock_synced", lambda: True)
    roomy = collections.namedtuple("roomy", "total used free")(100 * 2**20, 2**20, 99 * 2**20)
    monkeypatch.setattr("gateway.watch.shutil.disk_usage", lambda p: roomy)
    r.runtime.uplink = "up"
    r.watches.tick(outbox_live=0)
    for cond in ("clock", "disk", "auth"):
        wait_for(lambda cond=cond: f"gateway/gw-w/{cond}" in _topics(r, "resolved"), what=cond)
    stored = r.stored()
    assert {route for t, _, route in stored} == {"fleet"}  # selfalerts.route, not the topic's
    messages = [m for _, m, _ in stored]
    assert "the smarthost refuses our login: 535 5.7.8 bad credentials" in messages
    assert any(m.startswith("resolved after") and "accepts our login" in m for m in messages)
    assert len(stored) == 6  # one raise and one resolve each, nothing twice
    assert r.runtime.watch == {}


def test_a_raised_condition_stays_raised_across_a_restart(
    rig: Callable[[str], Rig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r: Rig = rig(QUICK)
    monkeypatch.setattr("gateway.watch.clock_synced", lambda: False)
    r.watches.tick(outbox_live=0)
    wait_for(lambda: "gateway/gw-w/clock" in _topics(r, ""), what="raised")
    assert "raised clock" in r.runtime.watch
    r.stop()
    again: Rig = rig(QUICK)
    again.watches.tick(outbox_live=0)  # still unsynchronised: no second mail
    monkeypatch.setattr("gateway.watch.clock_synced", lambda: True)
    again.watches.tick(outbox_live=0)
    wait_for(lambda: "gateway/gw-w/clock" in _topics(again, "resolved"), what="resolved")
    first = next(m for t, m, _ in again.stored() if t == "gateway/gw-w/clock")
    assert first.startswith("the clock is not")
    assert len([t for t, _, _ in again.stored() if t == "gateway/gw-w/clock"]) == 2


def test_a_silence_rule_with_a_route_sends_there(rig: Callable[[str], Rig]) -> None:
    r: Rig = rig('[[silence]]\nmatch = "alerts/cold/#"\nexpect_every = "2s"\nroute = "fleet"\n')
    a = normalize(b"4 C", Draft("alerts/cold/t1", "mqtt", "t1"))
    r.ingest.submit([(a, None)], lambda result: None)
    wait_for(lambda: bool(r.stored()), what="the reading stored")
    r.watches.tick(outbox_live=0)
    assert r.watches.silence.sources["alerts/cold/t1|t1"].fired is False
    wait_for(
        lambda: (r.watches.tick(outbox_live=0), _topics(r, "nothing for"))[1] != [],
        what="the silence",
        timeout=10,
    )
    [(topic, route)] = [(t, rt) for t, m, rt in r.stored() if "nothing for" in m]
    assert (topic, route) == ("gateway/gw-w/silence/alerts/cold/t1", "fleet")


def test_an_unreadable_state_row_is_skipped_not_fatal(
    rig: Callable[[str], Rig], tmp_path: Path
) -> None:
    r: Rig = rig('[[silence]]\nexpect_every = "1m"\n')
    r.writer.call(
        lambda ob: ob.conn.execute(
            "INSERT INTO watch (kind, key, state) VALUES ('silence', 'a|b', 'not json')"
        )
    ).result(10)
    r.stop()
    again: Rig = rig('[[silence]]\nexpect_every = "1m"\n')
    assert again.watches.silence.sources == {}


def test_a_change_whose_alert_cannot_be_stored_is_tried_again(
    rig: Callable[[str], Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    r = rig(QUICK)
    monkeypatch.setattr("gateway.watch.clock_synced", lambda: False)
    r.writer.call(
        lambda ob: ob.conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON watch BEGIN SELECT RAISE(ABORT, 'io'); END"
        )
    ).result(10)
    r.watches.tick(outbox_live=0)
    wait_for(lambda: "self-alert clock" in r.watches._unstored, what="the failure")
    assert r.stored() == []  # the alert went with its state row: neither is stored
    r.writer.call(lambda ob: ob.conn.execute("DROP TRIGGER refuse")).result(10)
    r.watches.tick(outbox_live=0)
    wait_for(lambda: "gateway/gw-w/clock" in _topics(r, ""), what="stored on the next tick")
    topics = [t for t, _, _ in r.stored()]
    assert topics.count("gateway/gw-w/clock") == 1
    # The failure itself was a condition (store_after = 0): reported once it could be.
    assert topics.count("gateway/gw-w/store") == 1


def test_a_new_source_is_in_the_watch_table_before_any_tick(rig: Callable[[str], Rig]) -> None:
    r: Rig = rig('[[silence]]\nmatch = "alerts/cold/#"\nexpect_every = "1m"\n')
    a = normalize(b"4 C", Draft("alerts/cold/t1", "mqtt", "t1"))
    r.ingest.submit([(a, None)], lambda result: None)

    def rows() -> list[tuple[str, str]]:
        return r.writer.call(
            lambda ob: ob.conn.execute("SELECT kind, key FROM watch").fetchall()
        ).result(10)

    # No tick runs here: a kill -9 now must still find the source at the next start.
    wait_for(lambda: ("silence", "alerts/cold/t1|t1") in rows(), what="the row")
    r.stop()
    again: Rig = rig('[[silence]]\nmatch = "alerts/cold/#"\nexpect_every = "1m"\n')
    src = again.watches.silence.sources["alerts/cold/t1|t1"]
    assert src.via == "mqtt" and not src.fired


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"written_at": 150.0}', 150.0),  # later than alive_at: the better bound
        ('{"written_at": 50.0}', 100.0),  # older: alive_at stands
        ('{"written_at": 1e12}', 100.0),  # in the future: not believed
        ('{"written_at": "150"}', 100.0),
        ('{"written_at": true}', 100.0),
        ("[1, 2]", 100.0),
        ("not json", 100.0),
    ],
)
def test_the_downtime_starts_at_the_later_sign_of_life(
    tmp_path: Path, text: str, expected: float
) -> None:
    from gateway.watch import _last_alive

    path = tmp_path / "status.json"
    path.write_text(text)
    assert _last_alive(100.0, path, now_wall=200.0) == expected
    assert _last_alive(100.0, tmp_path / "missing.json", now_wall=200.0) == 100.0
