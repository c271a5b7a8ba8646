"""Topic filters, routes and safe templates.

One routing language for every source: a route matches alert topics with MQTT
filter syntax and a minimum severity. Templates substitute alert fields by name
only (`{sensor}`), with no attribute access, indexing or format specs: a
template is configuration, but the values come from sensors, and str.format
would let a `{message.__class__}` in a template reach into objects.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from gateway.alert import Alert, Severity, parse_severity
from gateway.config import RouteSection

CACHE_MAX = 4096


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT 3.1.1 §4.7 matching: '+' one level, '#' the rest (including none)."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False  # §4.7.2: wildcards at the first level do not match $-topics
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    for i, f in enumerate(f_levels):
        if f == "#":
            return True
        if i >= len(t_levels):
            return False
        if f != "+" and f != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)


_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")


def render(template: str, values: Mapping[str, str]) -> str:
    """Substitute `{name}`; `{{`/`}}` are literal braces; a missing name stays visible."""

    def sub(m: re.Match[str]) -> str:
        token = m.group(0)
        if token == "{{":
            return "{"
        if token == "}}":
            return "}"
        name = m.group(1)
        return values.get(name, f"<no {name}>")

    return _PLACEHOLDER.sub(sub, template)


class Router:
    def __init__(self, routes: Sequence[RouteSection], default_route: str | None = None) -> None:
        self.routes = tuple(routes)
        self.by_name = {r.name: r for r in self.routes}
        self.default = self.by_name.get(default_route) if default_route else None
        self._min = {r.name: parse_severity(r.min_severity) or Severity.INFO for r in self.routes}
        # Sensors publish on a few fixed topics: remember each answer rather than
        # matching every filter for every alert. Cleared when it outgrows CACHE_MAX.
        self._cache: dict[tuple[str, Severity], tuple[tuple[str, int], ...]] = {}

    def matching(self, topic: str, severity: Severity) -> list[RouteSection]:
        return [
            r
            for r in self.routes
            if severity >= self._min[r.name] and topic_matches(r.match, topic)
        ]

    def route(self, alert: Alert) -> tuple[tuple[str, int], ...]:
        """The deliveries (route name, priority) for an alert; empty means unrouted."""
        key = (alert.topic, alert.severity)
        found = self._cache.get(key)
        if found is None:
            found = self._route(alert)
            if len(self._cache) >= CACHE_MAX:
                self._cache.clear()
            self._cache[key] = found
        return found

    def _route(self, alert: Alert) -> tuple[tuple[str, int], ...]:
        chosen = self.matching(alert.topic, alert.severity)
        if not chosen and self.default is not None:
            chosen = [self.default]
        return tuple(
            (r.name, int(alert.severity) if r.priority is None else r.priority) for r in chosen
        )
