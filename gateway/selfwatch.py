"""The gateway's own troubles as conditions, sans-IO: raise, resolve, and rate-limit.

Each condition (a serial port gone, the broker unreachable, the outbox nearly full, ...)
is fed whether it holds now, with the monotonic time. It is *raised* once it has held
for its `raise_after`, and *resolved* once it has been clear for `clear_after`: a link
that blinks for a second says nothing. A condition raised at most once per
`min_interval`: a flapping link gives a raise and a resolve per interval, and the next
raise says how often it flapped meanwhile, instead of a mail per flap.
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
    raised_wall: float = 0.0  # when it was raised (wall: the resolve mail says how long)
    active_since: float | None = None  # monotonic
    clear_since: float | None = None  # monotonic
    last_raise: float | None = None  # monotonic, for min_interval
    flaps: int = 0  # times it began to hold since the last raise
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Change:
    kind: Literal["raised", "resolved"]
    name: str
    detail: str
    flaps: int = 0  # raised: how often it held and cleared since it was last raised
    lasted: float = 0.0  # resolved: seconds since it was raised (wall)


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
        if holds:
            c.detail = detail or c.detail
            c.clear_since = None
            if c.active_since is None:
                c.active_since = now
                if not c.raised:
                    c.flaps += 1
            if c.raised or now - c.active_since < bounds.raise_after:
                return None
            if c.last_raise is not None and now - c.last_raise < bounds.min_interval:
                return None  # flapping: held back until the interval is over
            flaps = c.flaps - 1
            c.raised, c.raised_wall, c.last_raise, c.flaps = True, wall, now, 0
            return Change("raised", name, c.detail, flaps=flaps)
        c.active_since = None
        if not c.raised:
            return None
        if c.clear_since is None:
            c.clear_since = now
        if now - c.clear_since < bounds.clear_after:
            return None
        c.raised, c.clear_since = False, None
        # Said as it is now ("connected", "holds 3 of 20"), not as it was while it held.
        now_detail = detail or c.detail
        return Change("resolved", name, now_detail, lasted=max(0.0, wall - c.raised_wall))
