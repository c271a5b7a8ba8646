"""The gateway's own troubles as conditions, sans-IO: raise, resolve, and rate-limit.

Each condition (a serial port gone, the broker unreachable, the outbox nearly full, ...)
is fed whether it holds now, with the monotonic time. It is *raised* once it has held
for its `raise_after`, and *resolved* once it has been clear for `clear_after`: a link
that blinks for a second says nothing. A condition raised at most once per
`min_interval`: a flapping link gives a raise and a resolve per interval, and the next
raise says how often it flapped meanwhile, instead of a mail per flap.

A flap is a condition that begins to hold after it was seen clear: the state found at
the very first check (a broker or a port not yet connected while the daemon starts) is
where the gateway begins, not a link that came and went. How long a condition lasted
is counted from when it began to hold to when it was seen clear, not from the raise
(which comes `raise_after` later) nor to the resolve (`clear_after` later).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class Bounds:
    raise_after: float
    clear_after: float
    min_interval: float


@dataclass(slots=True)
class Condition:
    """One condition's state. `raised` and `raised_wall` are persisted in the outbox."""

    raised: bool = False
    raised_wall: float = 0.0  # when the raised condition began to hold (wall)
    active_since: float | None = None  # monotonic
    clear_since: float | None = None  # monotonic
    last_raise: float | None = None  # monotonic, for min_interval
    flaps: int = 0  # times it began to hold since the last raise
    detail: str = ""
    checked: bool = False  # updated at least once since the start
    active_wall: float = 0.0  # wall time at active_since
    clear_wall: float = 0.0  # wall time at clear_since


@dataclass(frozen=True, slots=True)
class Change:
    kind: Literal["raised", "resolved"]
    name: str
    detail: str
    flaps: int = 0  # raised: how often it held and cleared since it was last raised
    lasted: float = 0.0  # resolved: seconds from when it began to hold until it cleared


class SelfWatch:
    def __init__(self) -> None:
        self.conditions: dict[str, Condition] = {}

    def restore(self, name: str, raised: bool, raised_wall: float) -> None:
        """A condition as persisted: a raised one stays raised (no second mail) until it
        is seen clear, then resolves."""
        self.conditions[name] = Condition(raised=raised, raised_wall=raised_wall)

    def snapshot(self, name: str) -> Condition:
        return copy.copy(self.conditions.get(name) or Condition())

    def put_back(self, name: str, state: Condition) -> None:
        """Undo an update whose alert could not be stored: it is tried again."""
        self.conditions[name] = state

    def update(
        self, name: str, holds: bool, now: float, wall: float, bounds: Bounds, detail: str = ""
    ) -> Change | None:
        c = self.conditions.setdefault(name, Condition())
        first, c.checked = not c.checked, True
        if holds:
            c.detail = detail or c.detail
            c.clear_since = None
            if c.active_since is None:
                c.active_since, c.active_wall = now, wall
                if not c.raised and not first:
                    c.flaps += 1
            if c.raised or now - c.active_since < bounds.raise_after:
                return None
            if c.last_raise is not None and now - c.last_raise < bounds.min_interval:
                return None  # flapping: held back until the interval is over
            # This episode is the one raised, not a flap of its own.
            flaps = max(0, c.flaps - 1)
            c.raised, c.raised_wall, c.last_raise, c.flaps = True, c.active_wall, now, 0
            return Change("raised", name, c.detail, flaps=flaps)
        c.active_since = None
        if not c.raised:
            return None
        if c.clear_since is None:
            c.clear_since, c.clear_wall = now, wall
        if now - c.clear_since < bounds.clear_after:
            return None
        c.raised, c.clear_since = False, None
        # Said as it is now ("connected", "holds 3 of 20"), not as it was while it held.
        now_detail = detail or c.detail
        lasted = max(0.0, c.clear_wall - c.raised_wall)
        return Change("resolved", name, now_detail, lasted=lasted)
