"""`mailgw queue list|show|retry|delete|dead|export|salvage`: the outbox from the command line.

The queries themselves live in gateway.outbox and gateway.salvage; this module opens
the outbox as its owner, calls them, and prints what they return for a terminal.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Imported here, not in the functions: `as_outbox_owner` gives up root for the outbox's
# owner, who may not be able to read the installed code (a checkout under /root), so
# nothing may be imported after it.
from gateway import outbox
from gateway.cli_signal import signal_daemon
from gateway.config import Config, load
from gateway.errors import GatewayError
from gateway.outbox import Outbox
from gateway.outbox.room import room_of
from gateway.routing import Router
from gateway.salvage import salvage
from gateway.status import printable

if TYPE_CHECKING:
    import sqlite3


def as_outbox_owner(cfg: Config) -> None:
    """Run as the owner of state_dir when started as root (`sudo mailgw queue ...`).

    SQLite creates outbox.db-wal and -shm beside the database when it is not open
    elsewhere; root-owned ones would lock the daemon (user mailgw) out of its own outbox.
    """
    if os.geteuid() != 0:
        return
    try:
        st = cfg.gateway.state_dir.stat()
    except OSError:
        return
    if st.st_uid != 0:
        os.setgroups([])
        os.setgid(st.st_gid)
        os.setuid(st.st_uid)


def open_outbox(cfg: Config, *, storm: bool = False) -> Outbox:
    """The outbox, opened by a command beside the daemon: as the outbox's owner, and
    without recovery (the daemon's `sending` rows are live). `storm`: with the routes'
    storm control, for commands that add alerts."""
    as_outbox_owner(cfg)
    return Outbox(
        cfg.outbox_path,
        max_messages=cfg.outbox.max_messages,
        allow_volatile=cfg.outbox.allow_volatile,
        recover=False,
        policies=cfg.storm_policies if storm else None,
        room=room_of(cfg.outbox),
    )


# json.dumps escapes C0 controls itself; with ensure_ascii=False (readable non-ASCII
# text) DEL, the C1 controls (0x9b is CSI), the line separators and the bidi
# overrides would still reach the terminal raw. Outside strings JSON has none of
# them, so escaping them as \uXXXX keeps the output the same JSON value.
_JSON_RAW = re.compile(r"[\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _terminal_json(value: object) -> str:
    text = json.dumps(value, indent=2, ensure_ascii=False)
    return _JSON_RAW.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _open_rw(cfg: Config) -> sqlite3.Connection:

    if not cfg.outbox_path.exists():
        raise GatewayError(f"{cfg.outbox_path} does not exist: nothing is queued yet")
    as_outbox_owner(cfg)
    return outbox.connect(cfg.outbox_path)


def cmd_salvage(cfg: Config, source: str | None) -> int:
    """Re-queue the undelivered alerts of a moved-aside (corrupt) outbox."""
    import sqlite3

    if not source or not Path(source).is_file():
        print(
            "mailgw queue salvage: give the moved-aside file, e.g. "
            f"{cfg.outbox_path}.corrupt-20260101T000000",
            file=sys.stderr,
        )
        return 2
    ob = open_outbox(cfg)
    router = Router(cfg.routes, cfg.gateway.default_route)
    try:
        report = salvage(Path(source), ob, router.route)
    except sqlite3.DatabaseError as exc:
        print(f"mailgw queue salvage: {source} cannot be read at all: {exc}", file=sys.stderr)
        return 1
    finally:
        ob.close()
    for err in report.errors:
        print(f"damaged: {err}", file=sys.stderr)
    print(
        f"{report.requeued} alerts queued again (same ids and Message-IDs), "
        f"{report.already_queued} already in the outbox, "
        f"{report.unknown_state} of them with unreadable delivery state (queued for their "
        f"routes now; may have been sent before), "
        f"{report.held} deliveries held aside again as they were there (poison: "
        "`mailgw queue retry ID` releases one), "
        f"{report.unreadable} undelivered alerts could not be read"
    )
    signal_daemon(cfg, quiet=True)
    if report.damaged:
        print(
            "mailgw queue salvage: the file is damaged; what could be read is queued again",
            file=sys.stderr,
        )
        return 1
    return 0


def _print_rows(rows: list[dict[str, Any]]) -> None:

    # Message and last_error are a sensor's and an SMTP server's words: shown
    # with their control characters escaped, so they cannot move the cursor,
    # clear the screen or forge other rows.
    print(f"{'ID':36}  {'STATE':8} {'ROUTE':10} {'TRIES':>5}  {'AGE':>6}  MESSAGE")
    for r in rows:
        age = time.time() - r["received_at"]
        msg = printable(r["message"].replace("\n", " ")[:40])
        print(
            f"{printable(r['id']):36}  {r['state']:8} {printable(r['route'][:10]):10} "
            f"{r['attempts']:5}  {int(age // 60):5}m  {msg}"
        )
        if r["last_error"]:
            print(f"{'':38}└ {printable(r['last_error'][:70])}")


def _queue_list(conn: sqlite3.Connection, args: argparse.Namespace) -> int:

    states = (
        ["dead"]
        if args.action == "dead"
        else ([args.state] if args.state else ["queued", "sending", "held", "dead", "unrouted"])
    )
    rows = outbox.listing(conn, states, args.limit)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no messages in state {', '.join(states)}")
        return 0
    _print_rows(rows)
    return 0


EXPORT_FIELDS = (
    "id",
    "state",
    "route",
    "priority",
    "attempts",
    "last_error",
    "received_at",
    "received_at_utc",
    "updated_at",
    "topic",
    "source",
    "sensor",
    "severity",
    "message",
)
# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection);
# alert text and server replies come from outside, so such a cell gets a leading '.
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def _utc(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))


def _queue_export(conn: sqlite3.Connection, args: argparse.Namespace) -> int:
    """The outbox as JSON or CSV on stdout, for a ticket: every state unless --state.
    JSON escapes every control and non-ASCII character; CSV keeps the text as it is,
    for a file (on a terminal its control characters are shown escaped)."""
    rows = outbox.export(conn, [args.state] if args.state else list(outbox.STATES))
    out = sys.stdout
    if args.format == "json":
        out.write("[")
        for n, row in enumerate(rows):
            row["received_at_utc"] = _utc(row["received_at"])
            out.write(("," if n else "") + "\n  " + json.dumps({k: row[k] for k in EXPORT_FIELDS}))
        out.write("\n]\n")
        return 0
    writer = csv.writer(out)
    writer.writerow(EXPORT_FIELDS)
    for row in rows:
        row["received_at_utc"] = _utc(row["received_at"])
        cells = []
        for key in EXPORT_FIELDS:
            value = row[key]
            if isinstance(value, str):
                value = printable(value) if out.isatty() else value
                value = "'" + value if value.startswith(_FORMULA) else value
            cells.append("" if value is None else value)
        writer.writerow(cells)
    return 0


def _queue_show(conn: sqlite3.Connection, args: argparse.Namespace) -> int:

    found = outbox.find(conn, args.id)
    if found is None:
        print(f"no alert with id {args.id}", file=sys.stderr)
        return 1
    alert, deliveries = found
    print(
        _terminal_json(
            {
                "id": alert.id,
                "topic": alert.topic,
                "source": alert.source,
                "sensor": alert.sensor,
                "severity": str(alert.severity),
                "message": alert.message,
                "event_time": alert.event_time,
                "received_at": alert.received.wall,
                "clock_synced": alert.received.synced,
                "fields": dict(alert.fields),
                "notes": list(alert.notes),
                "deliveries": deliveries,
            }
        )
    )
    return 0


def _queue_retry(conn: sqlite3.Connection, args: argparse.Namespace, cfg: Config) -> int:

    if not args.all and not args.id:
        print("mailgw queue retry: give an ID or --all", file=sys.stderr)
        return 2
    n = outbox.retry(conn, None if args.all else args.id)
    print(f"{n} deliveries queued for immediate retry")
    signal_daemon(cfg, quiet=True)
    return 0 if n or args.all else 1


def _queue_delete(conn: sqlite3.Connection, args: argparse.Namespace) -> int:

    n = outbox.delete(conn, args.id)
    if not n:
        print(f"no alert with id {args.id}", file=sys.stderr)
        return 1
    print(f"deleted alert {args.id} and its {n} deliveries")
    return 0


def cmd_queue(args: argparse.Namespace) -> int:
    cfg = load(args.config)
    if args.action == "salvage":
        return cmd_salvage(cfg, args.id)
    conn = _open_rw(cfg)
    try:
        if args.action in ("list", "dead"):
            return _queue_list(conn, args)
        if args.action == "export":
            return _queue_export(conn, args)
        if args.action == "show":
            return _queue_show(conn, args)
        if args.action == "retry":
            return _queue_retry(conn, args, cfg)
        if args.action == "delete":
            return _queue_delete(conn, args)
    finally:
        conn.close()
    return 2
