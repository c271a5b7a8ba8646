"""`sendmail -bp` / `mailq`: the local mail still waiting, for root (or mailgw).

It reads the outbox (mode 0700, owned by mailgw) read-only, and lists the maildrop
(which only its owner may list): both need root (or mailgw). Any other user is told
so in one sentence, with EX_NOPERM (77), before the configuration is even read. The config is
/etc/mailgw/gateway.toml, or $MAILGW_CONFIG.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from pathlib import Path

from gateway.cli_signal import status_path
from gateway.config import ConfigError, load
from gateway.outbox.raw import waiting

EX_NOPERM = 77
EX_CONFIG = 78
HEADER = f"{'Queue ID':>8} {'Size':>9} {'State':<9} {'Route':<12} Sender\n"


def list_waiting(maildrop: str) -> int:
    # Asked first: a user who may not see the queue gets the one sentence that helps,
    # not an error about the configuration file they cannot read either.
    try:
        spooled = [n for n in os.listdir(maildrop) if not n.startswith(".")]
    except PermissionError:
        sys.stderr.write(
            "mailq: only root (and mailgw) may see the local mail queue: run sudo mailq\n"
        )
        return EX_NOPERM
    except OSError as exc:
        sys.stderr.write(f"mailq: cannot list {maildrop} ({exc.strerror}); is mailgw installed?\n")
        return EX_NOPERM
    try:
        cfg = load(os.environ.get("MAILGW_CONFIG") or None)
    except ConfigError as exc:
        sys.stderr.write(f"mailq: {exc}\n")
        return EX_CONFIG
    path = cfg.outbox_path
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        rows = waiting(conn)
        conn.close()
    except sqlite3.Error as exc:
        sys.stderr.write(f"mailq: cannot read the outbox {path} ({exc}): run sudo mailq\n")
        return EX_NOPERM
    out = sys.stdout
    if spooled:
        out.write(f"{len(spooled)} message(s) in {maildrop}, not yet picked up by the daemon\n")
    if not rows and not spooled:
        out.write("Mail queue is empty\n")
    if rows:
        out.write(HEADER)
    for seq, state, size, sender, route, error in rows:
        out.write(f"{seq:>8} {size:>9} {state:<9} {route or '-':<12} {sender or '-'}\n")
        # Why it waits: the last answer of the smarthost (or the relay's own reason).
        why = " ".join(error.split())[:200] if error else "not tried yet"
        out.write(f"{'':>8} (waiting: {why})\n")
    if rows:
        out.write(f"-- {len(rows)} message(s) waiting in the outbox\n")
        if relay := _relay_reason(status_path(cfg)):
            out.write(f"-- the relay: {relay}\n")
    return 0


def _relay_reason(path: Path) -> str:
    """Why the relay holds mail it has not tried (a smarthost down, offline): the
    daemon's status file, which the rows do not carry. Empty if nothing is known."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return "unknown: the daemon's status file cannot be read (is mailgw running?)"
    if not isinstance(data, dict):
        return ""
    reasons: list[str] = []
    for host in data.get("smarthosts") or []:
        if isinstance(host, dict) and host.get("last_error"):
            reasons.append(str(host["last_error"]))
    if not reasons and data.get("last_error"):
        reasons.append(str(data["last_error"]))
    return " ".join("; ".join(reasons).split())[:300]
