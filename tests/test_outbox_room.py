"""Room in the outbox by kind (gateway/outbox/room.py): the pure accounting, then the
Outbox keeping it (local mail's share per user and in all, unrouted readings outside
the bound, their retention), then the config and the status that show it."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import status
from gateway.config import ConfigError, parse
from gateway.errors import LocalRoomFull, OutboxFull
from gateway.outbox import Outbox, Routed, raw
from gateway.outbox.room import (
    LOCAL_SHARE_FULL,
    LOCAL_USER_SHARE_FULL,
    Held,
    Room,
    local_refusal,
    room_of,
    unrouted_room,
)
from tests.parts import alert, routed

rooms = st.builds(
    Room,
    max_messages=st.integers(10, 10**7),
    local_percent=st.integers(1, 50),
    local_user_percent=st.integers(1, 100),
    unrouted_percent=st.integers(0, 100),
)


@given(rooms, st.integers(0, 10**7), st.integers(0, 10**7), st.integers(1, 100))
def test_local_mail_is_refused_exactly_over_its_share_or_its_users(
    room: Room, local: int, user: int, adding: int
) -> None:
    user = min(user, local)
    why = local_refusal(room, local, user, adding)
    if local + adding > room.local_limit:
        assert why == LOCAL_SHARE_FULL
    elif user + adding > room.user_limit:
        assert why == LOCAL_USER_SHARE_FULL
    else:
        assert why is None


@given(rooms)
def test_alerts_always_keep_at_least_half_and_one_user_never_more_than_local_mail(
    room: Room,
) -> None:
    assert room.max_messages - room.local_limit >= room.max_messages // 2
    assert 1 <= room.user_limit <= room.local_limit
    assert 0 <= room.unrouted_limit <= room.max_messages


@given(rooms, st.integers(0, 10**7))
def test_unrouted_room_is_what_the_share_leaves(room: Room, held: int) -> None:
    left = unrouted_room(room, held)
    assert left >= 0 and (left == 0 or held + left == room.unrouted_limit)


# --- the outbox keeping it ------------------------------------------------------------


def local(ob: Outbox, name: str, uid: int) -> bool:
    msg = raw.RawMessage(name, uid, "", ("x@example.com",), b"Subject: s\n\nx\n")
    return raw.store(ob, alert(name, topic="sendmail/u"), msg, raw.RawPlan(("ops",)))


def reading(text: str) -> Routed:
    r = routed(text)
    return Routed(r.alert, ())


def test_one_user_cannot_take_local_mails_share_nor_local_mail_the_alerts_room(
    tmp_path: Path,
) -> None:
    # 50 messages: local mail 5 (10 %), one user 1 (25 % of that).
    ob = Outbox(tmp_path / "o.db", room=Room(50))
    assert local(ob, "a0", 1000)
    with pytest.raises(LocalRoomFull) as exc:
        local(ob, "a1", 1000)
    assert exc.value.reason == LOCAL_USER_SHARE_FULL
    assert "uid 1000" in str(exc.value) and "outbox.local_user_percent" in str(exc.value)
    for uid in (1001, 1002, 1003, 1004):  # other users still have room
        assert local(ob, f"u{uid}", uid)
    with pytest.raises(LocalRoomFull) as exc:
        local(ob, "u1005", 1005)
    assert exc.value.reason == LOCAL_SHARE_FULL
    assert isinstance(exc.value, OutboxFull)
    # Every place local mail does not hold is the alerts'.
    ob.add([routed(f"alert {i}") for i in range(45)])
    with pytest.raises(OutboxFull):
        ob.add([routed("one too many")])
    assert ob.conn.execute("SELECT count(*) FROM raw_message").fetchone()[0] == 5
    # A file stored before is recognised even with the share full (it can leave the drop).
    assert local(ob, "a0", 1000) is False


def test_unrouted_readings_never_take_the_alerts_room_and_over_their_share_are_not_kept(
    tmp_path: Path,
) -> None:
    ob = Outbox(tmp_path / "o.db", room=Room(20))  # readings: 2 kept at most
    for i in range(25):
        ob.add([reading(f"info {i}")])
    assert ob.unrouted == 2 and ob.live == 0
    assert len(ob.not_kept) == 1  # the last one
    ob.add([routed(f"critical {i}") for i in range(20)])  # the whole bound, for alerts
    with pytest.raises(OutboxFull):
        ob.add([routed("one too many")])
    ob.add([reading("still acknowledged")])  # never refused: at most not kept
    assert ob.unrouted == 2
    states = dict(ob.conn.execute("SELECT state, count(*) FROM delivery GROUP BY state").fetchall())
    assert states == {"queued": 20, "unrouted": 2}
    reopened = Outbox(tmp_path / "o.db", room=Room(20))  # counted again the same way
    assert (reopened.live, reopened.unrouted) == (20, 2)


def test_unrouted_readings_expire_and_make_room_for_new_ones(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db", room=Room(100, unrouted_percent=10, keep_unrouted=60))
    t0 = 1_000_000.0
    ob.add([reading(f"old {i}") for i in range(10)], now=t0)
    ob.add([reading("over")], now=t0 + 30)
    assert ob.not_kept and ob.unrouted == 10  # none expired yet
    ob.add([reading(f"new {i}") for i in range(4)], now=t0 + 61)  # the old ones expired
    assert not ob.not_kept and ob.unrouted == 4
    kept = {m for (m,) in ob.conn.execute("SELECT message FROM alert_0")}
    assert {"new 0", "new 3"} <= kept
    # The housekeeping prune removes what is past the retention without waiting for the
    # share to fill (readings stored "now - 2 minutes" are past 60 s).
    import time

    ob.add([reading("stale")], now=time.time() - 120)
    assert ob.prune(time.time() - 3600) >= 5
    assert ob.unrouted == 0
    assert ob.conn.execute("SELECT count(*) FROM delivery").fetchone()[0] == 0


def test_watching_without_keeping(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db", room=Room(100, unrouted_percent=0))
    r = reading("seen by the watchers only")
    ob.add([r])
    assert ob.not_kept == [r.alert.id] and ob.unrouted == 0
    assert ob.conn.execute("SELECT count(*) FROM delivery").fetchone()[0] == 0


# --- config and status ------------------------------------------------------------------

ROUTE = '[[route]]\nname = "ops"\nmatch = "#"\nto = ["ops@example.com"]\n'


def test_the_shares_come_from_the_outbox_section() -> None:
    cfg = parse(
        ROUTE + "[outbox]\nmax_messages = 1000\nlocal_percent = 20\nlocal_user_percent = 50\n"
        'unrouted_percent = 0\nkeep_unrouted = "2h"\n'
    )
    room = room_of(cfg.outbox)
    assert (room.local_limit, room.user_limit, room.unrouted_limit) == (200, 100, 0)
    assert room.keep_unrouted == 7200
    defaults = room_of(parse(ROUTE).outbox)
    assert (defaults.local_limit, defaults.user_limit) == (10_000, 2_500)
    assert (defaults.unrouted_limit, defaults.keep_unrouted) == (10_000, 86400)


@pytest.mark.parametrize(
    "line",
    [
        "local_percent = 0",  # local mail could never be stored
        "local_percent = 51",  # alerts would keep less than half
        "local_user_percent = 101",
        "unrouted_percent = -1",
        'keep_unrouted = "0s"',
        'keep_unrouted = "soon"',
    ],
)
def test_check_config_refuses_shares_the_daemon_cannot_keep(line: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse(ROUTE + f"[outbox]\n{line}\n")
    assert f"outbox.{line.split(' ')[0]}" in str(exc.value)


def test_status_shows_the_room_per_kind(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db", room=Room(50))
    local(ob, "m1", 1000)
    ob.add([routed("alert"), reading("reading")])
    ob.close()
    room = Room(50)
    r = status.report(tmp_path / "o.db", tmp_path / "none.json", room=room)
    assert r["room"] == {
        "max_messages": 50,
        "free": 48,
        "alerts": {"used": 1, "limit": 49},
        "local": {"used": 1, "limit": 5, "per_user_limit": 1},
        "unrouted": {"used": 1, "limit": 5, "keep_s": 86400.0},
    }
    text = status.render(r)
    assert (
        "room       48 of 50 free, alerts use 1\n"
        "           local mail 1 of 5 (1 per user)\n"
        "           unrouted readings 1 of 5, kept for 24h00m" in text
    )
    assert Held(1, 1, 1).counted == 2


def test_readings_not_kept_are_said_once_not_at_every_batch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ob = Outbox(tmp_path / "o.db", room=Room(40, unrouted_percent=10, keep_unrouted=60))
    t0 = 1_000_000.0
    with caplog.at_level("INFO", logger="gateway.outbox.store"):
        for cycle in range(5):  # full, expired, full again: a steady overload
            at = t0 + cycle * 61
            for i in range(8):
                ob.add([reading(f"r {cycle} {i}")], now=at)
                ob.add([routed(f"alert {cycle} {i}")], now=at)
    said = [r.getMessage() for r in caplog.records]
    assert sum("keeps no more unrouted readings" in m for m in said) == 1, said
    assert sum("keeps unrouted readings again" in m for m in said) <= 1, said


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.just(("alert", 0)),
            st.just(("reading", 0)),
            st.tuples(st.just("local"), st.integers(1, 4)),
            st.just(("send", 0)),
            st.just(("expire", 0)),
        ),
        max_size=60,
    )
)
def test_the_running_counts_match_the_rows_and_every_share_holds(
    ops: list[tuple[str, int]],
) -> None:
    import tempfile

    from gateway.outbox import Outcome, State
    from gateway.outbox.held import held, local_held

    room = Room(20, local_percent=20, local_user_percent=50, unrouted_percent=20, keep_unrouted=5)
    with tempfile.TemporaryDirectory() as tmp:
        ob = Outbox(Path(tmp) / "o.db", room=room)
        now = 1_000_000.0
        for i, (op, uid) in enumerate(ops):
            with contextlib.suppress(OutboxFull):
                if op == "alert":
                    ob.add([routed(f"a{i}")], now=now)
                elif op == "reading":
                    ob.add([reading(f"r{i}")], now=now)
                elif op == "local":
                    local(ob, f"m{i}", uid)
                elif op == "send":
                    for c in ob.claim(1, now=1e12):
                        ob.finish([Outcome(c.key, State.SENT)])
                else:
                    now += 6  # every reading kept so far is past keep_unrouted
            counted = held(ob.conn)
            assert (ob.live, ob.unrouted) == (counted.counted, counted.unrouted)
            assert counted.counted <= room.max_messages
            assert counted.local <= room.local_limit
            assert counted.unrouted <= room.unrouted_limit
            for u in range(1, 5):
                assert local_held(ob.conn, u)[1] <= room.user_limit
        ob.close()


# --- dead and unrouted local mail: counted while kept, gone after outbox.max_age -----------


def unrouted_local(ob: Outbox, name: str, uid: int) -> bool:
    msg = raw.RawMessage(name, uid, "", (), b"To: nobody-known\nSubject: s\n\nx\n")
    return raw.store(ob, alert(name, topic="sendmail/u"), msg, raw.RawPlan())


def age(ob: Outbox, seconds: float) -> None:
    with ob.transaction() as c:
        c.execute("UPDATE delivery SET updated_at = updated_at - ?", (seconds,))


def test_a_users_unrouted_and_refused_mail_frees_their_share_after_max_age(
    tmp_path: Path,
) -> None:
    from gateway.outbox import Outcome, State

    # 40 messages: local mail 8 (20 %), one user 2 of them (25 %).
    ob = Outbox(tmp_path / "o.db", room=Room(40, local_percent=20, max_age=3600))
    assert unrouted_local(ob, "cron 1", 0)  # root's cron mail: no alias, no default route
    assert local(ob, "refused", 0)
    (c,) = ob.claim(5, now=1e12)
    ob.finish([Outcome(c.key, State.DEAD, error="550 5.1.1 no such user")])
    with pytest.raises(LocalRoomFull) as exc:
        unrouted_local(ob, "cron 2", 0)
    assert exc.value.reason == LOCAL_USER_SHARE_FULL  # counted while kept
    assert ob.prune(0.0) == 0  # younger than max_age: kept, shown in `queue list`
    age(ob, 3601)
    assert ob.prune(0.0) == 2
    assert ob.live == 0
    assert ob.conn.execute("SELECT count(*) FROM raw_message").fetchone()[0] == 0
    assert unrouted_local(ob, "cron 2", 0) and local(ob, "fine", 0)  # the share is free
    ob.close()


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.sampled_from(["routed", "unrouted"]), st.integers(1, 3)),
            st.just(("refuse", 0)),
            st.just(("send", 0)),
            st.just(("age", 0)),
            st.just(("alert", 0)),
        ),
        max_size=50,
    )
)
def test_local_mails_counts_match_its_rows_as_mail_is_refused_and_expires(
    ops: list[tuple[str, int]],
) -> None:
    import tempfile

    from gateway.outbox import Outcome, State
    from gateway.outbox.held import held, local_held

    room = Room(40, local_percent=25, local_user_percent=50, max_age=100)
    with tempfile.TemporaryDirectory() as tmp:
        ob = Outbox(Path(tmp) / "o.db", room=room)
        for i, (op, uid) in enumerate(ops):
            with contextlib.suppress(OutboxFull):
                if op == "routed":
                    local(ob, f"m{i}", uid)
                elif op == "unrouted":
                    unrouted_local(ob, f"m{i}", uid)
                elif op == "alert":
                    ob.add([routed(f"a{i}")])
                elif op in ("refuse", "send"):
                    for c in ob.claim(1, now=1e12):
                        state = State.DEAD if op == "refuse" else State.SENT
                        ob.finish([Outcome(c.key, state)])
                else:
                    age(ob, 60)
                    ob.prune(0.0)
            rows = ob.conn.execute(
                "SELECT r.uid, d.state, d.updated_at FROM raw_message r"
                " JOIN delivery d ON d.alert_seq = r.alert_seq"
            ).fetchall()
            kept = [(u, s) for u, s, _ in rows if s != "sent"]
            for u in range(1, 4):
                assert local_held(ob.conn, u) == (len(kept), sum(k == u for k, _ in kept))
                assert local_held(ob.conn, u)[1] <= room.user_limit
            assert len(kept) <= room.local_limit
            assert ob.live == held(ob.conn).counted
            if op == "age":  # nothing dead or unrouted is left past max_age
                import time

                cutoff = time.time() - room.max_age
                assert not [s for _, s, t in rows if s in ("dead", "unrouted") and t < cutoff]
            orphans = ob.conn.execute(
                "SELECT count(*) FROM raw_message r WHERE NOT EXISTS"
                " (SELECT 1 FROM delivery d WHERE d.alert_seq = r.alert_seq)"
            ).fetchone()[0]
            assert orphans == 0
        ob.close()
