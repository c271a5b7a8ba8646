"""The outbox's values: what goes in (Routed), what comes out (Claimed), what the relay
says happened (Outcome), and the states a delivery moves through."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from gateway.alert import Alert
from gateway.receipts import Ask


class State(StrEnum):
    """A delivery's state (the `delivery.state` column; see gateway/outbox/__init__.py).

    "Deferred" is not a state: it is a queued delivery whose `due` is still ahead."""

    QUEUED = "queued"
    SENDING = "sending"
    SENT = "sent"
    DEAD = "dead"
    UNROUTED = "unrouted"
    SUPPRESSED = "suppressed"
    HELD = "held"  # set aside after crashing or stalling the daemon (outbox/queue.py)


STATES = tuple(s.value for s in State)
LIVE_STATES = tuple(s.value for s in State if s is not State.SENT)  # undelivered
MAX_PRIORITY = 9


@dataclass(frozen=True, slots=True)
class MqttKey:
    """What names an MQTT QoS 1 delivery to the gateway, for recognising its redelivery.

    mid: the broker's packet id. digest: blake2b of (client id, QoS, topic, payload).
    dup: the PUBLISH had its DUP flag (the broker sends it again). conn: a random token
    of the connection it came on (a new one per CONNACK).
    """

    mid: int
    digest: bytes
    dup: bool
    conn: int

    @property
    def name(self) -> str:
        """Its entry in Outbox.add's duplicates when recognised as a redelivery."""
        return f"mqtt:{self.mid}:{self.digest.hex()}"


@dataclass(frozen=True, slots=True)
class Routed:
    """An alert with the deliveries the router chose for it (route, priority)."""

    alert: Alert
    deliveries: tuple[tuple[str, int], ...]
    seen_key: str | None = None
    # route → the alert's dedupe key there (gateway/ingest.py), for routes that dedupe
    storm_keys: tuple[tuple[str, str], ...] = ()
    mqtt: MqttKey | None = None
    # (kind, key, state): rows of the `watch` table written in the alert's transaction
    # (gateway/outbox/watch_state.py), so a silence alert and "it fired" land together.
    marks: tuple[tuple[str, str, str], ...] = ()
    # The publisher asked for a receipt (gateway/receipts.py): stored with the alert.
    receipt: Ask | None = None


@dataclass(frozen=True, slots=True)
class Claimed:
    alert: Alert
    route: str
    attempts: int
    seq: int
    rcpts: tuple[str, ...] | None = None  # None: all of the route's recipients
    kind: str = "mail"  # or "digest"
    members: tuple[Alert, ...] = ()  # mail: its counted repeats; digest: its other alerts

    @property
    def key(self) -> tuple[int, str]:
        return (self.seq, self.route)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one claimed delivery; applied in one transaction."""

    key: tuple[int, str]
    state: State  # SENT | QUEUED | DEAD
    due: float = 0.0
    error: str | None = None
    count_attempt: bool = True
    rcpts: tuple[str, ...] | None = None  # queued: only these recipients are left
    # queued: it was in flight when the relay failed unexpectedly; counted as a crash
    # (gateway/outbox/queue.py, HOLD_AFTER) instead of clearing the count
    crashed: bool = False
