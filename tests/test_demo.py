"""`mailgw demo --ci`: the first five minutes of a new user, as a test."""

from __future__ import annotations

import os
import re
from pathlib import Path

from tests.conftest import run_cli


def processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{pid}: {cmdline}")
    return found


def test_demo_ci_delivers_everything_through_an_outage_and_cleans_up() -> None:
    r = run_cli("demo", "--ci", timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    demo_dir = re.search(r"mailgw demo in (\S+)", out)
    assert demo_dir is not None
    assert "uplink down" in out  # the outage was seen
    assert "demo ok" in out and "duplicates 0" in out
    m = re.search(r"(\d+) mails arrived at the smarthost", out)
    assert m is not None and int(m.group(1)) == 16
    assert processes_mentioning(demo_dir.group(1)) == []  # mosquitto, the gateway: all gone
