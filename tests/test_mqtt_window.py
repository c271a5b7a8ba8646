"""The MQTT ack window without a broker: events in, actions out (gateway/sources/mqtt_window.py)."""

from __future__ import annotations

import collections

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gateway.sources.mqtt_window import Acks, ConfirmDue, Held, Settle, Window


def key(mid: int, conn: int) -> tuple[int, bytes, int]:
    return (mid, bytes([mid % 256]), conn)


def connected(window: Window[str], conn: int = 1, resumed: bool = True) -> Window[str]:
    window.on_connect(conn, resumed)
    return window


def take(w: Window[str], mid: int, size: int = 10, qos: int = 1) -> Held[str]:
    return w.take(mid, qos, size, key(mid, w.conn) if qos == 1 else None, f"m{mid}")


def sent(acks: Acks[str] | None) -> tuple[int, list[tuple[int, int]], list[tuple[int, bytes, int]]]:
    """What the adapter writes: the connection, (packet id, QoS) pairs, their rows."""
    assert acks is not None
    return acks.conn, acks.packets, acks.keys


def test_acked_only_after_the_commit_and_then_once() -> None:
    w = connected(Window(10))
    e = take(w, 5)
    assert w.flush() is None  # taken, not committed: nothing to ack
    assert w.stored(e)
    assert sent(w.flush()) == (1, [(5, 1)], [key(5, 1)])
    assert w.flush() is None  # once
    assert not w.stored(e)  # a second outcome for the same delivery acks nothing
    assert w.flush() is None and w.holding == 0 and w.held_bytes == 0


def test_a_refused_message_stays_held_and_is_stored_again_at_the_tick() -> None:
    w = connected(Window(10))
    a, b, c = take(w, 1), take(w, 2), take(w, 3)
    assert w.refused(c) and w.refused(a)
    assert w.flush() is None  # a failure never acks
    assert w.holding == 3
    assert w.tick().store_again == [a, c]  # in arrival order
    assert w.tick().store_again == []  # asked once per refusal
    assert w.stored(a) and w.stored(b)
    assert sent(w.flush()) == (1, [(1, 1), (2, 1)], [key(1, 1), key(2, 1)])
    assert w.holding == 1


def test_a_commit_acks_only_the_very_entry_it_was_made_for() -> None:
    """The broker redelivers what we held under the same ids after a reconnect: the old
    connection's commit must not take the redelivered entry (neither copy would be acked,
    and the broker's window would fill with messages it never hears about again)."""
    w = connected(Window(10))
    old = take(w, 7)
    w.on_disconnect()
    w.on_connect(2, resumed=True)
    assert w.holding == 0  # the broker sends it again
    new = take(w, 7)
    assert not w.stored(old) and not w.refused(old)
    assert w.flush() is None
    assert w.stored(new)
    assert sent(w.flush()) == (2, [(7, 1)], [key(7, 2)])


def test_acks_committed_on_an_old_connection_are_not_sent_on_a_new_one() -> None:
    w = connected(Window(10))
    e = take(w, 3)
    assert w.stored(e)  # committed; the writer has not flushed yet
    w.on_disconnect()
    w.on_connect(2, resumed=True)
    assert w.flush() is None  # the broker redelivers it; its row recognises the copy


def test_acks_due_while_disconnected_are_dropped() -> None:
    w = connected(Window(10))
    e = take(w, 3)
    w.on_disconnect()
    assert w.stored(e)
    assert w.flush() is None
    w.on_connect(2, resumed=True)
    assert w.flush() is None


def test_qos_0_is_held_and_acked_without_a_row() -> None:
    w = connected(Window(10))
    e = take(w, 0, qos=0)
    assert w.stored(e)
    assert sent(w.flush()) == (1, [(0, 0)], [])


def test_the_read_ahead_bound_counts_messages_and_bytes() -> None:
    w = Window[str](3, max_bytes=100)
    assert w.may_read()
    w.on_connect(1, resumed=False)
    a, _ = take(w, 1), take(w, 2)
    assert w.may_read()
    take(w, 3)
    assert not w.may_read()  # max_inflight messages held
    w.stored(a)
    assert w.may_read()
    take(w, 4, size=80)
    assert w.held_bytes == 100 and not w.may_read()  # max_bytes held
    w.on_disconnect()
    assert w.may_read()  # between connections: the CONNACK must get through


def test_a_redelivery_of_a_held_message_replaces_it() -> None:
    w = connected(Window(10))
    first = take(w, 4, size=30)
    w.refused(first)
    second = take(w, 4, size=50)
    assert w.holding == 1 and w.held_bytes == 50
    assert w.tick().store_again == []  # the new entry is stored as it came, not twice
    assert not w.stored(first)
    assert w.stored(second) and w.held_bytes == 0


def test_connect_clears_what_is_held_and_a_new_session_clears_every_row() -> None:
    w = Window[str](10)
    assert w.on_connect(1, resumed=False) == Settle([], keep_conn=1)
    e = take(w, 1, size=20)
    w.refused(e)
    assert w.on_connect(2, resumed=True) is None
    assert w.holding == 0 and w.held_bytes == 0 and w.tick().store_again == []


def _acked(w: Window[str], *mids: int) -> Acks[str]:
    for mid in mids:
        assert w.stored(take(w, mid))
    acks = w.flush()
    assert acks is not None
    w.acks_written(acks)
    return acks


def test_the_confirmation_settles_the_rows_of_the_acks_written_before_it() -> None:
    w = connected(Window(10), conn=1, resumed=False)
    assert w.tick().confirm is None  # nothing unconfirmed
    _acked(w, 1, 2)
    due = w.tick().confirm
    assert due == ConfirmDue(1, [key(1, 1), key(2, 1)], sweep=False)
    assert w.tick().confirm is None  # one in flight at a time
    _acked(w, 3)
    assert w.confirm_published(due, mid=50) is None
    assert w.puback(49) is None  # another publish of ours
    assert w.puback(50) == Settle([key(1, 1), key(2, 1)], keep_conn=None)
    assert w.tick().confirm == ConfirmDue(1, [key(3, 1)], sweep=False)


def test_a_puback_before_the_publish_returned_still_settles() -> None:
    w = connected(Window(10), resumed=False)
    _acked(w, 1)
    due = w.tick().confirm
    assert due is not None
    assert w.puback(8) is None  # paho's thread was faster than publish() returning
    assert w.confirm_published(due, mid=8) == Settle([key(1, 1)], keep_conn=None)


def test_a_resumed_sessions_first_confirmation_sweeps_older_rows() -> None:
    w = connected(Window(10), conn=4, resumed=True)
    due = w.tick().confirm
    assert due == ConfirmDue(4, [], sweep=True)  # due even with nothing acked yet
    w.confirm_published(due, mid=1)
    assert w.puback(1) == Settle([], keep_conn=4)
    assert w.tick().confirm is None  # swept once


def test_a_confirmation_not_sent_is_retried_and_a_reconnect_drops_it() -> None:
    w = connected(Window(10), resumed=False)
    _acked(w, 1)
    due = w.tick().confirm
    assert due is not None
    assert w.confirm_published(due, mid=None) is None  # publish() failed
    again = w.tick().confirm
    assert again == due
    w.on_disconnect()
    assert w.tick().confirm is None  # not while disconnected
    w.on_connect(2, resumed=True)
    assert w.confirm_published(again, mid=3) is None
    assert w.puback(3) is None  # that connection's keys are gone; the sweep covers them
    assert w.tick().confirm == ConfirmDue(2, [], sweep=True)


def test_acks_written_after_a_reconnect_are_not_confirmed() -> None:
    w = connected(Window(10), resumed=False)
    assert w.stored(take(w, 1))
    acks = w.flush()
    assert acks is not None
    w.on_connect(2, resumed=False)  # between the flush and the write
    w.acks_written(acks)
    assert w.tick().confirm is None


def test_a_confirmation_in_flight_is_dropped_by_a_reconnect() -> None:
    w = connected(Window(10), conn=1, resumed=False)
    _acked(w, 1)
    due = w.tick().confirm
    assert due is not None
    w.confirm_published(due, mid=9)
    w.on_disconnect()
    w.on_connect(2, resumed=False)
    assert w.puback(9) is None  # same id, another connection: proves nothing


# --- every sequence of events ----------------------------------------------------


class Events(RuleBasedStateMachine):
    """Arbitrary events in any order, checked against what the window must keep."""

    WINDOW, MAX_BYTES, MAX_SIZE = 4, 200, 120

    def __init__(self) -> None:
        super().__init__()
        self.w: Window[int] = Window(self.WINDOW, self.MAX_BYTES)
        self.conns = iter(range(1, 10_000))
        self.pub_mids = iter(range(1, 10_000))
        self.taken: list[Held[int]] = []  # every delivery, in order
        self.committed: set[int] = set()  # deliveries (by their index) stored at least once
        self.acked: collections.Counter[int] = collections.Counter()  # index → PUBACKs
        self.written: set[tuple[int, tuple[int, bytes, int]]] = set()  # (conn, row key)
        self.confirms: list[tuple[ConfirmDue, int]] = []  # published, with its packet id

    @rule(mid=st.integers(1, 6), size=st.integers(0, MAX_SIZE), qos=st.sampled_from([0, 1]))
    def message(self, mid: int, size: int, qos: int) -> None:
        # paho reads the next packet only when the window allows it; between connections
        # no PUBLISH comes.
        if not (self.w.connected and self.w.may_read()):
            return
        n = len(self.taken)
        k = (mid, n.to_bytes(2, "big"), self.w.conn) if qos else None
        self.taken.append(self.w.take(mid, qos, size, k, n))

    @precondition(lambda self: self.taken)
    @rule(data=st.data(), ok=st.booleans())
    def commit(self, data: st.DataObject, ok: bool) -> None:
        e = data.draw(st.sampled_from(self.taken))  # current, replaced or of a past connection
        if ok:
            self.committed.add(e.item)
            self.w.stored(e)
        else:
            self.w.refused(e)

    @rule()
    def flush(self) -> None:
        acks = self.w.flush()
        if acks is None:
            return
        assert self.w.connected and acks.conn == self.w.conn
        for e in acks.entries:
            assert e.conn == acks.conn, "an old connection's entry acked on a new one"
            assert e.item in self.committed, "acked without a successful commit"
            self.acked[e.item] += 1
        self.w.acks_written(acks)
        self.written |= {(acks.conn, k) for k in acks.keys}

    @rule()
    def tick(self) -> None:
        t = self.w.tick()
        for e in t.store_again:
            assert e.conn == self.w.conn and e.item not in self.acked
        if t.confirm is not None:
            assert self.w.connected and t.confirm.conn == self.w.conn
            mid = next(self.pub_mids)
            self.confirms.append((t.confirm, mid))
            self._check(self.w.confirm_published(t.confirm, mid))

    @precondition(lambda self: self.confirms)
    @rule(data=st.data())
    def puback(self, data: st.DataObject) -> None:
        _, mid = data.draw(st.sampled_from(self.confirms))
        self._check(self.w.puback(mid))

    def _check(self, settle: Settle | None) -> None:
        if settle is None:
            return
        # Only rows whose PUBACKs were written on this connection, before the confirmation.
        for k in settle.keys:
            assert (self.w.conn, k) in self.written
        assert settle.keep_conn in (None, self.w.conn)

    @rule(resumed=st.booleans())
    def reconnect(self, resumed: bool) -> None:
        self.w.on_disconnect()
        settle = self.w.on_connect(next(self.conns), resumed)
        assert (settle is None) == resumed
        assert self.w.holding == 0 and self.w.held_bytes == 0

    @rule()
    def disconnect(self) -> None:
        self.w.on_disconnect()

    @invariant()
    def held_bytes_are_the_sum_of_held_sizes(self) -> None:
        # An entry is held until it is acked, replaced by a newer delivery of its id,
        # or dropped by a reconnect.
        latest: dict[int, Held[int]] = {}
        for e in self.taken:
            if e.conn == self.w.conn:
                latest[e.mid] = e
        held = [e for e in latest.values() if e.item not in self.committed]
        held = [e for e in held if self.acked[e.item] == 0]
        assert self.w.held_bytes == sum(e.size for e in held) >= 0
        assert self.w.holding == len(held)

    @invariant()
    def the_window_bound_holds(self) -> None:
        assert self.w.holding <= self.WINDOW
        assert self.w.held_bytes < self.MAX_BYTES + self.MAX_SIZE  # one past the bound

    @invariant()
    def each_delivery_is_acked_at_most_once(self) -> None:
        assert all(n == 1 for n in self.acked.values())


TestEvents = Events.TestCase
TestEvents.settings = settings(max_examples=300, stateful_step_count=50, deadline=None)
