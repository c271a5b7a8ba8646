"""Prometheus text exposition of the status report, for node_exporter's textfile collector.

Pi fleets commonly run node_exporter already; a `.prom` file it picks up costs
us no listening socket and no dependency. Written atomically (rename), so the
collector never reads half a file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


Samples = list[tuple[dict[str, str], float]]


def _value(key: str) -> Callable[[dict[str, Any]], Samples]:
    return lambda r: [({}, float(r.get(key) or 0))]


def _flag(key: str, when: Callable[[Any], bool] = bool) -> Callable[[dict[str, Any]], Samples]:
    return lambda r: [({}, 1.0 if when(r.get(key)) else 0.0)]


def _by(key: str, label: str, value: Callable[[Any], float] = float) -> Callable[..., Samples]:
    return lambda r: [({label: k}, value(v)) for k, v in sorted((r.get(key) or {}).items())]


def _hosts(r: dict[str, Any], value: Callable[[dict[str, Any]], float]) -> Samples:
    return [
        ({"host": str(h.get("host")), "role": str(h.get("role"))}, value(h))
        for h in r.get("smarthosts") or []
    ]


# Every delivery state (gateway/outbox/model.py), and "deferred": queued, not due yet.
_STATES = ("queued", "deferred", "sending", "sent", "dead", "unrouted", "suppressed", "held")

# (name, type, help, the samples from a status report)
METRICS: tuple[tuple[str, str, str, Callable[[dict[str, Any]], Samples]], ...] = (
    (
        "mailgw_outbox_messages",
        "gauge",
        "Deliveries in the outbox by state.",
        lambda r: [({"state": s}, float(r.get(s) or 0)) for s in _STATES],
    ),
    (
        "mailgw_outbox_oldest_queued_age_seconds",
        "gauge",
        "Age of the oldest undelivered alert.",
        _value("oldest_queued_age_s"),
    ),
    (
        "mailgw_outbox_full",
        "gauge",
        "1 while the outbox is full and sources do not ack.",
        _flag("outbox_full"),
    ),
    (
        "mailgw_store_failing",
        "gauge",
        "1 while commits to the outbox fail (locked file, I/O errors); alerts are retried.",
        _flag("store_error"),
    ),
    (
        "mailgw_store_failures_total",
        "counter",
        "Alerts whose commit failed and was retried, since the daemon started.",
        _value("store_failures"),
    ),
    (
        "mailgw_thread_up",
        "gauge",
        "1 while a thread the daemon relies on runs, 0 once it has died.",
        _by("threads", "thread", lambda v: 1.0 if v == "alive" else 0.0),
    ),
    (
        "mailgw_relay_attempts_total",
        "counter",
        "Delivery attempts by result since the daemon started.",
        _by("relay_attempts", "result"),
    ),
    (
        "mailgw_ingested_total",
        "counter",
        "Alerts stored in the outbox, by source.",
        _by("ingested", "source"),
    ),
    ("mailgw_rejected_total", "counter", "Input rejected, by reason.", _by("rejected", "reason")),
    (
        "mailgw_sanitised_total",
        "counter",
        "Input accepted after sanitising, by kind.",
        _by("sanitised", "kind"),
    ),
    (
        "mailgw_uplink_up",
        "gauge",
        "1 when the smarthost was last reachable.",
        _flag("uplink", lambda v: v == "up"),
    ),
    (
        "mailgw_relay_held",
        "gauge",
        "1 for the reason the relay waits: auth_failed (the login was refused) or paused "
        "(an account or quota reply) or throttled (the smarthost said slow down); the queue is "
        "kept.",
        lambda r: [
            ({"reason": s}, 1.0 if r.get("uplink") == s else 0.0)
            for s in ("auth_failed", "paused", "throttled")
        ],
    ),
    (
        "mailgw_relay_paced_total",
        "counter",
        "Waits between mails for smtp.rate_limit, at most one per mail (absent: no limit).",
        lambda r: [({}, float(p["waits"]))] if (p := r.get("pace")) else [],
    ),
    (
        "mailgw_smarthost_up",
        "gauge",
        "1 while this smarthost of the failover list was last usable, by host and role.",
        lambda r: _hosts(r, lambda h: 1.0 if h.get("state") == "up" else 0.0),
    ),
    (
        "mailgw_smarthost_active",
        "gauge",
        "1 for the smarthost the relay sends through now.",
        lambda r: _hosts(r, lambda h: 1.0 if h.get("active") else 0.0),
    ),
    (
        "mailgw_smarthost_sessions",
        "gauge",
        "SMTP sessions open to this smarthost now.",
        lambda r: _hosts(r, lambda h: float(h.get("sessions") or 0)),
    ),
    (
        "mailgw_smarthost_sent_total",
        "counter",
        "Mails this smarthost accepted since the daemon started.",
        lambda r: _hosts(r, lambda h: float(h.get("sent") or 0)),
    ),
    (
        "mailgw_last_success_timestamp_seconds",
        "gauge",
        "Unix time of the last accepted delivery.",
        _value("last_success"),
    ),
    (
        "mailgw_source_connected",
        "gauge",
        "1 for each connected source.",
        _by("sources", "source", lambda v: 1.0 if v == "connected" else 0.0),
    ),
)


def render(report: dict[str, Any]) -> str:
    out: list[str] = []
    for name, kind, help_text, samples in METRICS:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in samples(report):
            lab = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            out.append(f"{name}{{{lab}}} {value}" if lab else f"{name} {value}")
    return "\n".join(out) + "\n"


def write_textfile(path: Path, report: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(render(report), encoding="utf-8")
    os.chmod(tmp, 0o644)  # node_exporter runs as another user
    os.replace(tmp, path)
