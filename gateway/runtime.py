"""The daemon's counters and states, kept in memory and written to status.json.

A leaf: every layer counts here (sources, ingest, relay, service), and it imports no
other part of the gateway. The file lives in `runtime_dir` (tmpfs under systemd:
rewriting it costs no flash wear); gateway/status.py reads it back for `mailgw status`.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Runtime:
    started_at: float = field(default_factory=time.time)
    rejected: Counter[str] = field(default_factory=Counter)
    sanitised: Counter[str] = field(default_factory=Counter)
    ingested: Counter[str] = field(default_factory=Counter)  # stored, by source
    received: Counter[str] = field(default_factory=Counter)  # taken from sources
    attempts: Counter[str] = field(default_factory=Counter)
    last_success: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    uplink: str = "unknown"  # unknown | up | down | auth_failed | paused
    relay_hold: str | None = None  # why the relay waits: a refused login or account reply
    next_probe_at: float | None = None  # wall time
    sources: dict[str, str] = field(default_factory=dict)
    outbox_full: bool = False
    store_failures: int = 0  # alerts whose commit failed (locked, I/O error); retried
    # MQTT redeliveries of messages already stored, acknowledged without storing them again
    mqtt_redelivery_recognised: int = 0
    store_error: str | None = None  # why storing fails now; None while it works
    store_failing_since: float | None = None  # wall time
    threads: dict[str, str] = field(default_factory=dict)  # name → alive | dead: why
    # silent sources and raised self-alert conditions (gateway/watch.py) → since when
    watch: dict[str, str] = field(default_factory=dict)
    # smtp.rate_limit as the relay applies it: rate_limit, tokens, next_send_at (wall
    # time, None when a send may start now), waits (times a backlog waited for a token)
    pace: dict[str, Any] = field(default_factory=dict)
    # smtp.drain_within (gateway/drainer.py): drain_within, folds, folded, digests, last
    drain: dict[str, Any] = field(default_factory=dict)
    # Each smarthost in the order they are tried (gateway/smarthost.py keeps its line):
    # host, role, active, state, sessions, limit, last_error, next_probe_at, hold, sent.
    hosts: list[dict[str, Any]] = field(default_factory=list)
    # Whose status this is: daemons of two state_dirs given one runtime_dir would
    # otherwise answer `mailgw status` and `flush` for each other.
    state_dir: str | None = None

    def sum_hosts(self) -> None:
        """The relay's state from its smarthosts': up while any is; otherwise the
        primary's, with the earliest next try of any."""
        if not self.hosts:
            return
        up = [h for h in self.hosts if h.get("state") == "up"]
        first = up[0] if up else self.hosts[0]
        self.uplink = first.get("state", "unknown")
        self.relay_hold = first.get("hold")
        probes = [h["next_probe_at"] for h in self.hosts if h.get("next_probe_at") is not None]
        self.next_probe_at = None if up or not probes else min(probes)

    def reject(self, reason: str) -> None:
        self.rejected[reason] += 1

    def error(self, text: str) -> None:
        self.last_error = text
        self.last_error_at = time.time()

    def snapshot(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "started_at": self.started_at,
            "written_at": time.time(),
            "state_dir": self.state_dir,
            "rejected": dict(self.rejected),
            "sanitised": dict(self.sanitised),
            "ingested": dict(self.ingested),
            "received": dict(self.received),
            "relay_attempts": dict(self.attempts),
            "last_success": self.last_success,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "uplink": self.uplink,
            "relay_hold": self.relay_hold,
            "next_probe_at": self.next_probe_at,
            "sources": dict(self.sources),
            "outbox_full": self.outbox_full,
            "store_failures": self.store_failures,
            "mqtt_redelivery_recognised": self.mqtt_redelivery_recognised,
            "store_error": self.store_error,
            "store_failing_since": self.store_failing_since,
            "threads": dict(self.threads),
            "watch": dict(self.watch),
            "pace": dict(self.pace),
            "drain": dict(self.drain),
            "smarthosts": [dict(h) for h in self.hosts],
        }

    def write(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.snapshot()), encoding="utf-8")
        os.replace(tmp, path)
