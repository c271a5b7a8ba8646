"""What the gateway is doing: the status report (Runtime's counters are in gateway/runtime.py).

The daemon keeps counters in memory and writes them, with the uplink state, to
`runtime_dir/status.json` (tmpfs under systemd: rewriting it costs no flash
wear). `mailgw status` combines that file with queue counts read from the outbox.
"""

from __future__ import annotations

import json
import math
import os
import re
import sqlite3
import time
from pathlib import Path
from typing import Any, TypeGuard

from gateway import outbox
from gateway.outbox.held import held
from gateway.outbox.room import Room
from gateway.outbox.room import report as room_report


def _is_number(v: object) -> TypeGuard[int | float]:
    """A JSON number that means one: not a bool (an int subclass), not inf or NaN."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def other_daemon(rt: dict[str, Any] | None, state_dir: Path, path: Path) -> str | None:
    """Why the status `rt` (read from `path`) is not of the daemon on `state_dir`: it
    names another state_dir (two daemons share one runtime_dir). None if it is, or if
    it names none (written before the file said)."""
    theirs = rt.get("state_dir") if rt is not None else None
    if not isinstance(theirs, str) or _same_dir(theirs, state_dir):
        return None
    return (
        f"the status file {path} is another daemon's (state_dir {printable(theirs)}), "
        f"not this state_dir's ({state_dir}): give each daemon a runtime_dir of its own"
    )


def _same_dir(a: str, b: Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def read_runtime(path: Path) -> dict[str, Any] | None:
    """The daemon's last status, or None if no live daemon wrote one.

    The file lives in a directory the service account can write, so it is input,
    not truth: whatever it holds (not JSON, not an object, a pid of "-1" or 0, keys
    missing or of the wrong type), the result is either None or a dict whose `pid`
    is an int > 1 of a live process, whose `started_at` is a number, and whose other
    keys have the types `Runtime` writes (anything else becomes its empty value).
    `mailgw flush` signals that pid only after checking that it is the daemon's.
    """
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(raw, dict):
        return None
    pid = raw.get("pid")
    # bool is an int; a negative pid names a process group, 0 our own, 1 is init.
    if type(pid) is not int or pid <= 1:
        return None
    started_at = raw.get("started_at")
    if not _is_number(started_at):
        return None  # every status the daemon writes has both: this one is not its
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return None
    except PermissionError:
        pass  # alive, owned by the service user

    def number(key: str) -> float | None:
        v = raw.get(key)
        return float(v) if _is_number(v) else None

    def counts(key: str) -> dict[str, int]:
        v = raw.get(key)
        if not isinstance(v, dict):
            return {}
        return {k: n for k, n in v.items() if isinstance(k, str) and type(n) is int}

    sources = raw.get("sources")
    uplink = raw.get("uplink")
    last_error = raw.get("last_error")
    relay_hold = raw.get("relay_hold")
    store_error = raw.get("store_error")
    threads = raw.get("threads")
    watch = raw.get("watch")
    return {
        "pid": pid,
        "started_at": float(started_at),
        "written_at": number("written_at"),
        "state_dir": sd if isinstance(sd := raw.get("state_dir"), str) else None,
        "rejected": counts("rejected"),
        "sanitised": counts("sanitised"),
        "ingested": counts("ingested"),
        "relay_attempts": counts("relay_attempts"),
        "last_success": number("last_success"),
        "last_error": last_error if isinstance(last_error, str) else None,
        "last_error_at": number("last_error_at"),
        "uplink": uplink if isinstance(uplink, str) else "unknown",
        "relay_hold": relay_hold if isinstance(relay_hold, str) else None,
        "next_probe_at": number("next_probe_at"),
        "sources": {k: v for k, v in sources.items() if isinstance(k, str) and isinstance(v, str)}
        if isinstance(sources, dict)
        else {},
        "outbox_full": raw.get("outbox_full") is True,
        "received": counts("received"),
        "store_failures": n if type(n := raw.get("store_failures")) is int else 0,
        "mqtt_redelivery_recognised": r
        if type(r := raw.get("mqtt_redelivery_recognised")) is int
        else 0,
        "store_error": store_error if isinstance(store_error, str) else None,
        "store_failing_since": number("store_failing_since"),
        "threads": {k: v for k, v in threads.items() if isinstance(k, str) and isinstance(v, str)}
        if isinstance(threads, dict)
        else {},
        "watch": {k: v for k, v in watch.items() if isinstance(k, str) and isinstance(v, str)}
        if isinstance(watch, dict)
        else {},
        "pace": _pace(raw.get("pace")),
        "drain": _drain(raw.get("drain")),
        "smarthosts": _smarthosts(raw.get("smarthosts")),
    }


def _smarthosts(raw: object) -> list[dict[str, Any]]:
    """Each smarthost's line (gateway/smarthost.py), keeping only well-typed values."""
    if not isinstance(raw, list):
        return []
    hosts = []
    for h in raw[:64]:
        if not isinstance(h, dict) or not isinstance(h.get("host"), str):
            continue
        text = {k: v if isinstance(v := h.get(k), str) else None for k in _HOST_TEXT}
        counts = {k: v if type(v := h.get(k)) is int else 0 for k in ("sessions", "limit", "sent")}
        at = h.get("next_probe_at")
        hosts.append(
            {
                **text,
                **counts,
                "active": h.get("active") is True,
                "next_probe_at": float(at) if _is_number(at) else None,
            }
        )
    return hosts


_HOST_TEXT = ("host", "role", "state", "last_error", "hold", "rate_limit")


def _pace(raw: object) -> dict[str, Any]:
    """The relay's smtp.rate_limit state, keeping only well-typed values."""
    if not isinstance(raw, dict) or not isinstance(raw.get("rate_limit"), str):
        return {}
    at = raw.get("next_send_at")
    waits = raw.get("waits")
    return {
        "rate_limit": raw["rate_limit"],
        "next_send_at": float(at) if _is_number(at) else None,
        "waits": waits if type(waits) is int else 0,
    }


def _drain(raw: object) -> dict[str, Any]:
    """The drain plan's folds so far (gateway/drainer.py), keeping only well-typed values;
    empty when smtp.drain_within is off."""
    if not isinstance(raw, dict) or not isinstance(raw.get("drain_within"), str):
        return {}
    last = raw.get("last")
    return {
        "drain_within": raw["drain_within"],
        **{k: v if type(v := raw.get(k)) is int else 0 for k in ("folds", "folded", "digests")},
        "last": float(last) if _is_number(last) else None,
    }


def report(
    db_path: Path,
    runtime_path: Path,
    live: dict[str, Any] | None = None,
    room: Room | None = None,
    state_dir: Path | None = None,
) -> dict[str, Any]:
    """The status report: DESIGN.md's keys first, then the details.

    `live` is the daemon's own snapshot (when the daemon reports on itself);
    otherwise the runtime file of a running daemon is read. `room`: the [outbox]
    shares, for the room each kind holds and may hold ("room").
    """
    result: dict[str, Any] = {}
    if db_path.exists():
        conn = outbox.connect(db_path, readonly=True)
        try:
            result.update(outbox.counts(conn))
            if room is not None:
                result["room"] = room_report(room, held(conn))
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
    # The state_dir the outbox is in, when the caller did not name it.
    other = other_daemon(rt, state_dir or db_path.parent, runtime_path)
    if other is not None:
        rt = None  # its counters and pid are not this outbox's
    result["daemon"] = {
        "running": rt is not None,
        "pid": rt["pid"] if rt else None,
        "uptime_s": time.time() - rt["started_at"] if rt else None,
    }
    if other is not None:
        result["daemon"]["ignored"] = other
    for key in (
        "last_success",
        "last_error",
        "last_error_at",
        "uplink",
        "relay_hold",
        "next_probe_at",
        "sources",
        "relay_attempts",
        "ingested",
        "sanitised",
        "outbox_full",
        "store_failures",
        "mqtt_redelivery_recognised",
        "store_error",
        "store_failing_since",
        "threads",
        "watch",
        "pace",
        "drain",
        "smarthosts",
    ):
        result[key] = rt.get(key) if rt else None
    result["rejected"] = rt.get("rejected", {}) if rt else {}
    return result


def _host_lines(hosts: list[dict[str, Any]]) -> list[str]:
    """One line per smarthost, when there are several or one sends in parallel."""
    if len(hosts) < 2 and all((h.get("limit") or 1) <= 1 for h in hosts):
        return []
    lines = []
    failover = any(h.get("state") == "up" for h in hosts)
    for h in hosts:
        state = printable(h.get("state") or "unknown")
        if state != "up" and (at := h.get("next_probe_at")):
            state += f", {_next_try(at, failover)}"
        mark = "*" if h.get("active") else " "
        line = (
            f"smarthost {mark}{printable(h['host'])} ({printable(h.get('role') or '?')}): "
            f"{state}; {h.get('sessions', 0)} of {h.get('limit', 1)} sessions open, "
            f"{h.get('sent', 0)} sent"
        )
        if h.get("last_error") and h.get("state") != "up":
            line += f"; last error: {printable(h['last_error'])}"
        lines.append(line)
    return lines


def _next_try(at: float, failover: bool) -> str:
    """When a held smarthost is tried again. Once its wait is over while another one
    carries the mail, it is tried with the next session the relay opens (at once when
    mail waits): said so, not as a countdown stuck at 0 s."""
    left = at - time.time()
    if left >= 1:
        return f"next try in {_age(left)}"
    return "tried again with the next message" if failover else "next try now"


def _room_lines(room: dict[str, Any]) -> list[str]:
    """Each kind's room (gateway/outbox/room.py): alerts may use what local mail leaves."""
    a, loc, u = room["alerts"], room["local"], room["unrouted"]
    return [
        f"room       {room['free']} of {room['max_messages']} free, alerts use {a['used']}",
        f"           local mail {loc['used']} of {loc['limit']} ({loc['per_user_limit']} per user)",
        f"           unrouted readings {u['used']} of {u['limit']}, kept for {_age(u['keep_s'])}",
    ]


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


# What must not reach a terminal raw: C0 and C1 controls and DEL (a CR rewrites the
# line, ESC and CSI (0x9b) start escape sequences that clear the screen or retitle the
# window), the Unicode line separators, and the bidi overrides that reorder what is
# shown. SMTP replies (last_error) and sensor text are hostile by assumption.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(m: re.Match[str]) -> str:
    c = m.group()
    return _SHORT_ESCAPES.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def printable(text: object) -> str:
    """`text` for a terminal: control characters as visible escapes (\\r, \\x1b, \\u202e)."""
    return _UNPRINTABLE.sub(_escape, str(text))


def render(r: dict[str, Any]) -> str:
    d = r["daemon"]
    lines = [
        f"daemon     {'running, pid ' + str(d['pid']) + ', up ' + _age(d['uptime_s']) if d['running'] else 'not running'}",  # noqa: E501
        f"queue      {r['queued']} queued ({r['deferred']} deferred), {r['sending']} sending, "
        f"{r['dead']} dead",
        f"           {r.get('held', 0)} held aside (they crashed the gateway; `queue list`)",
        f"           {r['unrouted']} unrouted, {r['sent']} sent (kept for the retention period)",
        f"           {r.get('suppressed', 0)} held by storm control (for a lead mail or digest)",
    ]
    if r.get("queued_by_priority"):
        prios = ", ".join(
            f"p{p}: {n}" for p, n in sorted(r["queued_by_priority"].items(), reverse=True)
        )
        lines.append(f"priority   {prios}")
    lines.append(f"oldest     {_age(r['oldest_queued_age_s'])} queued")
    if d.get("ignored"):
        lines.append(f"           ({printable(d['ignored'])})")
    if room := r.get("room"):
        lines += _room_lines(room)
    if d["running"]:
        uplink = printable(r.get("uplink") or "unknown")
        if uplink in ("down", "auth_failed", "paused", "throttled") and r.get("next_probe_at"):
            uplink += f", next try in {_age(max(0.0, r['next_probe_at'] - time.time()))}"
        lines.append(f"uplink     {uplink}")
        if r.get("relay_hold") and uplink != "up":
            lines.append(
                f"HELD       {printable(r['relay_hold'])} (the queue is kept; `mailgw flush` "
                "retries now)"
            )
        if pace := r.get("pace"):
            at = pace.get("next_send_at")
            left = 0.0 if at is None else at - time.time()
            when = f"in {_age(left)}" if left >= 0.5 else "now"
            lines.append(
                f"pace       {printable(pace['rate_limit'])} (smtp.rate_limit), next send {when}"
                f"; {pace.get('waits', 0)} waits for it"
            )
        lines += _host_lines(r.get("smarthosts") or [])
        if (drain := r.get("drain")) and drain.get("folds"):
            lines.append(
                f"drain      {drain['folded']} alerts folded into {drain['digests']} digests in "
                f"{drain['folds']} folds (smtp.drain_within {printable(drain['drain_within'])}),"
                f" last {_when(drain.get('last'))}"
            )
        lines.append(f"success    {_when(r.get('last_success'))}")
        err = r.get("last_error")
        err_text = f"{printable(err)} at {_when(r.get('last_error_at'))}" if err else "none"
        lines.append(f"error      {err_text}")
        if r.get("outbox_full"):
            lines.append("FULL       the outbox is full: sources are not acknowledging")
        if r.get("store_error"):
            lines.append(
                f"STORE      failing since {_when(r.get('store_failing_since'))}: "
                f"{printable(r['store_error'])} (alerts stay unacknowledged and are retried)"
            )
        dead = {k: v for k, v in (r.get("threads") or {}).items() if v != "alive"}
        if dead:
            lines.append(
                "THREADS    "
                + ", ".join(f"{printable(k)} {printable(v)}" for k, v in sorted(dead.items()))
            )
        sources = r.get("sources") or {}
        if sources:
            lines.append(
                "sources    "
                + ", ".join(f"{printable(k)} {printable(v)}" for k, v in sorted(sources.items()))
            )
        watch = sorted((r.get("watch") or {}).items())
        if watch:  # silent sources, raised self-alerts (gateway/watch.py)
            shown = ", ".join(f"{printable(k)} {printable(v)}" for k, v in watch[:10])
            more = f" and {len(watch) - 10} more" if len(watch) > 10 else ""
            lines.append(f"watch      {shown}{more}")
    rejected = r.get("rejected") or {}
    lines.append(
        "rejected   "
        + (", ".join(f"{printable(k)}: {v}" for k, v in sorted(rejected.items())) or "none")
    )
    if r.get("outbox_error"):
        lines.append(f"outbox     {printable(r['outbox_error'])}")
    return "\n".join(lines)
