"""Real parts for the tests: the daemon as a process, the relay in-process (`Gateway`),
plus gateway.lab's CA, smarthost and broker (shared with `mailgw demo`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from gateway import outbox as ob_mod
from gateway.alert import Alert, Draft, Severity, normalize
from gateway.config import Config, parse
from gateway.lab import (  # noqa: F401  (re-exported for the tests)
    Mosquitto,
    Pki,
    Received,
    SmtpServer,
    free_port,
    make_pki,
    mosquitto_binary,
)
from gateway.outbox import Outbox, Routed
from gateway.relay import Relay
from gateway.routing import Router
from gateway.status import Runtime
from gateway.writer import Writer


def wait_for(pred: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll with a deadline: the tests' one way to wait for an outcome."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# --- the relay in-process, against a real smarthost --------------------------------------


class Gateway:
    """Outbox + writer + relay, the relay in its own thread's event loop."""

    def __init__(
        self, tmp: Path, smtp_toml: str, routes: str | None = None, extra: str = ""
    ) -> None:
        routes = routes or '[[route]]\nname = "ops"\nmatch = "#"\nto = ["ops@example.com"]\n'
        text = (
            f'[gateway]\ndevice_id = "gw-1"\nstate_dir = "{tmp}/state"\n'
            f'runtime_dir = "{tmp}/run"\n{extra}\n[smtp]\n{smtp_toml}\n{routes}'
        )
        self.config: Config = parse(text)
        self.outbox = Outbox(self.config.outbox_path, max_messages=10**6)
        self.writer = Writer(self.outbox)
        self.writer.start()
        self.runtime = Runtime()
        self.router = Router(self.config.routes)
        self.relay = Relay(
            self.config, self.writer, self.router, self.runtime, rng=random.Random(7)
        )
        self.writer.on_commit = self.relay.wake_threadsafe
        self._loop = asyncio.new_event_loop()
        self._task: asyncio.Task[None] | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._task = self._loop.create_task(self.relay.run())
        with contextlib.suppress(asyncio.CancelledError):
            self._loop.run_until_complete(self._task)

    def start(self) -> Gateway:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(15)
        self.writer.stop()

    def add(self, *alerts: Alert) -> None:
        self.writer.call(
            lambda ob: ob.add([Routed(a, self.router.route(a)) for a in alerts])
        ).result(10)
        self.relay.wake_threadsafe()

    def counts(self) -> dict[str, object]:
        return self.writer.call(lambda ob: ob_mod.counts(ob.conn)).result(10)

    def flush(self) -> None:
        self._loop.call_soon_threadsafe(self.relay.flush)


def alert(
    msg: str = "cold room above 8 C",
    sev: Severity = Severity.WARNING,
    topic: str = "alerts/cold/temp",
) -> Alert:
    return normalize(msg.encode(), Draft(topic, "mqtt", "temp", sev))


def smtp_conf(
    server: SmtpServer, pki: Pki, tls: str = "starttls", auth: bool = True, extra: str = ""
) -> str:
    """The [smtp] section for `server`: short timeouts and backoffs, so tests run fast."""
    lines = [
        'host = "127.0.0.1"',
        f"port = {server.port}",
        f'tls = "{tls}"',
        'from = "Gateway <gw@example.com>"',
        f'ca_file = "{pki.ca_file}"',
        'timeout = "3s"',
        'min_backoff = "1s"',
        'max_backoff = "2s"',
        'probe_max = "2s"',
    ]
    if auth:
        lines += ['username = "gw@example.com"']
    return "\n".join(lines) + "\n" + extra


# --- the daemon as a real process ----------------------------------------------------


class DaemonProcess:
    """`mailgw run` as a subprocess that tests can SIGTERM or `kill -9`."""

    def __init__(self, config: Path, log_path: Path, env: dict[str, str] | None = None) -> None:
        import tomllib

        self.config = config
        self.log_path = log_path
        self.env = env or {}
        data = tomllib.loads(config.read_text())
        self.status_path = Path(data["gateway"]["runtime_dir"]) / "status.json"
        self.proc: subprocess.Popen[bytes] | None = None

    started: ClassVar[list[DaemonProcess]] = []  # conftest kills what a failed test left running

    def start(self) -> DaemonProcess:
        import sys

        DaemonProcess.started.append(self)

        root = Path(__file__).resolve().parent.parent
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "-c", str(self.config)],
            cwd=root,
            stderr=self._log,
            stdout=self._log,
            env={**os.environ, "PYTHONPATH": str(root), **self.env},
        )
        return self

    def status(self) -> dict[str, Any] | None:
        import json

        try:
            data: dict[str, Any] = json.loads(self.status_path.read_text())
        except (OSError, ValueError):
            return None
        if self.proc is None or data.get("pid") != self.proc.pid:
            return None
        return data

    def wait_ready(self, sources: tuple[str, ...] = (), timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"the daemon exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}"
                )
            st = self.status()
            if st is not None and all(st["sources"].get(s) == "connected" for s in sources):
                return
            time.sleep(0.05)
        raise AssertionError(
            f"the daemon was not ready within {timeout} s:\n{self.log_text()[-3000:]}"
        )

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()

    def terminate(self, timeout: float = 10.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGUSR2)  # stacks into the log, for the post-mortem
            time.sleep(0.5)
            self.proc.kill()
            rc = self.proc.wait()
        self._log.close()
        return rc

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def stored_alerts(db: Path) -> list[tuple[str, str, str]]:
    """(topic, message, alert id) of every alert in an outbox, read-only."""
    import sqlite3

    from gateway.outbox import alert_tables

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows: list[tuple[str, str, str]] = []
        for table in alert_tables(conn):
            rows += conn.execute(f"SELECT topic, message, id FROM {table}").fetchall()
        return rows
    finally:
        conn.close()
