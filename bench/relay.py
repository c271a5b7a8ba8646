"""Relay benchmark: alerts/s through the relay vs raw aiosmtplib, on one reused session
and on 4 (smtp.sessions = 4 against 4 raw connections sending in parallel).

Both talk STARTTLS + AUTH to the same aiosmtpd server in the same run; the server
runs in this process (a thread) and then in a separate process.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from bench.common import row
from gateway.alert import Draft, Severity, normalize
from gateway.config import parse
from gateway.lab import Pki, SmtpServer, free_port, make_pki
from gateway.outbox import Outbox, Routed
from gateway.outbox.writer import Writer
from gateway.relay import Relay
from gateway.routing import Router
from gateway.runtime import Runtime
from gateway.smtp import SmtpSession

N = 1000


def _config(tmp: Path, pki: Pki, port: int, pw: Path, sessions: int = 1) -> str:
    return (
        f'[gateway]\ndevice_id = "bench"\nstate_dir = "{tmp}/state-{time.monotonic_ns()}"\n'
        f'runtime_dir = "{tmp}/run"\n[outbox]\nallow_volatile = true\n'
        f'[smtp]\nhost = "127.0.0.1"\nport = {port}\nfrom = "gw@example.com"\n'
        f'username = "gw@example.com"\npassword_file = "{pw}"\nca_file = "{pki.ca_file}"\n'
        f"batch = 200\nsessions = {sessions}\n"
        '[[route]]\nname = "ops"\nmatch = "#"\nto = ["ops@example.com"]\n'
    )


def raw_rate(text: str, connections: int = 1) -> float:
    """The ceiling: `connections` reused STARTTLS+AUTH sessions, each send_message in a
    loop, N mails in all."""
    cfg = parse(text)
    assert cfg.smtp is not None
    smtp = cfg.smtp

    async def one(session: SmtpSession, count: int) -> None:
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = "gw@example.com", "ops@example.com", "raw"
        msg.set_content("x" * 400)
        for _ in range(count):
            await session.send(msg, "gw@example.com", ("ops@example.com",))

    async def go() -> float:
        sessions = [SmtpSession(smtp, "bench") for _ in range(connections)]
        await asyncio.gather(*(s.open() for s in sessions))
        t0 = time.perf_counter()
        await asyncio.gather(*(one(s, N // connections) for s in sessions))
        rate = N // connections * connections / (time.perf_counter() - t0)
        await asyncio.gather(*(s.close() for s in sessions))
        return rate

    return asyncio.run(go())


def relay_rate(text: str) -> float:
    cfg = parse(text)
    ob = Outbox(cfg.outbox_path, max_messages=10**6, allow_volatile=True)
    draft = Draft("alerts/bench/x", "mqtt", "x", Severity.WARNING)
    router = Router(cfg.routes)
    ob.add(
        [
            Routed(a, router.route(a))
            for a in (normalize(f"{i} {'x' * 400}".encode(), draft) for i in range(N))
        ]
    )
    writer = Writer(ob)
    writer.start()
    relay = Relay(cfg, writer, router, Runtime())
    done = threading.Event()

    async def go() -> float:
        task = asyncio.create_task(relay.run())
        t0 = time.perf_counter()
        while relay.sent < N:
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - t0
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        done.set()
        return N / elapsed

    rate = asyncio.run(go())
    writer.stop()
    ob.close()
    return rate


@contextmanager
def server_in_process(pki: Pki) -> Iterator[int]:
    with SmtpServer(pki, "starttls") as server:
        yield server.port


@contextmanager
def server_in_subprocess(pki: Pki) -> Iterator[int]:
    port = free_port()
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from gateway.lab import Pki, SmtpServer\n"
        f"pki = Pki(Path({str(pki.ca_file)!r}), Path({str(pki.cert_file)!r}), "
        f"Path({str(pki.key_file)!r}))\n"
        f"s = SmtpServer(pki, 'starttls', port={port}).start()\n"
        "s.record = lambda item: None  # keep memory flat\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    proc.stdout.readline()
    try:
        yield port
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(10)


def run() -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        pki = make_pki(tmp / "pki")
        pw = tmp / "pw"
        pw.write_text("s3cret\n")
        pw.chmod(0o600)
        for where, server in (
            ("in-process server", server_in_process),
            ("server in a process", server_in_subprocess),
        ):
            with server(pki) as port:
                for sessions in (1, 4):
                    text = _config(tmp, pki, port, pw, sessions)
                    raw = raw_rate(text, sessions)
                    ours = relay_rate(text)
                    rows.append(
                        row(
                            f"relay x{sessions} STARTTLS+AUTH, {where}",
                            ours,
                            "alerts/s",
                            raw,
                            f"raw aiosmtplib, {sessions} reused connection(s)",
                            "ratio >= 0.8",
                        )
                    )
    return rows
