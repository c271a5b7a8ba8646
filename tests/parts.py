"""Real parts for the tests: the daemon as a process, the relay in-process (`Gateway`),
a pty pair, a QoS 1 publisher, config and alert helpers, plus gateway.lab's CA,
smarthost and broker (shared with `mailgw demo`). Fixtures built on them are in
tests/conftest.py."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import threading
import time
import tty
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

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
from gateway.outbox.writer import Writer
from gateway.relay import Relay
from gateway.routing import Router
from gateway.runtime import Runtime

OPS_ROUTE = '[[route]]\nname = "ops"\nmatch = "#"\nto = ["ops@example.com"]\n'


def can_unshare_mount() -> bool:
    """Whether a private mount namespace can be made here: root with unshare(1), and a
    root that is a mount point (in a plain chroot, such as fresh-debian's, it is not,
    and unshare cannot change the root's propagation)."""
    if os.geteuid() != 0:
        return False
    try:
        return subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode == 0
    except OSError:
        return False


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


def routed(text: str, topic: str = "alerts/x", sensor: str = "unknown") -> Routed:
    """An MQTT alert routed to "ops" (route id 2), as the writer takes it."""
    return Routed(normalize(text.encode(), Draft(topic, "mqtt", sensor)), (("ops", 2),))


def good(i: int) -> Routed:
    return routed(f"good {i}", sensor="s")


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
    # Slow-down pauses and the return after an outage, scaled down (30 s and more
    # by default) unless the test sets its own.
    for key, value in (("throttle_max", '"1s"'), ("return_jitter", '"0s"')):
        if key not in extra:
            lines += [f"{key} = {value}"]
    return "\n".join(lines) + "\n" + extra


# --- configs for the daemon -----------------------------------------------------------


def gateway_toml(tmp: Path, device_id: str) -> str:
    """The [gateway] section: state in tmp/state, status in tmp/run."""
    return (
        f'[gateway]\ndevice_id = "{device_id}"\nstate_dir = "{tmp}/state"\n'
        f'runtime_dir = "{tmp}/run"\n'
    )


def write_password(path: Path) -> Path:
    """A password file as the config checks want it: mode 0600."""
    path.write_text("s3cret\n")
    path.chmod(0o600)
    return path


def daemon_config(
    tmp: Path,
    pki: Pki,
    smtp_port: int,
    broker_port: int | None = None,
    subject: str = "[{severity}] {sensor}: {message}",
) -> Path:
    """tmp/gw.toml for a daemon that relays to a STARTTLS+AUTH smarthost on smtp_port,
    and reads MQTT from broker_port if given; one route "ops" for every topic."""
    pw = write_password(tmp / "pw")
    mqtt_toml = f'[mqtt]\nhost = "127.0.0.1"\nport = {broker_port}\n' if broker_port else ""
    cfg = tmp / "gw.toml"
    cfg.write_text(
        gateway_toml(tmp, "gw-d")
        + f'[smtp]\nhost = "127.0.0.1"\nport = {smtp_port}\nfrom = "gw@example.com"\n'
        f'username = "gw@example.com"\npassword_file = "{pw}"\nca_file = "{pki.ca_file}"\n'
        'timeout = "1s"\nmin_backoff = "1s"\nprobe_max = "2s"\n'
        # scaled down like smtp_conf's: a test's outage ends without a 30 s jitter
        'throttle_max = "1s"\nreturn_jitter = "0s"\n'
        f"{mqtt_toml}"
        f'[[route]]\nname = "ops"\nmatch = "#"\nto = ["ops@example.com"]\nsubject = "{subject}"\n'
    )
    return cfg


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
            # A crash in C (a signal) leaves its Python stacks in the log.
            env={**os.environ, "PYTHONPATH": str(root), "PYTHONFAULTHANDLER": "1", **self.env},
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


def stored_messages(db: Path) -> list[str]:
    """The message of every alert in an outbox; none if there is no outbox yet."""
    return [m for _, m, _ in stored_alerts(db)] if db.exists() else []


# --- devices: a serial line and an MQTT publisher ----------------------------------------


class Pty:
    """A pty pair; the gateway opens `link`, a stable path like /dev/serial/by-id/..."""

    def __init__(self, link: Path) -> None:
        self.link = link
        self.master = -1
        self.plug()

    def plug(self) -> int:
        self.master, slave = os.openpty()
        tty.setraw(slave)  # no echo, no CR/LF translation: a UART is 8-bit clean
        path = os.ttyname(slave)
        os.close(slave)
        tmp = self.link.with_suffix(".new")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(path)
        tmp.replace(self.link)
        return self.master

    def unplug(self) -> None:
        os.close(self.master)
        self.link.unlink(missing_ok=True)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.master)


def _published(info: mqtt.MQTTMessageInfo) -> bool:
    try:
        return info.is_published()
    except (RuntimeError, ValueError):
        return False  # the publish failed: the sender knows it was not acknowledged


class Publisher:
    """A QoS 1 publisher that knows which messages the broker acknowledged."""

    def __init__(self, port: int) -> None:
        self._sent: list[tuple[str, mqtt.MQTTMessageInfo]] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{random.random()}")
        self.client.max_inflight_messages_set(100)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    @property
    def acked(self) -> set[str]:
        return {text for text, info in list(self._sent) if _published(info)}

    @property
    def settled(self) -> bool:
        """Every publish was either acked by the broker or failed (not connected)."""
        return all(info.rc != 0 or _published(info) for _, info in list(self._sent))

    def publish(self, topic: str, payload: str | bytes, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        if isinstance(payload, str):
            self._sent.append((payload, info))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
