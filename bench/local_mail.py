"""Peak RSS of the daemon relaying max_size local mails of the worst shapes.

The real daemon, a real smarthost (aiosmtpd, STARTTLS) that takes what the gateway
takes, and `sendmail -t` injecting three 10 MiB messages (sendmail.max_size's
default): 10 MiB of empty lines, a header block just inside its bounds (1000 fields,
1 MiB) over short lines, and one 10 MiB line. Each must arrive; the figure is the
daemon's VmHWM after all three. The ceiling is its idle peak; the goal, under 64 MiB
for the whole process (the unit's MemoryHigh is 96M).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiosmtpd.smtp

from bench.common import row
from bench.memory import vm
from gateway.lab import SmtpServer, make_pki
from gateway.maildrop_parse import MAX_FIELDS, MAX_HEADER
from tests.parts import DaemonProcess, daemon_config, wait_for

MIB = 1024 * 1024
MAX_SIZE = 10 * MIB
ROOT = Path(__file__).resolve().parent.parent


def shapes() -> dict[str, bytes]:
    top = b"To: root\nSubject: %s\n\n"
    half = b"a" * ((MAX_HEADER // MAX_FIELDS - 40) // 2)
    pad = b"X-Pad: " + half + b"\n " + half + b"\n"
    big_head = b"To: root\nSubject: big-header\n" + pad * (MAX_FIELDS - 10) + b"\n"
    fill = MAX_SIZE - 4096
    return {
        "short-lines": top % b"short-lines" + b"\n" * (fill - 64),
        "big-header": big_head + b"x\n" * ((fill - len(big_head)) // 2),
        "one-line": top % b"one-line" + b"y" * (fill - 64) + b"\n",
    }


def run() -> list[dict[str, Any]]:
    old_limit = aiosmtpd.smtp.SMTP.line_length_limit
    aiosmtpd.smtp.SMTP.line_length_limit = 2 * MAX_SIZE  # type: ignore[misc]
    try:
        with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
            tmp = Path(d)
            pki = make_pki(tmp / "pki")
            with SmtpServer(pki, "starttls") as smtp:
                assert smtp._controller is not None
                smtp._controller.SMTP_kwargs["data_size_limit"] = 4 * MAX_SIZE
                drop = tmp / "maildrop"
                drop.mkdir()
                drop.chmod(0o3733)
                cfg = daemon_config(tmp, pki, smtp.port)
                cfg.write_text(
                    cfg.read_text().replace('timeout = "1s"', 'timeout = "60s"')
                    + f'[sendmail]\nmaildrop = "{drop}"\n[sendmail.aliases]\n"*" = "ops"\n'
                )
                gw = DaemonProcess(cfg, tmp / "daemon.log").start()
                gw.wait_ready()
                assert gw.proc is not None
                time.sleep(1.0)
                idle = vm(gw.proc.pid, "VmHWM")
                env = {**os.environ, "PYTHONPATH": str(ROOT), "MAILGW_MAILDROP": str(drop)}
                t0 = time.perf_counter()
                for message in shapes().values():
                    subprocess.run(
                        [sys.executable, "-m", "gateway.sendmail", "-t", "-oi"],
                        input=message,
                        check=True,
                        env=env,
                    )
                wait_for(lambda: len(smtp.received) >= 3 or not gw.alive, timeout=300)
                took = time.perf_counter() - t0
                assert gw.alive, gw.log_text()[-2000:]
                peak = vm(gw.proc.pid, "VmHWM")
                gw.terminate()
    finally:
        aiosmtpd.smtp.SMTP.line_length_limit = old_limit  # type: ignore[misc]
    print(f"  local mail: idle peak {idle / 1024:.1f} MiB; relaying {peak / 1024:.1f} MiB")
    return [
        row(
            "daemon peak RSS, 3 worst 10 MiB local mails",
            peak / 1024,
            "MiB",
            ceiling=idle / 1024,
            ceiling_name="idle peak RSS",
            goal="< 64 MiB",
        ),
        row("3 worst 10 MiB local mails relayed in", took, "s"),
    ]
