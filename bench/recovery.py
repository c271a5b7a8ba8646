"""Recovery after an outage, duplicates per crash, and what probing costs.

`recovery`: the real daemon (production probe settings: probe_max 60 s, timeout 30 s),
20 alerts queued as the smarthost goes away; the outage is either refused (the server
is down: connections refused) or blackholed (iptables drops the port's packets on
loopback, as a cellular link that stops passing traffic does). Reported: seconds from
the path's return to the first and the last delivery. Goal: median <= 5 s, max <= 10 s
for every row (Postfix's defaults: 300-600 s; nullmailer: 60 s).

`probe traffic`: bytes on the wire to and from the smarthost's port during the longest
outage of each kind after its first minute (which holds a stalled session's
retransmissions, not probing), per hour (iptables counters, IP headers included; goal
<= 50 KB/h).

`crash`: 400 alerts queued, a slow smarthost (20 ms per mail), the daemon killed with
-9 four times during the drain: duplicate mails per kill (goal <= 1; Postfix 0).

MAILGW_BENCH_OUTAGES="5,60" shortens the run (the default adds 300 s outages).
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import row
from gateway.alert import Draft, normalize
from gateway.outbox import Outbox, Routed
from tests.parts import DaemonProcess, SmtpServer, make_pki, wait_for


def config(tmp: Path, pki: Any, port: int) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    pw = tmp / "pw"
    pw.write_text("s3cret\n")
    pw.chmod(0o600)
    cfg = tmp / "gw.toml"
    cfg.write_text(
        f'[gateway]\ndevice_id = "bench"\nstate_dir = "{tmp}/state"\nruntime_dir = "{tmp}/run"\n'
        f'[smtp]\nhost = "127.0.0.1"\nport = {port}\nfrom = "gw@example.com"\n'
        f'username = "gw@example.com"\npassword_file = "{pw}"\nca_file = "{pki.ca_file}"\n'
        '[[route]]\nname = "ops"\nmatch = "#"\nto = ["ops@example.com"]\n'
    )
    return cfg


def queue(db: Path, n: int, tag: str) -> None:
    ob = Outbox(db)
    ob.add(
        [
            Routed(normalize(f"{tag} {i}".encode(), Draft("alerts/b", "mqtt")), (("ops", 2),))
            for i in range(n)
        ]
    )
    ob.close()


def iptables(*args: str) -> None:
    subprocess.run(["iptables", *args], check=True, capture_output=True)


@contextlib.contextmanager
def counted(port: int) -> Iterator[list[int]]:
    """Count bytes to and from `port` on loopback while the block runs."""
    rules = [
        ("OUTPUT", "-o", "lo", "-p", "tcp", "--dport", str(port), "-j", "ACCEPT"),
        ("OUTPUT", "-o", "lo", "-p", "tcp", "--sport", str(port), "-j", "ACCEPT"),
    ]
    for r in rules:
        iptables("-I", *r)
    total = [0]
    try:
        yield total
    finally:
        out = subprocess.run(
            ["iptables", "-L", "OUTPUT", "-v", "-n", "-x"], capture_output=True, text=True
        ).stdout
        for line in out.splitlines():
            if f"dpt:{port}" in line or f"spt:{port}" in line:
                total[0] += int(line.split()[1])
        for r in rules:
            iptables("-D", *r)


@contextlib.contextmanager
def blackhole(port: int) -> Iterator[None]:
    rule = ("INPUT", "-i", "lo", "-p", "tcp", "--dport", str(port), "-j", "DROP")
    rule2 = ("INPUT", "-i", "lo", "-p", "tcp", "--sport", str(port), "-j", "DROP")
    iptables("-I", *rule)
    iptables("-I", *rule2)
    try:
        yield
    finally:
        iptables("-D", *rule)
        iptables("-D", *rule2)


SETTLE = 60.0  # the outage's first minute: a stalled session's retransmissions, not probes


def outage(tmp: Path, pki: Any, kind: str, seconds: float) -> tuple[float, float, float]:
    """(seconds to first, to last delivery after the return, probe bytes per hour once
    the relay has settled into probing: the outage's first minute is not counted)."""
    with SmtpServer(pki, "starttls") as smtp:
        cfg = config(tmp, pki, smtp.port)
        gw = DaemonProcess(cfg, tmp / "daemon.log").start()
        try:
            gw.wait_ready()
            queue(tmp / "state" / "outbox.db", 1, f"{kind}{seconds} warm-up")
            wait_for(lambda: len(smtp.received) == 1, 30, "the warm-up mail")
            if kind == "refused":
                smtp.stop()
                cm: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
            else:
                cm = blackhole(smtp.port)
            settle = SETTLE if seconds > 2 * SETTLE else 0.0
            with cm:
                queue(tmp / "state" / "outbox.db", 20, f"{kind}{seconds}")
                time.sleep(settle)
                with counted(smtp.port) as traffic:
                    time.sleep(seconds - settle)
                if kind == "refused":
                    smtp.start()
            back = time.monotonic()
            got = smtp.wait_for(21, timeout=600)
            first, last = (r.at - back for r in (got[1], got[-1]))
        finally:
            gw.terminate()
    shutil.rmtree(tmp / "state", ignore_errors=True)
    return max(0.0, first), max(0.0, last), traffic[0] * 3600 / (seconds - settle)


def crash(tmp: Path, pki: Any) -> tuple[int, int]:
    with SmtpServer(pki, "starttls") as smtp:
        smtp.script.data_delay = 0.02
        cfg = config(tmp, pki, smtp.port)
        queue(tmp / "state" / "outbox.db", 400, "crash")
        gw = DaemonProcess(cfg, tmp / "daemon.log").start()
        kills = 4
        for k in range(1, kills + 1):
            wait_for(lambda k=k: len(smtp.received) >= k * 80, 120, "the drain")
            gw.kill9()
            gw.start()
        wait_for(lambda: len({r.message_id for r in smtp.received}) == 400, 120, "all 400")
        gw.terminate()
        ids = collections.Counter(r.message_id for r in smtp.received)
    return sum(n - 1 for n in ids.values()), kills


def run() -> list[dict[str, Any]]:
    lengths = [float(x) for x in os.environ.get("MAILGW_BENCH_OUTAGES", "5,60,300").split(",")]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        pki = make_pki(tmp / "pki")
        dup, kills = crash(tmp / "crash", pki)
        rows.append(row("crash: duplicate mails per kill -9", dup / kills, "mails", goal="<= 1"))
        have_iptables = shutil.which("iptables") is not None and os.geteuid() == 0
        longest = max(lengths)
        times: list[float] = []
        for kind in ("refused", "blackholed"):
            if kind == "blackholed" and not have_iptables:
                print("  recovery: no iptables (or not root): blackholed outages skipped")
                continue
            for seconds in lengths:
                first, last, traffic = outage(tmp / f"{kind}{seconds}", pki, kind, seconds)
                times += [first, last]
                if seconds == longest and have_iptables:
                    # A long outage: what probing costs once the first attempts are over.
                    rows.append(
                        row(
                            f"probe traffic, {kind} {seconds:.0f} s outage",
                            traffic / 1000,
                            "KB/h",
                            goal="<= 50 KB/h",
                        )
                    )
                print(f"  recovery: {kind} {seconds:.0f} s: first {first:.1f} s, last {last:.1f} s")
                rows.append(
                    row(f"recovery, {kind} {seconds:.0f} s: first", first, "s", goal="<= 5 s")
                )
                rows.append(
                    row(f"recovery, {kind} {seconds:.0f} s: last", last, "s", goal="<= 10 s")
                )
        if times:
            rows.append(
                row("recovery: median of all rows", statistics.median(times), "s", goal="<= 5 s")
            )
            rows.append(row("recovery: max of all rows", max(times), "s", goal="<= 10 s"))
    return rows
