"""The whole daemon as a process: signals, watchdog, reload, crash resend."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from pathlib import Path

from tests.conftest import run_cli
from tests.parts import (
    DaemonProcess,
    Mosquitto,
    Pki,
    Publisher,
    SmtpServer,
    daemon_config,
    stored_alerts,
    wait_for,
)


def test_sigterm_during_a_burst_loses_nothing_and_exits_fast(
    tmp_path: Path, pki: Pki, broker: Mosquitto
) -> None:
    with SmtpServer(pki, "starttls") as smtp:
        cfg = daemon_config(tmp_path, pki, smtp.port, broker.port)
        gw = DaemonProcess(cfg, tmp_path / "daemon.log").start()
        gw.wait_ready(("mqtt",))
        pub = Publisher(broker.port)
        sent = [f"burst {i}" for i in range(1000)]

        def produce() -> None:
            for text in sent:
                pub.publish("alerts/b/x", text)

        producer = threading.Thread(target=produce)
        producer.start()
        wait_for(lambda: len(smtp.received) > 50, what="relaying under way")
        t0 = time.monotonic()
        rc = gw.terminate(timeout=10)
        elapsed = time.monotonic() - t0
        assert rc == 0 and elapsed < 5, f"exit {rc} after {elapsed:.1f} s"
        assert "mailgw stopped" in gw.log_text()
        producer.join(60)
        wait_for(lambda: pub.acked == set(sent), what="broker acks")
        gw.start()
        wait_for(
            lambda: {r.message["Subject"].rsplit(": ", 1)[-1] for r in smtp.received} >= set(sent),
            timeout=90,
            what="every alert delivered after the restart",
        )
        ids = [r.message_id for r in smtp.received]
        # Duplicates only by resend with the same Message-ID, never a second id per alert.
        by_text: dict[str, set[str]] = {}
        for r in smtp.received:
            by_text.setdefault(r.message["Subject"], set()).add(r.message_id)
        assert all(len(v) == 1 for v in by_text.values())
        print(f"{len(ids)} mails for {len(sent)} alerts")
        gw.terminate()
        pub.close()


def test_kill_9_mid_send_resends_with_the_same_message_id(tmp_path: Path, pki: Pki) -> None:
    with SmtpServer(pki, "starttls") as smtp:
        cfg = daemon_config(tmp_path, pki, smtp.port)
        gw = DaemonProcess(cfg, tmp_path / "daemon.log").start()
        gw.wait_ready()
        smtp.script.stall_in_data = 30.0  # the first message hangs at end of DATA...
        assert (
            run_cli(
                "send", "-c", str(cfg), "--sensor", "s", "--severity", "critical", "resend me"
            ).returncode
            == 0
        )
        wait_for(lambda: smtp.connections >= 1, what="the relay connected")
        time.sleep(0.5)
        gw.kill9()  # ...and the gateway dies before it has a reply
        smtp.script.stall_in_data = 0.0
        gw.start()
        (got,) = smtp.wait_for(1, timeout=30)
        assert "resend me" in got.message["Subject"]
        db = tmp_path / "state" / "outbox.db"
        ((_, _, alert_id),) = stored_alerts(db)
        assert got.message_id == f"<{alert_id}.ops@gw-d.mailgw>"
        gw.terminate()


def test_hung_relay_stops_watchdog_pings(tmp_path: Path, pki: Pki) -> None:
    freeze = tmp_path / "freeze"
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.5)
    with SmtpServer(pki, "starttls") as smtp:
        cfg = daemon_config(tmp_path, pki, smtp.port)
        gw = DaemonProcess(
            cfg,
            tmp_path / "daemon.log",
            env={
                "NOTIFY_SOCKET": str(sock_path),
                "WATCHDOG_USEC": "1000000",
                "MAILGW_TEST_FREEZE_RELAY": str(freeze),
            },
        ).start()

        def pings(seconds: float) -> int:
            n, end = 0, time.monotonic() + seconds
            while time.monotonic() < end:
                with contextlib.suppress(TimeoutError):
                    n += sock.recv(4096).count(b"WATCHDOG=1")
            return n

        gw.wait_ready()
        assert pings(2) >= 2
        freeze.touch()
        # stall_limit = 6 x smtp.timeout (1 s) + 10 s: then the pings stop.
        wait_for(lambda: "the relay is stuck" in gw.log_text(), timeout=40, what="stuck")
        pings(0.6)  # what was sent before the stall was noticed
        assert pings(3) == 0
        assert gw.alive  # systemd, not the daemon, does the killing
        assert gw.terminate() == 0  # and a stuck relay does not stop SIGTERM
    sock.close()


def test_sighup_reloads_templates(tmp_path: Path, pki: Pki) -> None:
    with SmtpServer(pki, "starttls") as smtp:
        cfg = daemon_config(tmp_path, pki, smtp.port, subject="OLD {message}")
        gw = DaemonProcess(cfg, tmp_path / "daemon.log").start()
        gw.wait_ready()
        run_cli("send", "-c", str(cfg), "--sensor", "s", "--severity", "info", "one")
        (first,) = smtp.wait_for(1)
        assert first.message["Subject"] == "OLD one"
        cfg.write_text(cfg.read_text().replace("OLD {message}", "NEW {message}"))
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reloaded routes and templates" in gw.log_text(), what="reload")
        run_cli("send", "-c", str(cfg), "--sensor", "s", "--severity", "info", "two")
        _, second = smtp.wait_for(2)
        assert second.message["Subject"] == "NEW two"
        # A broken file is refused and the running configuration kept.
        cfg.write_text(cfg.read_text() + "\n[bogus]\n")
        gw.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload refused" in gw.log_text(), what="refusal")
        assert gw.alive
        assert gw.terminate() == 0


def test_flush_probes_at_once(tmp_path: Path, pki: Pki) -> None:
    smtp = SmtpServer(pki, "starttls")
    cfg = daemon_config(tmp_path, pki, smtp.port)
    cfg.write_text(cfg.read_text().replace('probe_max = "2s"', 'probe_max = "60s"'))
    gw = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    try:
        gw.wait_ready()
        run_cli("send", "-c", str(cfg), "--sensor", "s", "--severity", "info", "waiting")
        wait_for(lambda: (gw.status() or {}).get("uplink") == "down", what="uplink down")
        time.sleep(9)  # now the next probe is 8-16 s away
        smtp.start()
        r = run_cli("flush", "-c", str(cfg))
        assert r.returncode == 0, r.stderr
        t0 = time.monotonic()
        smtp.wait_for(1, timeout=5)
        assert time.monotonic() - t0 < 5
    finally:
        gw.terminate()
        smtp.stop()
