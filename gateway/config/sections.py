"""Builders of the local sections: [gateway], [outbox], [[serial]], [[route]], [metrics].

Each takes its `Table`, asks it for every key the section has (which is also how
`known_keys()` learns the schema), adds the checks that span keys, and returns the
section's value. [smtp] and [mqtt], which carry credentials and TLS, are in
`connections.py`.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any

from gateway.config.addresses import normalize_address
from gateway.config.checks import check_topic_filter, mqtt_string_problem
from gateway.config.loader import Table
from gateway.config.units import parse_rate
from gateway.config.values import (
    DEFAULT_KEY,
    DEFAULT_SUBJECT,
    SEVERITIES,
    GatewaySection,
    MetricsSection,
    OutboxSection,
    Policy,
    RouteSection,
    SerialSection,
)

# What the lines protocol takes from a line_regex match (sources/serial.py).
_LINE_GROUPS = {"sensor", "severity", "message"}


def gateway_section(t: Table) -> GatewaySection:
    device_id = t.text("device_id", socket.gethostname())
    if isinstance(device_id, str) and not re.fullmatch(
        r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", device_id
    ):
        t.loader.problem(
            t.name,
            "device_id",
            f"{device_id!r}: use letters, digits, '.', '_', '-' "
            "(max 64); it appears in topics and Message-IDs",
        )
    section = GatewaySection(
        device_id=device_id or "mailgw",
        state_dir=t.path("state_dir", "/var/lib/mailgw") or Path("/var/lib/mailgw"),
        runtime_dir=t.path("runtime_dir", os.environ.get("RUNTIME_DIRECTORY", "/run/mailgw"))
        or Path("/run/mailgw"),
        default_route=t.text("default_route", None),
    )
    t.done()
    return section


def outbox_section(t: Table) -> OutboxSection:
    section = OutboxSection(
        max_messages=t.integer("max_messages", 100_000, lo=10),
        max_age=t.duration("max_age", 5 * 86400.0, minimum=60),
        sent_retention=t.duration("sent_retention", 7 * 86400.0),
        allow_volatile=t.flag("allow_volatile", False),
        commit_batch=t.integer("commit_batch", 1000, lo=1, hi=100_000),
        # The writer sleeps up to this before a commit, and every ack waits for it; the
        # daemon takes a writer silent for 15 s as stuck.
        commit_interval=t.duration("commit_interval", 0.005, maximum=1),
        # At most half: whatever local mail does, alerts keep at least the other half.
        local_percent=t.integer("local_percent", 10, lo=1, hi=50),
        local_user_percent=t.integer("local_user_percent", 25, lo=1, hi=100),
        # 0: readings no route takes are watched (silence) and never kept.
        unrouted_percent=t.integer("unrouted_percent", 10, lo=0, hi=100),
        keep_unrouted=t.duration("keep_unrouted", 86400.0, minimum=1),
    )
    t.done()
    return section


def serial_section(t: Table) -> SerialSection:
    port = t.text("port") or ""
    if "port" in t.data and not port:
        t.loader.problem(t.name, "port", 'cannot be empty; write e.g. "/dev/ttyUSB0"')
    name = t.text("name", Path(port).name or "serial")
    # The name is a topic level (serial/<name>/<sensor>) and a status key.
    if isinstance(name, str) and (
        not name or any(c in name for c in "/+#") or mqtt_string_problem(name)
    ):
        t.loader.problem(
            t.name, "name", f"{name!r}: must be one topic level: no '/', '+', '#' or controls"
        )
    regex = t.text("line_regex", None)
    if regex is not None:
        try:
            unknown = set(re.compile(regex).groupindex) - _LINE_GROUPS
        except re.error as exc:
            t.loader.problem(t.name, "line_regex", f"is not a valid regular expression: {exc}")
        else:
            if unknown:
                t.loader.problem(
                    t.name,
                    "line_regex",
                    f"has named groups {', '.join(sorted(unknown))} that nothing reads; "
                    f"name groups only {', '.join(sorted(_LINE_GROUPS))}",
                )
    section = SerialSection(
        port=port,
        name=name,
        baudrate=t.integer("baudrate", 115200, lo=50, hi=4_000_000),
        protocol=t.text("protocol", "framed", choices=("framed", "lines")) or "framed",
        line_regex=regex,
        sensor=t.text("sensor", "serial"),
        severity=t.text("severity", "warning", choices=SEVERITIES) or "warning",
    )
    t.done()
    return section


def route_section(t: Table, index: int) -> RouteSection:
    match = t.text("match", "#") or "#"
    name = t.text("name", f"route{index}") or f"route{index}"
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", name):
        t.loader.problem(
            t.name,
            "name",
            f"{name!r}: use letters, digits, '_' and '-' (max 32); it appears in Message-IDs",
        )
    if why := check_topic_filter(match):
        t.loader.problem(t.name, "match", why)
    to = _addresses(t, "to", t.strings("to") or ())
    cc = _addresses(t, "cc", t.strings("cc", ()) or ())
    if not to and "to" in t.data and isinstance(t.data["to"], list) and not t.data["to"]:
        t.loader.problem(t.name, "to", "needs at least one recipient")
    section = RouteSection(
        name=name,
        match=match,
        to=to,
        cc=cc,
        min_severity=t.text("min_severity", "info", choices=SEVERITIES) or "info",
        subject=t.text("subject", DEFAULT_SUBJECT),
        body=t.text("body", None),
        priority=t.integer("priority", None, lo=0, hi=9),
        storm=_storm_policy(t),
    )
    t.done()
    return section


def _addresses(t: Table, key: str, texts: tuple[str, ...]) -> tuple[str, ...]:
    """The route's recipients as the relay will use them (ASCII, IDNA domains)."""
    found = []
    for text in texts:
        try:
            found.append(normalize_address(text))
        except ValueError as exc:
            t.loader.problem(t.name, key, str(exc))
    return tuple(found)


def _storm_policy(t: Table) -> Policy:
    rate = None
    text = t.text("rate_limit", None)
    if text is not None:
        try:
            rate = parse_rate(text)
        except ValueError as exc:
            t.loader.problem(t.name, "rate_limit", str(exc))
    return Policy(
        dedupe_window=t.duration("dedupe_window", 0.0) or 0.0,
        rate=rate,
        # A digest due later than this is held back so long it may as well be lost.
        digest_every=t.duration("digest_every", 3600.0, minimum=1, maximum=7 * 86400) or 3600.0,
        critical_bypass=bool(t.flag("critical_bypass", True)),
        key=t.text("dedupe_key", DEFAULT_KEY) or DEFAULT_KEY,
    )


def metrics_section(t: Table) -> MetricsSection:
    section = MetricsSection(textfile=t.path("textfile", None))
    t.done()
    return section


def filter_overlaps(topic_filter: str, prefix: str) -> bool:
    """Could a subscription to `topic_filter` receive a topic that starts with `prefix`?

    The prefix's last level may be partial ("receipts/" ends in an empty one,
    "rcpt" is the start of a first level); a topic under it has at least its levels.
    """
    want = prefix.split("/")
    have = topic_filter.split("/")
    for i, level in enumerate(want):
        last = i == len(want) - 1
        if i >= len(have):
            return False  # the filter's topics have fewer levels than these
        f = have[i]
        if f == "#":
            return True
        if f == "+":
            continue
        if last:
            return f.startswith(level)
        if f != level:
            return False
    return True


# gateway/receipts.py's MAX_TOPIC (256 bytes), less room for a sensor's name (64). A
# {topic} filled in past MAX_TOPIC is refused per request (receipt_bad_topic).
_RECEIPT_TEMPLATE_MAX = 192


def mqtt_receipt_keys(t: Table, topics: tuple[str, ...]) -> dict[str, Any]:
    """[mqtt]'s receipt keys (gateway/receipts.py), for connections.mqtt_section."""
    asked = any(k in t.data for k in ("receipts", "receipt_prefix", "receipt_topic"))
    enabled = t.flag("receipts", True)
    prefix = t.text("receipt_prefix", "receipts/")
    template = t.text("receipt_topic", "receipts/{sensor}")
    if isinstance(prefix, str):
        loop = [f for f in topics if filter_overlaps(f, prefix)]
        if any(c in prefix for c in "+#") or mqtt_string_problem(prefix):
            t.loader.problem(
                t.name,
                "receipt_prefix",
                f"{prefix!r}: a topic prefix cannot hold '+', '#' or controls",
            )
        elif not prefix.endswith("/"):
            # A plain startswith() is the check at publish time: "receipts" would let a
            # publisher pick "receiptsX/anything", outside the subtree the operator meant.
            t.loader.problem(
                t.name,
                "receipt_prefix",
                f"{prefix!r}: a receipt prefix is a subtree and must end in '/' "
                f"(e.g. {prefix.rstrip('/') + '/' if prefix.strip('/') else 'receipts/'!r})",
            )
        elif loop and not asked:
            # A config written before receipts existed, subscribed to '#': it runs as
            # it did, without receipts (the MQTT source says so in its first log line).
            enabled = False
        elif enabled and loop:
            # The gateway would take its own receipts for alerts, and answer them.
            t.loader.problem(
                t.name,
                "receipt_prefix",
                f"{prefix!r}: receipts published there would come back as alerts through "
                f"the subscription {loop[0]!r}; choose a prefix outside mqtt.topics",
            )
    if isinstance(template, str) and isinstance(prefix, str):
        names = set(re.findall(r"{([^}]*)}", template))
        bare = re.sub(r"{(sensor|device_id|topic)}", "x", template)
        if names - {"sensor", "device_id", "topic"} or "{" in bare or "}" in bare:
            t.loader.problem(
                t.name,
                "receipt_topic",
                f"{template!r}: only {{sensor}}, {{topic}} and {{device_id}} can be filled in",
            )
        elif any(c in bare for c in "+#") or mqtt_string_problem(bare):
            t.loader.problem(
                t.name, "receipt_topic", f"{template!r}: cannot hold '+', '#' or controls"
            )
        elif not bare.startswith(prefix) or len(template.encode()) > _RECEIPT_TEMPLATE_MAX:
            t.loader.problem(
                t.name,
                "receipt_topic",
                f"{template!r} must start with mqtt.receipt_prefix {prefix!r} and stay under "
                f"{_RECEIPT_TEMPLATE_MAX} bytes",
            )
    return {
        "receipts": bool(enabled),
        "receipt_prefix": prefix if isinstance(prefix, str) else "receipts/",
        "receipt_topic": template if isinstance(template, str) else "receipts/{sensor}",
    }
