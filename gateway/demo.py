"""`mailgw demo`: the whole gateway, end to end, on this machine, in about a minute.

It starts a Mosquitto broker, a capture smarthost with STARTTLS and AUTH on a
throwaway CA, a simulated serial sensor on a pty, and the gateway itself (a real
`mailgw run` process with a generated config); sends alerts by MQTT and serial;
takes the smarthost down to show the queue growing and the relay backing off;
brings it back and shows the backlog draining; then lists the mails that arrived.
Everything it started is stopped on exit or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tty
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


class Demo:
    def __init__(self, ci: bool) -> None:
        self.ci = ci
        self.dir = Path(tempfile.mkdtemp(prefix="mailgw-demo-"))
        self.stack = contextlib.ExitStack()
        self.gateway: subprocess.Popen[bytes] | None = None
        self.delivered: list[Any] = []

    # --- output ----------------------------------------------------------------------

    def say(self, text: str) -> None:
        print(text, flush=True)

    def status(self) -> dict[str, Any]:
        out = subprocess.run(
            [sys.executable, "-m", "gateway", "status", "--json", "-c", str(self.config)],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        try:
            data: dict[str, Any] = json.loads(out.stdout)
        except ValueError:
            return {}
        return data

    def progress(
        self, label: str, until: Callable[[dict[str, Any]], bool], timeout: float
    ) -> dict[str, Any]:
        """A live line while waiting: queue, sent, uplink, mails at the smarthost."""
        deadline = time.monotonic() + timeout
        st: dict[str, Any] = {}
        live = sys.stdout.isatty() and not self.ci
        while time.monotonic() < deadline:
            st = self.status()
            line = (
                f"  {label:28} queued {st.get('queued', 0):>4}  sent {st.get('sent', 0):>4}"
                f"  dead {st.get('dead', 0):>2}  uplink {st.get('uplink') or '?':7}"
                f"  mails at smarthost {len(self.delivered):>4}"
            )
            if live:
                print("\r" + line, end="", flush=True)
            if until(st):
                break
            if not live:
                print(line, flush=True)
            time.sleep(1.0)
        if live:
            print()
        else:
            print(
                f"  {label:28} done: queued {st.get('queued', 0)}, sent {st.get('sent', 0)}",
                flush=True,
            )
        return st

    # --- parts -----------------------------------------------------------------------

    def start_parts(self) -> None:
        from firmware_bridge.device import Device

        try:
            from gateway.lab import Mosquitto, SmtpServer, make_pki, mosquitto_binary
        except ImportError as exc:
            # The Debian package ships the daemon only; the demo's smarthost and CA
            # come with the `demo` extra.
            raise SystemExit(
                f"mailgw demo needs {exc.name}: run `make demo` from a source checkout "
                "(or pip install 'mailgw[demo]')"
            ) from None

        if mosquitto_binary() is None:
            raise SystemExit(
                "mosquitto is not installed: `make demo` installs it "
                "(or: apt-get install mosquitto mosquitto-clients)"
            )
        self.pki = make_pki(self.dir / "pki")
        mail_dir = self.dir / "mail"
        mail_dir.mkdir()
        self.smarthost = SmtpServer(self.pki, "starttls", users={"gw@demo.example": "demo-pw"})

        def save(item: Any) -> None:
            n = len(self.delivered) + 1
            (mail_dir / f"{n:04d}.eml").write_bytes(item.data)
            self.delivered.append(item)

        self.smarthost.on_receive = save
        self.smarthost.start()
        self.stack.callback(self.smarthost.stop)
        self.say(
            f"smarthost  127.0.0.1:{self.smarthost.port} (STARTTLS + AUTH, CA {self.pki.ca_file})"
        )

        self.broker = Mosquitto(self.dir / "mosquitto").start()
        self.stack.callback(self.broker.stop)
        self.say(f"broker     Mosquitto on 127.0.0.1:{self.broker.port}")

        master, slave = os.openpty()
        tty.setraw(slave)
        self.tty_path = os.ttyname(slave)
        os.close(slave)
        self.stack.callback(os.close, master)
        self.device = Device(master, device_id="cold-room-3", retry_min=0.5)
        self.say(f"sensor     simulated serial device on {self.tty_path}")

        pw = self.dir / "smtp-password"
        pw.write_text("demo-pw\n")
        pw.chmod(0o600)
        self.config = self.dir / "gateway.toml"
        self.config.write_text(f"""# generated by `mailgw demo`
[gateway]
device_id = "demo-truck-042"
state_dir = "{self.dir}/state"
runtime_dir = "{self.dir}/run"

[outbox]
allow_volatile = true

[smtp]
host = "127.0.0.1"
port = {self.smarthost.port}
tls = "starttls"
ca_file = "{self.pki.ca_file}"
username = "gw@demo.example"
password_file = "{pw}"
from = "Gateway demo-truck-042 <gw@demo.example>"
min_backoff = "2s"
probe_max = "4s"

[mqtt]
host = "127.0.0.1"
port = {self.broker.port}
topics = ["alerts/#"]

[[serial]]
port = "{self.tty_path}"
name = "cold-room"

[[route]]
name = "ops"
match = "#"
min_severity = "info"
to = ["ops@demo.example"]
subject = "[{{severity}}] {{device_id}}/{{sensor}}: {{message}}"
""")
        self.say(f"config     {self.config}")

    def start_gateway(self) -> None:
        log = (self.dir / "gateway.log").open("ab")
        self.gateway = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "-c", str(self.config)],
            stdout=log,
            stderr=log,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        self.stack.callback(self.stop_gateway)
        self.say(f"gateway    mailgw run, pid {self.gateway.pid}, log {self.dir}/gateway.log")

        def ready(st: dict[str, Any]) -> bool:
            sources = st.get("sources") or {}
            return (
                sources.get("mqtt") == "connected"
                and sources.get("serial:cold-room") == "connected"
            )

        self.progress("starting", ready, 30)
        self.device.start()
        self.stack.callback(self.device.stop)

    def stop_gateway(self) -> None:
        if self.gateway is not None and self.gateway.poll() is None:
            self.gateway.send_signal(signal.SIGTERM)
            try:
                self.gateway.wait(10)
            except subprocess.TimeoutExpired:
                self.gateway.kill()
                self.gateway.wait()

    def publish(self, count: int, prefix: str) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="demo-sensors")
        client.connect("127.0.0.1", self.broker.port)
        client.loop_start()
        infos = []
        severities = ["info", "warning", "critical"]
        for i in range(count):
            payload = json.dumps(
                {
                    "message": f"{prefix} reading {i}: 9.{i} C",
                    "severity": severities[i % 3],
                    "sensor": f"temp{i % 2}",
                    "celsius": float(f"9.{i}"),
                }
            )
            infos.append(client.publish(f"alerts/reefer-{i % 2}/temp", payload, qos=1))
        for info in infos:
            info.wait_for_publish(10)
        client.disconnect()
        client.loop_stop()
        for i in range(max(1, count // 3)):
            self.device.alert("door", "warning", f"{prefix} door open {i}")

    # --- the story ----------------------------------------------------------------

    def run(self) -> int:
        n = 6 if self.ci else 12
        self.say(f"mailgw demo in {self.dir}\n")
        self.start_parts()
        self.start_gateway()

        self.say(f"\n1. {n} alerts by MQTT and {n // 3} by serial, smarthost up")
        self.publish(n, "first")
        total = n + n // 3
        self.progress("delivering", lambda st: st.get("sent", 0) >= total, 60)

        self.say("\n2. the smarthost goes down (the truck drives into a dead zone)")
        self.smarthost.stop()
        self.publish(n, "offline")
        total += n + n // 3
        self.progress(
            "queueing while down",
            lambda st: st.get("queued", 0) >= n + n // 3 and st.get("uplink") == "down",
            60,
        )
        hold = 4 if self.ci else 10
        end = time.monotonic() + hold
        self.progress("backing off, probing", lambda st: time.monotonic() > end, hold + 5)

        self.say("\n3. the smarthost is back: `mailgw flush` probes at once, the queue drains")
        self.smarthost.start()
        subprocess.run(
            [sys.executable, "-m", "gateway", "flush", "-c", str(self.config)],
            cwd=ROOT,
            capture_output=True,
        )
        st = self.progress(
            "draining", lambda st: st.get("sent", 0) >= total and st.get("queued", 1) == 0, 90
        )

        self.say(
            f"\n{len(self.delivered)} mails arrived at the smarthost (saved in {self.dir}/mail/):"
        )
        for item in self.delivered:
            m = item.message
            self.say(f"  {str(m['Subject'])[:62]:62}  → {m['To']}")
        ids = [item.message_id for item in self.delivered]
        dupes = len(ids) - len(set(ids))
        self.say(
            f"\nstatus: queued {st.get('queued')}, sent {st.get('sent')}, "
            f"dead {st.get('dead')}, duplicates {dupes}"
        )
        ok = st.get("sent", 0) >= total and st.get("queued", 1) == 0
        self.say(
            "demo ok: every alert survived the outage and was delivered"
            if ok
            else "demo FAILED: not every alert was delivered; see the gateway log"
        )
        if not self.ci:
            self.say(
                f"\ntry: .venv/bin/mailgw status -c {self.config}   "
                f"(the demo's files stay in {self.dir})"
            )
        return 0 if ok else 1


@contextlib.contextmanager
def _interrupts_as_exit() -> Iterator[None]:
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_demo(ci: bool = False) -> int:
    demo = Demo(ci)
    with _interrupts_as_exit():
        try:
            with demo.stack:
                return demo.run()
        except KeyboardInterrupt:
            print("\ninterrupted: stopping everything the demo started", flush=True)
            return 130
        finally:
            if ci:
                shutil.rmtree(demo.dir, ignore_errors=True)
