"""Prometheus text exposition of the status report, for node_exporter's textfile collector.

Pi fleets commonly run node_exporter already; a `.prom` file it picks up costs
us no listening socket and no dependency. Written atomically (rename), so the
collector never reads half a file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(report: dict[str, Any]) -> str:
    out: list[str] = []

    def metric(
        name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], float]]
    ) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lab = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            out.append(f"{name}{{{lab}}} {value}" if lab else f"{name} {value}")

    states = ("queued", "deferred", "sending", "sent", "dead", "unrouted", "suppressed")
    metric(
        "mailgw_outbox_messages",
        "gauge",
        "Deliveries in the outbox by state.",
        [({"state": s}, float(report.get(s) or 0)) for s in states],
    )
    metric(
        "mailgw_outbox_oldest_queued_age_seconds",
        "gauge",
        "Age of the oldest undelivered alert.",
        [({}, float(report.get("oldest_queued_age_s") or 0))],
    )
    metric(
        "mailgw_outbox_full",
        "gauge",
        "1 while the outbox is full and sources do not ack.",
        [({}, 1.0 if report.get("outbox_full") else 0.0)],
    )
    metric(
        "mailgw_store_failing",
        "gauge",
        "1 while commits to the outbox fail (locked file, I/O errors); alerts are retried.",
        [({}, 1.0 if report.get("store_error") else 0.0)],
    )
    metric(
        "mailgw_store_failures_total",
        "counter",
        "Alerts whose commit failed and was retried, since the daemon started.",
        [({}, float(report.get("store_failures") or 0))],
    )
    metric(
        "mailgw_thread_up",
        "gauge",
        "1 while a thread the daemon relies on runs, 0 once it has died.",
        [
            ({"thread": k}, 1.0 if v == "alive" else 0.0)
            for k, v in sorted((report.get("threads") or {}).items())
        ],
    )
    metric(
        "mailgw_relay_attempts_total",
        "counter",
        "Delivery attempts by result since the daemon started.",
        [
            ({"result": k}, float(v))
            for k, v in sorted((report.get("relay_attempts") or {}).items())
        ],
    )
    metric(
        "mailgw_ingested_total",
        "counter",
        "Alerts stored in the outbox, by source.",
        [({"source": k}, float(v)) for k, v in sorted((report.get("ingested") or {}).items())],
    )
    metric(
        "mailgw_rejected_total",
        "counter",
        "Input rejected, by reason.",
        [({"reason": k}, float(v)) for k, v in sorted((report.get("rejected") or {}).items())],
    )
    metric(
        "mailgw_sanitised_total",
        "counter",
        "Input accepted after sanitising, by kind.",
        [({"kind": k}, float(v)) for k, v in sorted((report.get("sanitised") or {}).items())],
    )
    metric(
        "mailgw_uplink_up",
        "gauge",
        "1 when the smarthost was last reachable.",
        [({}, 1.0 if report.get("uplink") == "up" else 0.0)],
    )
    metric(
        "mailgw_last_success_timestamp_seconds",
        "gauge",
        "Unix time of the last accepted delivery.",
        [({}, float(report.get("last_success") or 0))],
    )
    metric(
        "mailgw_source_connected",
        "gauge",
        "1 for each connected source.",
        [
            ({"source": k}, 1.0 if v == "connected" else 0.0)
            for k, v in sorted((report.get("sources") or {}).items())
        ],
    )
    return "\n".join(out) + "\n"


def write_textfile(path: Path, report: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(render(report), encoding="utf-8")
    os.chmod(tmp, 0o644)  # node_exporter runs as another user
    os.replace(tmp, path)
