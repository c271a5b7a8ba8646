"""`sendmail` injections per second from a shell loop, against a bare interpreter.

What cron and friends pay per mail: a shell loop runs the shipped launcher
(deploy/sendmail, i.e. `python -IS`, here without -I so that PYTHONPATH finds the
worktree) N times, each with a small message on stdin; the ceiling is the same loop
running `python -c` doing one sqlite3 commit with synchronous=FULL (the cheapest
durable thing a Python process can do). Goal: >= 0.8 of it. The maildrop is a
directory as the package makes it (3733); nothing picks the files up.

python -m bench sendmail       (MAILGW_BENCH_SENDMAIL=N to change the 200)
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import row

ROOT = Path(__file__).resolve().parent.parent
N = int(os.environ.get("MAILGW_BENCH_SENDMAIL", "200"))
RAW = (
    "import sqlite3, sys; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
    "c.execute('PRAGMA journal_mode=WAL'); c.execute('PRAGMA synchronous=FULL'); "
    "c.execute('CREATE TABLE IF NOT EXISTS t (x)'); c.execute('INSERT INTO t VALUES (1)')"
)


def _loop(body: str, env: dict[str, str]) -> float:
    """Runs per second of `body` in a shell loop of N."""
    script = f"i=0; while [ $i -lt {N} ]; do {body} || exit 1; i=$((i+1)); done"
    t0 = time.perf_counter()
    subprocess.run(["sh", "-c", script], check=True, env=env)
    return N / (time.perf_counter() - t0)


def run() -> list[dict[str, Any]]:
    py = shlex.quote(sys.executable)
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        drop = Path(d) / "maildrop"
        drop.mkdir()
        drop.chmod(0o3733)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "MAILGW_MAILDROP": str(drop)}
        launcher = shlex.quote(str(ROOT / "deploy" / "sendmail"))
        mail = "printf 'To: root\\nSubject: cron\\n\\nhello\\n'"
        ours = _loop(f"{mail} | {py} -S {launcher} -t -oi", env)
        dropped = len([n for n in os.listdir(drop) if not n.startswith(".")])
        assert dropped == N, f"{dropped} of {N} mails in the maildrop"
        db = shlex.quote(str(Path(d) / "raw.db"))
        raw = _loop(f"{py} -c {shlex.quote(RAW)} {db}", env)
        raw_nosite = _loop(f"{py} -S -c {shlex.quote(RAW)} {db}", env)
    return [
        row(
            "sendmail injections from a shell loop",
            ours,
            "mails/s",
            raw,
            "python -c: one FULL commit per process",
            goal=">= 0.8",
        ),
        row(
            "the same, against python -S -c (no site)",
            ours,
            "mails/s",
            raw_nosite,
            "python -S -c: one FULL commit",
        ),
    ]
