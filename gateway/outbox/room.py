"""Room in the outbox by kind: what alerts keep, what local mail and unrouted readings get.

Alerts come first (DESIGN.md invariant 14). Three kinds of row hold room, and each
has its own bound:

- alerts (routed alerts from MQTT, serial, `mailgw send`, and the gateway's own
  self-alerts and silence alerts) may use all of `max_messages` that local mail does
  not hold;
- local mail (messages from `sendmail`, gateway/outbox/raw.py) may hold at most
  `local_percent` of `max_messages`, so alerts always keep the rest: a share, not a
  reserve, because a share also bounds what one local program can queue while the
  uplink is away, and one uid may hold at most `local_user_percent` of that share,
  so one user's loop cannot refuse every other user's mail;
- unrouted readings (matched no route: kept only for `mailgw queue list` and export,
  seen by silence watchers whether kept or not) are outside `max_messages`
  altogether, at most `unrouted_percent` of it, and only for `keep_unrouted`. A
  reading over that share is still acknowledged and still feeds the watchers; it is
  only not kept, and counted. Refusing it instead would stall the MQTT source (its
  in-flight window is shared with alerts) for the sake of a row nobody mails.

Pure values and functions: the outbox counts, this decides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.config import OutboxSection

LOCAL_SHARE_FULL = "local_share_full"
LOCAL_USER_SHARE_FULL = "local_user_share_full"
UNROUTED_SHARE_FULL = "unrouted_share_full"


@dataclass(frozen=True, slots=True)
class Room:
    """The bounds, from [outbox] (gateway/config/sections.py)."""

    max_messages: int = 100_000
    local_percent: int = 10
    local_user_percent: int = 25
    unrouted_percent: int = 10
    keep_unrouted: float = 86400.0
    max_age: float = 5 * 86400.0  # dead or unrouted local mail is kept this long

    @property
    def local_limit(self) -> int:
        """Live deliveries local mail may hold, all users together (at least one)."""
        return max(1, self.max_messages * self.local_percent // 100)

    @property
    def user_limit(self) -> int:
        """Live deliveries one uid's local mail may hold (at least one)."""
        return max(1, self.local_limit * self.local_user_percent // 100)

    @property
    def unrouted_limit(self) -> int:
        """Unrouted readings kept at once; 0 keeps none (watching without keeping)."""
        return self.max_messages * self.unrouted_percent // 100


@dataclass(frozen=True, slots=True)
class Held:
    """What the outbox holds now, by kind (live deliveries; unrouted readings)."""

    alerts: int = 0
    local: int = 0
    unrouted: int = 0

    @property
    def counted(self) -> int:
        """What counts against max_messages: alerts and local mail, not readings."""
        return self.alerts + self.local


def room_of(section: OutboxSection) -> Room:
    return Room(
        section.max_messages,
        section.local_percent,
        section.local_user_percent,
        section.unrouted_percent,
        section.keep_unrouted,
        section.max_age,
    )


def local_refusal(room: Room, local: int, user: int, adding: int) -> str | None:
    """Why `adding` deliveries of one uid's local mail may not be stored, or None.

    `local`: live local deliveries held by all users; `user`: by this uid. The bound
    on the whole outbox is checked apart (a full outbox refuses every kind).
    """
    if local + adding > room.local_limit:
        return LOCAL_SHARE_FULL
    if user + adding > room.user_limit:
        return LOCAL_USER_SHARE_FULL
    return None


def unrouted_room(room: Room, unrouted: int) -> int:
    """How many more unrouted readings may be kept now."""
    return max(0, room.unrouted_limit - unrouted)


def report(room: Room, held: Held) -> dict[str, Any]:
    """The room per kind, as `mailgw status --json` shows it under "room"."""
    return {
        "max_messages": room.max_messages,
        "free": max(0, room.max_messages - held.counted),
        "alerts": {"used": held.alerts, "limit": room.max_messages - held.local},
        "local": {
            "used": held.local,
            "limit": room.local_limit,
            "per_user_limit": room.user_limit,
        },
        "unrouted": {
            "used": held.unrouted,
            "limit": room.unrouted_limit,
            "keep_s": room.keep_unrouted,
        },
    }
