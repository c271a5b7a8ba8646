"""The MQTT ack window, sans-IO: what the gateway holds, and when each PUBACK goes out.

Events in: a message taken, the outcome of storing it (stored, refused), the end of a
group commit (flush), PUBACKs written, connected / disconnected, a confirmation
published, a PUBACK for a publish of ours, a tick. Actions out: acks to send
(`Acks`), messages to store again (`Tick.store_again`), a confirmation to publish
(`ConfirmDue`), mqtt_pending rows to delete (`Settle`). No paho, no thread, no clock:
the source (`sources/mqtt.py`) calls it holding one lock, and carries out what it
returns. Like `firmware_bridge/codec.py` it is tested by feeding it values.

The rules it keeps:

- Ack after commit (invariant 1). A message is acked only once its commit succeeded;
  a refused one (outbox full, disk full, locked file) stays held, unacknowledged, and
  is stored again at every tick until it fits. It keeps one of the broker's in-flight
  slots meanwhile, so intake pauses by itself; dropping it instead would leave that slot
  taken until the next reconnect.
- A packet id does not name a message: the broker redelivers what we held under the
  same ids after a reconnect, and reuses an id once it has its PUBACK. So a commit's
  outcome applies only to the very entry (`Held`, compared by identity) it was made
  for; an outcome for an entry no longer held is ignored. Each entry is acked at most
  once.
- A connection's acks stay on it. Connecting clears what was held (the broker sends it
  again), and an entry taken on an older connection is never acked on a newer one: that
  PUBACK could free an id the broker then reuses for a message not yet committed. Acks
  due while disconnected are dropped (the broker redelivers those messages, and queued
  PUBACKs could reach the next connection ahead of its CONNECT).
- Bounded read-ahead. `may_read` says no once `max_inflight` messages or
  `max_bytes` payload bytes are held: the socket is then not read and TCP pushes back
  on the broker, whatever its own window (Mosquitto 2.0.11, Debian 12, sends a resumed
  session's whole backlog at once). Between connections it says yes: the next CONNACK
  must get through.

Confirming PUBACKs (invariant 11). A PUBACK can be lost after the commit (the process
dies before writing it, or it dies in a socket buffer). The broker then sends the
message again with the same packet id and DUP, and it would be stored, and mailed,
twice. So the commit also records (packet id, digest, connection) in `mqtt_pending`,
and a DUP message matching its row is acknowledged without being stored again
(`Outbox.add`). The row must go as soon as the broker has the PUBACK: from then on the
id may be reused, possibly for identical content (sensors repeat themselves), and a
crash before that message's commit would bring it back with DUP, matching the row: a
loss. MQTT gives no receipt for a PUBACK, but a broker handles a connection's packets
in order: once it answers a QoS 1 publish of ours sent after some PUBACKs, it has had
them. So while acks are unconfirmed, each tick asks for an empty publish to
`mailgw/<device_id>/confirm` (`ConfirmDue`); its PUBACK, on the same connection,
settles their rows. A lost connection drops the unconfirmed keys and the confirmation
in flight. A resumed session's first confirmation also deletes every row that did not
come again on it (`Settle.keep_conn`): the broker redelivers what it held right after
CONNACK, before reading on, so those rows name PUBACKs it had. A new session (the
broker holds nothing for us) clears them all at once.

What remains, and QoS 1 cannot close: the broker could reuse a packet id in the second
before the confirmation returns, for an identical message, and the gateway die before
committing that one. Mosquitto numbers its packets to a client in sequence (an id comes
back after 65,535 others), far beyond what arrives in a second.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

# A message's payload is at most mqtt.max_payload (64 KiB allowed); alerts are small.
MAX_HELD_BYTES = 4 * 1024 * 1024
# Recent PUBACKs for publishes of ours, by (packet id, connection): a confirmation's
# PUBACK can arrive before its publish() has returned its id to the caller. Other
# publishes (status, probe, report) come in between, a handful a second.
PUBACKS_REMEMBERED = 64

PendingKey = tuple[int, bytes, int]  # a row of mqtt_pending: packet id, digest, connection


@dataclass(eq=False, slots=True)
class Held(Generic[T]):
    """A message taken and not yet acked. Compared by identity: one delivery."""

    mid: int
    qos: int
    size: int  # payload bytes
    conn: int  # the connection it came on
    key: PendingKey | None  # its mqtt_pending row (QoS 1), if the commit records one
    item: T  # what the caller stores (opaque here)


@dataclass(frozen=True, slots=True)
class Acks(Generic[T]):
    """PUBACKs to write now, on connection `conn`; then report them with `acks_written`."""

    conn: int
    entries: list[Held[T]]

    @property
    def packets(self) -> list[tuple[int, int]]:
        """(packet id, QoS) of each, for paho."""
        return [(e.mid, e.qos) for e in self.entries]

    @property
    def keys(self) -> list[PendingKey]:
        return [e.key for e in self.entries if e.key is not None]


@dataclass(frozen=True, slots=True)
class ConfirmDue:
    """Publish an empty QoS 1 message on the confirm topic; report it with
    `confirm_published`. Its PUBACK proves the broker has had the PUBACKs of `keys`
    and (`sweep`) has redelivered what it held at connect."""

    conn: int
    keys: list[PendingKey]
    sweep: bool


@dataclass(frozen=True, slots=True)
class Settle:
    """Delete these mqtt_pending rows, and with `keep_conn` every row of another
    connection (Outbox.mqtt_settled)."""

    keys: list[PendingKey]
    keep_conn: int | None


@dataclass(frozen=True, slots=True)
class Tick(Generic[T]):
    """What to do about once a second: store these again (in arrival order), and
    publish a confirmation if one is due."""

    store_again: list[Held[T]]
    confirm: ConfirmDue | None


@dataclass(frozen=True, slots=True)
class _Confirm:
    mid: int
    conn: int
    keys: list[PendingKey]
    sweep: bool


class Window(Generic[T]):
    """One MQTT session's ack window. Not thread-safe: the caller holds a lock around
    every call except `may_read`, `holding` and `connected` (single reads, for paho's
    loop and the status checks; a stale answer costs one poll)."""

    def __init__(self, max_inflight: int, max_bytes: int = MAX_HELD_BYTES) -> None:
        self.max_inflight = max_inflight
        self.max_bytes = max_bytes
        self._held: dict[int, Held[T]] = {}  # by packet id, in arrival order
        self._held_bytes = 0
        self._waiting: set[int] = set()  # ids of held entries the outbox refused
        self._acks: list[Held[T]] = []  # committed, not yet flushed
        self._connected = False
        self._conn = 0  # the current connection's token (the caller draws it)
        self._unconfirmed: list[PendingKey] = []  # acked on _conn, not yet confirmed
        self._confirm: _Confirm | None = None  # the confirmation in flight
        self._sweep_due = False  # this resumed session's first confirmation is due
        self._pubacks: collections.deque[tuple[int, int]] = collections.deque(
            maxlen=PUBACKS_REMEMBERED
        )

    # --- what the caller reads ----------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def conn(self) -> int:
        """The current connection's token: the mqtt_pending rows of its messages name it."""
        return self._conn

    @property
    def holding(self) -> int:
        """Messages taken and not yet acked (a full outbox keeps them here)."""
        return len(self._held)

    @property
    def held_bytes(self) -> int:
        return self._held_bytes

    def may_read(self) -> bool:
        """May paho read the next packet? (paho's thread, before every read)"""
        return not self._connected or (
            len(self._held) < self.max_inflight and self._held_bytes < self.max_bytes
        )

    # --- the connection -----------------------------------------------------------

    def on_connect(self, conn: int, resumed: bool) -> Settle | None:
        """A CONNACK accepted; `conn` is a fresh token, `resumed` the session-present flag."""
        self._held.clear()  # the broker sends it again
        self._held_bytes = 0
        self._waiting.clear()
        self._acks.clear()  # committed on the old connection: not to be acked on this one
        # PUBACKs written on the last connection are unconfirmed for good; their rows
        # stay until this connection's first confirmation (or until they come again).
        self._conn = conn
        self._connected = True
        self._unconfirmed.clear()
        self._confirm = None
        self._sweep_due = resumed
        if resumed:
            return None
        # A new session: the broker holds nothing in flight for us, so no row can match
        # a redelivery. The caller queues this ahead of anything the connection delivers.
        return Settle([], keep_conn=conn)

    def on_disconnect(self) -> None:
        self._connected = False

    # --- messages -----------------------------------------------------------------

    def take(self, mid: int, qos: int, size: int, key: PendingKey | None, item: T) -> Held[T]:
        """A message taken from the broker: held until its commit. Store the entry."""
        old = self._held.pop(mid, None)
        if old is not None:  # sent again while we still hold it: this one replaces it
            self._held_bytes -= old.size
            self._waiting.discard(mid)
        entry = Held(mid, qos, size, self._conn, key, item)
        self._held[mid] = entry
        self._held_bytes += size
        return entry

    def stored(self, entry: Held[T]) -> bool:
        """Its commit succeeded: the ack is due at the next flush. False if the entry
        is no longer held (a reconnect, or a newer delivery under its id)."""
        if self._held.get(entry.mid) is not entry:
            return False
        del self._held[entry.mid]
        self._held_bytes -= entry.size
        self._acks.append(entry)
        return True

    def refused(self, entry: Held[T]) -> bool:
        """Its commit failed: not acked; stored again at the next tick if still held."""
        if self._held.get(entry.mid) is not entry:
            return False
        self._waiting.add(entry.mid)
        return True

    def flush(self) -> Acks[T] | None:
        """After a group commit's callbacks: the acks to write now, in one go."""
        if not self._acks:
            return None
        due, self._acks = self._acks, []
        if not self._connected:
            return None
        return Acks(self._conn, due)

    def acks_written(self, acks: Acks[T]) -> None:
        """`acks` are queued on paho's one ordered packet queue: a confirmation published
        from now on goes out behind them. If a reconnect came in between they may never
        have been written, and are not ours to confirm."""
        if acks.conn == self._conn:
            self._unconfirmed.extend(acks.keys)

    # --- the clock's turn and the confirmation ------------------------------------

    def tick(self) -> Tick[T]:
        """About once a second: what to store again, and whether to confirm."""
        again: list[Held[T]] = []
        if self._waiting:
            again = [e for mid, e in self._held.items() if mid in self._waiting]
            self._waiting.clear()
        confirm = None
        if self._connected and self._confirm is None and (self._unconfirmed or self._sweep_due):
            confirm = ConfirmDue(self._conn, self._unconfirmed, self._sweep_due)
            self._unconfirmed = []
        return Tick(again, confirm)

    def confirm_published(self, due: ConfirmDue, mid: int | None) -> Settle | None:
        """The confirmation's publish returned packet id `mid` (None: not sent)."""
        if mid is None or due.conn != self._conn:
            # Not sent on that connection: a reconnect dropped these keys (the next
            # sweep clears their rows); otherwise they go with the next confirmation.
            if due.conn == self._conn:
                self._unconfirmed[:0] = due.keys
            return None
        self._confirm = _Confirm(mid, due.conn, due.keys, due.sweep)
        return self._settled()  # its PUBACK may have come already

    def puback(self, mid: int) -> Settle | None:
        """The broker acknowledged a publish of ours (any of them) on this connection."""
        self._pubacks.append((mid, self._conn))
        return self._settled()

    def _settled(self) -> Settle | None:
        c = self._confirm
        if c is None or c.conn != self._conn or (c.mid, c.conn) not in self._pubacks:
            return None
        self._confirm = None
        if c.sweep:
            self._sweep_due = False
        return Settle(c.keys, keep_conn=c.conn if c.sweep else None)
