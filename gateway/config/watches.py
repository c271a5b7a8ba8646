"""Builders of the watch sections: [[silence]] (the dead man's switch), [selfalerts] and
[heartbeat].

Both raise alerts of the gateway's own, which route like any other alert; a `route`
they name must exist (checked across sections in document.py).
"""

from __future__ import annotations

import re

from gateway.config.checks import check_topic_filter, mqtt_string_problem
from gateway.config.loader import Table
from gateway.config.values import (
    SEVERITIES,
    HeartbeatSection,
    SelfAlertsSection,
    SilenceSection,
)

# A silence shorter than this is a sensor's jitter, not its death; the daemon checks
# every second or two, so a shorter window would not be kept anyway.
MIN_EXPECT = 2.0
MAX_EXPECT = 366 * 86400.0


def silence_section(t: Table, index: int) -> SilenceSection:
    name = t.text("name", f"silence{index}") or f"silence{index}"
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", name):
        t.loader.problem(t.name, "name", f"{name!r}: use letters, digits, '_' and '-' (max 32)")
    match = t.text("match", "#") or "#"
    if why := check_topic_filter(match):
        t.loader.problem(t.name, "match", why)
    sensor = t.text("sensor", None)
    if isinstance(sensor, str) and (not sensor or mqtt_string_problem(sensor)):
        t.loader.problem(t.name, "sensor", f"{sensor!r}: a sensor name, without controls")
    expect = t.duration("expect_every", None, minimum=MIN_EXPECT, maximum=MAX_EXPECT)
    section = SilenceSection(
        name=name,
        match=match,
        sensor=sensor,
        expect_every=expect or 900.0,
        severity=t.text("severity", "warning", choices=SEVERITIES) or "warning",
        route=t.text("route", None),
    )
    if "expect_every" not in t.data:
        t.loader.problem(
            t.name, "expect_every", 'is required: how often the source reports, e.g. "15m"'
        )
    t.done()
    return section


def selfalerts_section(t: Table) -> SelfAlertsSection:
    d = SelfAlertsSection()
    section = SelfAlertsSection(
        enabled=bool(t.flag("enabled", d.enabled)),
        route=t.text("route", None),
        severity=t.text("severity", d.severity, choices=SEVERITIES) or d.severity,
        min_interval=_span(t, "min_interval", d.min_interval),
        clear_after=_span(t, "clear_after", d.clear_after),
        serial_after=_span(t, "serial_after", d.serial_after),
        mqtt_after=_span(t, "mqtt_after", d.mqtt_after),
        store_after=_span(t, "store_after", d.store_after),
        clock_after=_span(t, "clock_after", d.clock_after),
        outbox_percent=t.integer("outbox_percent", d.outbox_percent, lo=10, hi=99),
        disk_free_percent=t.integer("disk_free_percent", d.disk_free_percent, lo=1, hi=50),
    )
    t.done()
    return section


def _span(t: Table, key: str, default: float) -> float:
    # At most a week: a bound longer than that is a condition nobody would hear of.
    value = t.duration(key, default, minimum=0, maximum=7 * 86400)
    return default if value is None else float(value)


def heartbeat_section(t: Table) -> HeartbeatSection:
    section = HeartbeatSection(
        # More often than hourly it is noise in an inbox, not a summary.
        every=t.duration("every", None, minimum=3600, maximum=31 * 86400),
        route=t.text("route", None),
        severity=t.text("severity", "info", choices=SEVERITIES) or "info",
    )
    t.done()
    return section
