"""The heartbeat, sans-IO: when a summary of the device is due, and what it says.

A device that mails only when something is wrong is indistinguishable, from the inbox,
from one that died. The heartbeat says every `every` (a day, by default in the docs'
example) what the gateway did: alerts taken and mailed by route, how long the uplink was
down, how long the gateway itself was down, the queue, uptime and version.

Schedule on the wall clock (a daily summary is a calendar matter) with a guard: a clock
that went back (no RTC, NTP not yet synced) restarts the period instead of stalling it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gateway.silence import human


@dataclass(slots=True)
class Beat:
    """Persisted in the outbox (`watch` row `heartbeat`), with the alert that resets it."""

    last: float  # wall time of the last heartbeat (or of the first start)
    offline: float = 0.0  # seconds the uplink was down since
    down: float = 0.0  # seconds the gateway itself was down since


def is_due(beat: Beat, now_wall: float, every: float) -> bool:
    if beat.last > now_wall:
        beat.last = now_wall  # the clock went back: count the period from now
        return False
    return now_wall - beat.last >= every


def _by_route(counts: Mapping[str, int]) -> str:
    total = sum(counts.values())
    parts = ", ".join(f"{route or 'unrouted'} {n}" for route, n in sorted(counts.items()))
    return f"{total} ({parts})" if parts else "0"


def summary(
    beat: Beat,
    activity: Mapping[str, Mapping[str, int]],
    uptime: float,
    version: str,
    now_wall: float,
) -> tuple[str, dict[str, str | int]]:
    """(the alert's one-line message, its fields for the mail's listing)."""
    queue = activity.get("queue", {})
    waiting = queue.get("queued", 0) + queue.get("sending", 0)
    message = (
        f"heartbeat over {human(now_wall - beat.last)}: "
        f"taken {_by_route(activity.get('taken', {}))}, "
        f"mailed {_by_route(activity.get('mailed', {}))}; "
        f"uplink down {human(beat.offline)}, gateway down {human(beat.down)}; "
        f"queue {waiting} waiting, {queue.get('dead', 0)} dead; "
        f"up {human(uptime)}; mailgw {version}"
    )
    fields: dict[str, str | int] = {
        "heartbeat_period_s": round(now_wall - beat.last),
        "uplink_down_s": round(beat.offline),
        "gateway_down_s": round(beat.down),
        "uptime_s": round(uptime),
        "version": version,
    }
    for kind in ("taken", "mailed"):
        for route, n in activity.get(kind, {}).items():
            fields[f"{kind}_{route or 'unrouted'}"] = n
    for state, n in queue.items():
        fields[f"queue_{state}"] = n
    return message, fields
