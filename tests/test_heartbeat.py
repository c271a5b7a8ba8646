"""The heartbeat: pure schedule and text (gateway/heartbeat.py), and through the adapter
with a real outbox: due from the state the outbox keeps, sent once, not repeated after
a restart."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from gateway.config import ConfigError, parse
from gateway.heartbeat import Beat, is_due, summary
from gateway.outbox import Outbox
from tests.parts import wait_for
from tests.test_watch import Rig


def test_due_once_the_period_has_passed() -> None:
    b = Beat(last=1000.0)
    assert not is_due(b, 1000.0 + 86399, 86400)
    assert is_due(b, 1000.0 + 86400, 86400)


def test_a_clock_that_went_back_restarts_the_period() -> None:
    b = Beat(last=2_000_000_000.0)
    assert not is_due(b, 1000.0, 86400) and b.last == 1000.0


def test_the_summary_says_what_an_operator_asks() -> None:
    activity = {
        "taken": {"ops": 12, "": 1},
        "mailed": {"ops": 10},
        "queue": {"queued": 2, "sending": 0, "dead": 1},
    }
    text, fields = summary(Beat(0.0, offline=3900.0, down=600.0), activity, 90000.0, "9.9", 86400)
    assert text == (
        "heartbeat over 1 d: taken 13 (unrouted 1, ops 12), mailed 10 (ops 10); "
        "uplink down 1 h 5 min, gateway down 10 min; queue 2 waiting, 1 dead; "
        "up 1 d 1 h; mailgw 9.9"
    )
    assert fields["taken_ops"] == 12 and fields["queue_dead"] == 1 and fields["version"] == "9.9"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[heartbeat]\nevery = "10m"\n', "must be at least 3600s"),
        ('[heartbeat]\nevery = "40d"\n', "must be at most"),
        ('[heartbeat]\nevery = "1d"\nroute = "nope"\n', "heartbeat.route: names no route"),
        ('[heartbeat]\nevery = "1d"\nseverity = "meh"\n', "must be one of"),
        ('[heartbeat]\nperiod = "1d"\n', "heartbeat.period: unknown key"),
    ],
)
def test_heartbeat_refusals(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(text, source="gw.toml")
    assert any(expected in p for p in info.value.problems), info.value.problems


HB = '[heartbeat]\nevery = "1d"\nroute = "fleet"\n'


def test_a_due_heartbeat_is_sent_once_and_not_again_after_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    ob = Outbox(state / "outbox.db")
    last = time.time() - 86400 - 5  # as if the last one was a day ago
    ob.conn.execute(
        "INSERT INTO watch (kind, key, state) VALUES ('heartbeat', 'heartbeat', ?)",
        (json.dumps({"last": last, "offline": 120.0, "down": 0.0}),),
    )
    ob.close()
    r = Rig(tmp_path, HB)
    try:
        r.watches.tick(outbox_live=0)
        wait_for(lambda: any("heartbeat over 1 d" in m for _, m, _ in r.stored()), what="beat")
        [(topic, message, route)] = r.stored()
        assert (topic, route) == ("gateway/gw-w/heartbeat", "fleet")
        assert "uplink down 2 min" in message
        wait_for(lambda: not r.watches._beat_pending, what="the beat settled")
        r.watches.tick(outbox_live=0)
    finally:
        r.stop()
    again = Rig(tmp_path, HB)  # the beat's time was stored with it: nothing is due
    try:
        again.watches.tick(outbox_live=0)
        again.writer.call(lambda ob: None).result(10)
        assert len(again.stored()) == 1
    finally:
        again.stop()
