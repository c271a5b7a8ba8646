"""`sendmail -bp` / `mailq`: the local mail still waiting, for root (or mailgw).

It reads the outbox (mode 0700, owned by mailgw) read-only, and lists the maildrop
(which only its owner may list): both need root, and say so otherwise. The config is
/etc/mailgw/gateway.toml, or $MAILGW_CONFIG.
"""

from __future__ import annotations

import os
import sqlite3
import sys

from gateway.config import ConfigError, load
from gateway.outbox.raw import waiting


def list_waiting(maildrop: str) -> int:
    try:
        cfg = load(os.environ.get("MAILGW_CONFIG") or None)
    except ConfigError as exc:
        sys.stderr.write(f"mailq: {exc}\n")
        return 78  # EX_CONFIG
    try:
        spooled = [n for n in os.listdir(maildrop) if not n.startswith(".")]
    except OSError as exc:
        sys.stderr.write(f"mailq: cannot list {maildrop} ({exc.strerror}): run as root\n")
        return 77  # EX_NOPERM
    path = cfg.outbox_path
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        rows = waiting(conn)
        conn.close()
    except sqlite3.Error as exc:
        sys.stderr.write(f"mailq: cannot read the outbox {path} ({exc}): run as root\n")
        return 77
    out = sys.stdout
    if spooled:
        out.write(f"{len(spooled)} message(s) in {maildrop}, not yet picked up by the daemon\n")
    if not rows and not spooled:
        out.write("Mail queue is empty\n")
    for seq, state, size, sender, route, error in rows:
        out.write(f"{seq:>8} {size:>9} {state:<9} {route or '-':<12} {sender or '-'}\n")
        if error:
            out.write(f"{'':>8} ({error[:200]})\n")
    return 0
