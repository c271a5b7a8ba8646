"""What the gateway is doing: runtime counters, and the status report.

The daemon keeps counters in memory and writes them, with the uplink state, to
`runtime_dir/status.json` (tmpfs under systemd: rewriting it costs no flash
wear). `mailgw status` combines that file with queue counts read from the outbox.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway import outbox


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
    uplink: str = "unknown"  # unknown | up | down
    next_probe_at: float | None = None  # wall time
    sources: dict[str, str] = field(default_factory=dict)
    outbox_full: bool = False
    store_failures: int = 0  # alerts whose commit failed (locked, I/O error); retried
    store_error: str | None = None  # why storing fails now; None while it works
    store_failing_since: float | None = None  # wall time
    threads: dict[str, str] = field(default_factory=dict)  # name → alive | dead: why

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
            "rejected": dict(self.rejected),
            "sanitised": dict(self.sanitised),
            "ingested": dict(self.ingested),
            "received": dict(self.received),
            "relay_attempts": dict(self.attempts),
            "last_success": self.last_success,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "uplink": self.uplink,
            "next_probe_at": self.next_probe_at,
            "sources": dict(self.sources),
            "outbox_full": self.outbox_full,
            "store_failures": self.store_failures,
            "store_error": self.store_error,
            "store_failing_since": self.store_failing_since,
            "threads": dict(self.threads),
        }

    def write(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.snapshot()), encoding="utf-8")
        os.replace(tmp, path)


def read_runtime(path: Path) -> dict[str, Any] | None:
    """The daemon's last status, or None if no live daemon wrote one."""
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    try:
        os.kill(int(data["pid"]), 0)
    except (KeyError, ValueError, ProcessLookupError):
        return None
    except PermissionError:
        pass  # alive, owned by the service user
    return data


def report(db_path: Path, runtime_path: Path, live: dict[str, Any] | None = None) -> dict[str, Any]:
    """The status report: DESIGN.md's keys first, then the details.

    `live` is the daemon's own snapshot (when the daemon reports on itself);
    otherwise the runtime file of a running daemon is read.
    """
    result: dict[str, Any] = {}
    if db_path.exists():
        conn = outbox.connect(db_path, readonly=True)
        try:
            result.update(outbox.counts(conn))
        except sqlite3.OperationalError as exc:
            result["outbox_error"] = str(exc)
        finally:
            conn.close()
    else:
        result.update(
            {s: 0 for s in outbox.STATES},
            deferred=0,
            oldest_queued_age_s=None,
            queued_by_priority={},
        )
        result["outbox_error"] = f"{db_path} does not exist yet (the daemon creates it)"
    rt = live if live is not None else read_runtime(runtime_path)
    result["daemon"] = {
        "running": rt is not None,
        "pid": rt["pid"] if rt else None,
        "uptime_s": time.time() - rt["started_at"] if rt else None,
    }
    for key in (
        "last_success",
        "last_error",
        "last_error_at",
        "uplink",
        "next_probe_at",
        "sources",
        "relay_attempts",
        "ingested",
        "sanitised",
        "outbox_full",
        "store_failures",
        "store_error",
        "store_failing_since",
        "threads",
    ):
        result[key] = rt.get(key) if rt else None
    result["rejected"] = rt.get("rejected", {}) if rt else {}
    return result


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    return f"{seconds // 86400}d{(seconds % 86400) // 3600:02d}h"


def _when(ts: float | None) -> str:
    if ts is None:
        return "never"
    return (
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ts))} ({_age(time.time() - ts)} ago)"
    )


def render(r: dict[str, Any]) -> str:
    d = r["daemon"]
    lines = [
        f"daemon     {'running, pid ' + str(d['pid']) + ', up ' + _age(d['uptime_s']) if d['running'] else 'not running'}",  # noqa: E501
        f"queue      {r['queued']} queued ({r['deferred']} deferred), {r['sending']} sending, "
        f"{r['dead']} dead",
        f"           {r['unrouted']} unrouted, {r['sent']} sent (kept for the retention period)",
        f"           {r.get('suppressed', 0)} held by storm control (for a lead mail or digest)",
    ]
    if r.get("queued_by_priority"):
        prios = ", ".join(
            f"p{p}: {n}" for p, n in sorted(r["queued_by_priority"].items(), reverse=True)
        )
        lines.append(f"priority   {prios}")
    lines.append(f"oldest     {_age(r['oldest_queued_age_s'])} queued")
    if d["running"]:
        uplink = r.get("uplink") or "unknown"
        if uplink == "down" and r.get("next_probe_at"):
            uplink += f", next probe in {_age(max(0.0, r['next_probe_at'] - time.time()))}"
        lines.append(f"uplink     {uplink}")
        lines.append(f"success    {_when(r.get('last_success'))}")
        err = r.get("last_error")
        lines.append(
            f"error      {err + ' at ' + _when(r.get('last_error_at')) if err else 'none'}"
        )
        if r.get("outbox_full"):
            lines.append("FULL       the outbox is full: sources are not acknowledging")
        if r.get("store_error"):
            lines.append(
                f"STORE      failing since {_when(r.get('store_failing_since'))}: "
                f"{r['store_error']} (alerts stay unacknowledged and are retried)"
            )
        dead = {k: v for k, v in (r.get("threads") or {}).items() if v != "alive"}
        if dead:
            lines.append("THREADS    " + ", ".join(f"{k} {v}" for k, v in sorted(dead.items())))
        sources = r.get("sources") or {}
        if sources:
            lines.append("sources    " + ", ".join(f"{k} {v}" for k, v in sorted(sources.items())))
    rejected = r.get("rejected") or {}
    lines.append(
        "rejected   " + (", ".join(f"{k}: {v}" for k, v in sorted(rejected.items())) or "none")
    )
    if r.get("outbox_error"):
        lines.append(f"outbox     {r['outbox_error']}")
    return "\n".join(lines)
