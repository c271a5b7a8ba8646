"""The dead man's switch, sans-IO: which sources have gone quiet, and which speak again.

A source is a (topic, sensor) that has reported at least once and matches a silence
rule (`[[silence]]`); the first rule that matches wins. `observe` says a source spoke,
`due` says which went quiet for longer than their rule's `expect_every`. Each silence
fires exactly once; the next observation of that source gives exactly one "again".

Scheduling runs on the monotonic clock (a wall-clock jump after NTP must neither fire
nor hide a silence); the wall clock only writes the mail. After a restart the daemon
`restore`s each source with the time it was itself down: a source gets a fresh window
from the start (what was said while nobody listened cannot be known), and the mail says
how much of the quiet time the gateway itself was down.

A source is heard through a path (`via`: mqtt, serial, local). While the path itself
is down (the MQTT broker unreachable), the sources behind it cannot be heard whatever
they do: their silence is the path's, said once by the self-alert on that path, not a
mail per sensor and another when the path returns. So a paused path's sources do not
fire, and when it returns each one gets a fresh `expect_every` from the return: a
sensor still quiet then is reported one window after the path came back.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from gateway.config import SilenceSection
from gateway.routing import topic_matches

# A sensor that invents topics (or a hostile publisher) must not grow this without end.
MAX_SOURCES = 4096


@dataclass(slots=True)
class Source:
    """What the watcher knows of one source: persisted in the outbox (`watch` table)."""

    rule: str
    last_wall: float  # when it last spoke, by the wall clock (for the mail)
    last_mono: float  # the same instant on this boot's monotonic clock, or our start
    fired: bool = False
    down: float = 0.0  # seconds the gateway itself was down since last_wall
    via: str = ""  # the path it was last heard through (mqtt, serial, local)


@dataclass(frozen=True, slots=True)
class Event:
    kind: Literal["silent", "again"]
    key: str  # topic|sensor
    rule: SilenceSection
    last_wall: float  # when the source last spoke (before this event)
    quiet_for: float  # seconds without data up to now
    down_for: float  # of which the gateway itself was down


def source_key(topic: str, sensor: str) -> str:
    return f"{topic}|{sensor}"


def split_key(key: str) -> tuple[str, str]:
    topic, _, sensor = key.rpartition("|")
    return topic, sensor


def rule_for(rules: Sequence[SilenceSection], topic: str, sensor: str) -> SilenceSection | None:
    """The first rule that watches this (topic, sensor), or None."""
    for rule in rules:
        if topic_matches(rule.match, topic) and rule.sensor in (None, sensor):
            return rule
    return None


class Watcher:
    def __init__(self, rules: Sequence[SilenceSection]) -> None:
        self.rules = tuple(rules)
        self.by_name = {r.name: r for r in self.rules}
        self.sources: dict[str, Source] = {}
        self.dropped = 0  # observations of new sources refused past MAX_SOURCES
        self.paused: frozenset[str] = frozenset()  # paths that cannot be heard now

    def restore(self, key: str, src: Source, down_for: float, now_mono: float) -> bool:
        """A source as persisted before the gateway stopped; its window restarts now.
        False if no rule watches it any more (the caller forgets it)."""
        if src.rule not in self.by_name:
            return False
        src.last_mono = now_mono
        src.down += max(0.0, down_for)
        self.sources[key] = src
        return True

    def observe(
        self, topic: str, sensor: str, now_wall: float, now_mono: float, via: str = ""
    ) -> list[Event]:
        """The source spoke; an "again" event if it had been declared silent."""
        key = source_key(topic, sensor)
        src = self.sources.get(key)
        if src is None:
            rule = rule_for(self.rules, topic, sensor)
            if rule is None:
                return []
            if len(self.sources) >= MAX_SOURCES:
                self.dropped += 1
                return []
            self.sources[key] = Source(rule.name, now_wall, now_mono, via=via)
            return []
        src.via = via or src.via
        events = []
        if src.fired:
            quiet = _quiet(src, now_wall, now_mono)
            events.append(
                Event("again", key, self.by_name[src.rule], src.last_wall, quiet, src.down)
            )
        src.last_wall, src.last_mono, src.fired, src.down = now_wall, now_mono, False, 0.0
        return events

    def pause(self, paths: frozenset[str], now_mono: float) -> None:
        """The paths that cannot be heard now. A path that returns gives each of its
        sources a fresh window from now."""
        back = self.paused - paths
        self.paused = paths
        if not back:
            return
        for src in self.sources.values():
            if src.via in back and not src.fired:
                src.last_mono = max(src.last_mono, now_mono)

    def due(self, now_wall: float, now_mono: float) -> list[Event]:
        """Sources quiet for longer than their rule allows, each reported once; none
        heard through a paused path."""
        events = []
        for key, src in self.sources.items():
            rule = self.by_name[src.rule]
            if src.via in self.paused:
                continue
            if not src.fired and now_mono - src.last_mono >= rule.expect_every:
                src.fired = True
                quiet = _quiet(src, now_wall, now_mono)
                events.append(Event("silent", key, rule, src.last_wall, quiet, src.down))
        return events

    def unfire(self, key: str) -> None:
        """A silence alert could not be stored: report it again on the next `due`."""
        src = self.sources.get(key)
        if src is not None:
            src.fired = False


def _quiet(src: Source, now_wall: float, now_mono: float) -> float:
    # The wall clock spans restarts; if it went backwards (no RTC, NTP not yet synced)
    # the monotonic time since our window began plus the downtime is the honest floor.
    floor = now_mono - src.last_mono + src.down
    return max(now_wall - src.last_wall, floor)


def describe(event: Event) -> str:
    """The alert's message, as an operator reads it in a subject line."""
    topic, sensor = split_key(event.key)
    name = topic if topic.rsplit("/", 1)[-1] == sensor else f"{topic} ({sensor})"
    down = (
        f", of which the gateway itself was down {human(event.down_for)}"
        if event.down_for >= 1
        else ""
    )
    if event.kind == "silent":
        last = _clock(event.last_wall)
        return f"{name}: nothing for {human(event.quiet_for)}{down} (last seen {last})"
    return f"{name}: reporting again after {human(event.quiet_for)} of silence{down}"


def _clock(wall: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(wall))


def human(seconds: float) -> str:
    """`2 h 10 min`, `15 min`, `40 s`: durations as a person says them."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    days, rest = divmod(s, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    parts = [f"{days} d"] if days else []
    if hours:
        parts.append(f"{hours} h")
    if minutes and not days:
        parts.append(f"{minutes} min")
    return " ".join(parts) or "0 s"
