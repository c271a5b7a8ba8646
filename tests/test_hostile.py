"""The promise against a hostile sensor, a full or locked disk and dead threads.

Each test puts the real daemon (or the real outbox and writer) through one thing that
used to break "an acknowledged alert reaches an inbox", then checks that the good
alerts sent after it arrive and that nothing acknowledged was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from firmware_bridge.device import Device
from gateway import config as config_mod
from gateway.alert import Alert, Draft, normalize
from gateway.clock import Stamp
from gateway.errors import OutboxFull, StoreUnavailable, Unstorable
from gateway.outbox import SHARD_ROWS, Outbox, Routed, counts
from gateway.outbox.writer import Stored, Writer
from gateway.service import Daemon
from tests.parts import (
    OPS_ROUTE,
    DaemonProcess,
    Mosquitto,
    Pki,
    Pty,
    Publisher,
    SmtpServer,
    daemon_config,
    gateway_toml,
    good,
    routed,
    stored_alerts,
    stored_messages,
    wait_for,
)


def poison() -> Routed:
    """An alert that bypassed normalize(): a lone surrogate cannot be encoded as UTF-8."""
    a = good(0).alert
    bad = Alert(a.id, a.topic, a.source, a.sensor, a.severity, "evil \ud800", a.received)
    return Routed(bad, (("ops", 2),))


# --- poison input -----------------------------------------------------------------------


def deep(depth: int) -> bytes:
    return b'{"foo":' + b"[" * depth + b"]" * depth + b"}"


POISON = [
    *[deep(d) for d in range(972, 996, 2)],  # json.loads goes one level deeper than dumps
    b'{"message":"evil \\ud800"}',
    b'{"message":"ok","sensor":"s\\ud800"}',
    b'{"message":"ok","severity":"\\ud800"}',
    b'{"message":"ok","event_time":"\\ud800\\r\\n\\r\\n.\\r\\nMAIL FROM:<x@y>"}',
    b'{"message":"ok","extra":"\\udfff"}',
    b'{"message":"ok","nested":["\\ud800",{"k":"\\udc00"}]}',
    b'{"message":["\\ud800"]}',
    b'{"text":"\\ud800\\ud800\\udfff"}',
]


def test_poison_mqtt_payloads_never_stop_intake(
    tmp_path: Path, pki: Pki, broker: Mosquitto
) -> None:
    with SmtpServer(pki, "starttls") as smtp:
        gw = DaemonProcess(daemon_config(tmp_path, pki, smtp.port, broker.port), tmp_path / "d.log")
        gw.start().wait_ready(("mqtt",))
        pub = Publisher(broker.port)
        for payload in POISON:
            pub.publish("alerts/evil/x", payload)
        for i in range(20):
            pub.publish("alerts/good/x", f"good {i}")
        want = len(POISON) + 20
        wait_for(lambda: len(smtp.received) >= want, timeout=30, what=f"{want} mails")
        wait_for(lambda: pub.settled and len(pub.acked) == 20, what="every publish acked")
        bodies = [r.message.get_content() for r in smtp.received]
        assert sum("good" in b for b in bodies) >= 20
        assert sum("\ufffd" in b for b in bodies) >= 6  # stored with U+FFFD, not lost
        wait_for(
            lambda: ((gw.status() or {}).get("sanitised") or {}).get("bad_unicode", 0) >= 6,
            what="the repairs counted in status",
        )
        assert (gw.status() or {}).get("store_error") is None and gw.alive
        # None of it was left unacknowledged: a restart takes nothing new.
        db = tmp_path / "state" / "outbox.db"
        before = len(stored_alerts(db))
        assert gw.terminate() == 0
        gw2 = DaemonProcess(gw.config, tmp_path / "d2.log").start()
        gw2.wait_ready(("mqtt",))
        time.sleep(1.0)  # a redelivery would come at once; nothing to wait on
        assert len(stored_alerts(db)) == before
        assert len(smtp.received) == want
        gw2.terminate()
        pub.close()


def test_an_unstorable_alert_is_rejected_alone_and_the_group_is_stored(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "outbox.db")
    writer = Writer(ob)
    results: dict[str, Stored | BaseException] = {}
    done = threading.Event()

    def collect(name: str):  # type: ignore[no-untyped-def]
        def cb(result: Stored | BaseException) -> None:
            results[name] = result
            if len(results) == 3:
                done.set()

        return cb

    # Submitted before the thread starts: one group, one commit that fails as a whole.
    writer.submit([good(1), good(2)], collect("a"))
    writer.submit([good(3), poison(), good(4)], collect("b"))
    writer.submit([good(5)], collect("c"))
    writer.start()
    assert done.wait(10)
    writer.stop()
    assert results["a"] == Stored([], {}) and results["c"] == Stored([], {})
    b = results["b"]
    assert isinstance(b, Stored) and list(b.rejected) == [1]
    assert "not valid Unicode" in b.rejected[1]
    assert sorted(stored_messages(tmp_path / "outbox.db")) == [f"good {i}" for i in (1, 2, 3, 4, 5)]
    assert writer.rejected == 1 and writer.failing_since is None


def test_a_rolled_back_shard_is_not_remembered(tmp_path: Path) -> None:
    """A failed batch was the first of a new shard: the next alerts must still store."""
    ob = Outbox(tmp_path / "outbox.db")
    ob.conn.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('next_seq', ?)", (str(SHARD_ROWS),)
    )
    with pytest.raises(Unstorable):
        ob.add([poison()])  # refused before any transaction
    twice = good(0)
    with pytest.raises(StoreUnavailable):
        ob.add([twice, twice])  # the same id twice: the transaction fails after CREATE
    ob.add([good(1)])  # used to fail: "no such table: alert_1"
    assert stored_messages(tmp_path / "outbox.db") == ["good 1"]


def test_a_damaged_outbox_state_is_never_blamed_on_the_alerts(tmp_path: Path) -> None:
    """A fault of the outbox's own state must not make every alert a rejection (acked and
    lost): it fails the commit, and the sources keep their alerts."""
    ob = Outbox(tmp_path / "outbox.db")
    ob.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('next_seq', '1q2')")
    writer = Writer(ob)
    got: list[Stored | BaseException] = []
    done = threading.Event()
    writer.submit([good(1), good(2)], lambda r: (got.append(r), done.set()))
    writer.start()
    assert done.wait(10)
    assert isinstance(got[0], StoreUnavailable)
    assert writer.rejected == 0 and writer.failing_since is not None
    ob.conn.execute("UPDATE meta SET value = '7' WHERE key = 'next_seq'")  # repaired
    done.clear()
    writer.submit([good(3)], lambda r: (got.append(r), done.set()))
    assert done.wait(10)
    writer.stop()
    assert got[1] == Stored([], {}) and writer.failing_since is None


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs: a disk that fills (root only)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], check=False)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    with filler.open("wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
    return filler


def test_disk_full_while_a_batch_opens_a_shard_recovers_when_space_returns(
    small_disk: Path,
) -> None:
    ob = Outbox(small_disk / "state" / "outbox.db", allow_volatile=True)
    ob.conn.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('next_seq', ?)", (str(SHARD_ROWS - 1),)
    )
    filler = fill(small_disk)
    with pytest.raises(OutboxFull):
        ob.add([good(i) for i in range(200)])  # crosses into a new shard
    filler.unlink()
    ob.add([good(i) for i in range(200)])  # used to fail until a restart
    assert counts(ob.conn)["queued"] == 200


# --- a healthy outbox that cannot be opened yet is waited for, never moved aside -----------


def queue_alerts(db: Path, n: int) -> None:
    ob = Outbox(db, allow_volatile=True)
    ob.add([good(i) for i in range(n)])
    ob.close()


def test_a_locked_outbox_at_start_is_waited_for_not_moved_aside(tmp_path: Path, pki: Pki) -> None:
    with SmtpServer(pki, "starttls") as smtp:
        cfg = daemon_config(tmp_path, pki, smtp.port)
        db = tmp_path / "state" / "outbox.db"
        queue_alerts(db, 20)
        # Another process's exclusive lock (an sqlite3 shell, a backup tool), held longer
        # than SQLite's busy timeout.
        holder = sqlite3.connect(db, isolation_level=None)
        holder.execute("PRAGMA locking_mode = EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("UPDATE meta SET value = value WHERE key = 'next_seq'")
        gw = DaemonProcess(cfg, tmp_path / "d.log").start()
        wait_for(lambda: "locked by another process" in gw.log_text(), timeout=30, what="the wait")
        st = gw.status() or {}
        assert "locked" in (st.get("store_error") or "")
        holder.execute("ROLLBACK")
        holder.close()
        wait_for(lambda: len(smtp.received) == 20, timeout=40, what="the 20 queued alerts")
        assert not list(db.parent.glob("*.corrupt-*"))
        assert gw.terminate() == 0


def test_a_reload_or_flush_while_the_outbox_is_waited_for_does_not_end_the_daemon(
    tmp_path: Path, pki: Pki
) -> None:
    """SIGHUP and SIGUSR1 end a process by default: a `systemctl reload` or `mailgw
    flush` during a long start (a locked outbox) must find the daemon ready for them."""
    with SmtpServer(pki, "starttls") as smtp:
        cfg = daemon_config(tmp_path, pki, smtp.port)
        db = tmp_path / "state" / "outbox.db"
        queue_alerts(db, 5)
        holder = sqlite3.connect(db, isolation_level=None)
        holder.execute("PRAGMA locking_mode = EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("UPDATE meta SET value = value WHERE key = 'next_seq'")
        gw = DaemonProcess(cfg, tmp_path / "d.log").start()
        wait_for(lambda: "locked by another process" in gw.log_text(), timeout=30, what="the wait")
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGHUP)
        gw.proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: "flush requested" in gw.log_text(), what="the flush taken")
        assert gw.alive
        holder.execute("ROLLBACK")
        holder.close()
        wait_for(lambda: len(smtp.received) == 5, timeout=40, what="the 5 queued alerts")
        assert gw.terminate() == 0


def test_a_full_disk_at_start_is_waited_for_not_moved_aside(
    tmp_path: Path, pki: Pki, small_disk: Path
) -> None:
    with SmtpServer(pki, "starttls") as smtp:
        cfg = daemon_config(tmp_path, pki, smtp.port)
        text = cfg.read_text().replace(f"{tmp_path}/state", f"{small_disk}/state")
        cfg.write_text(text + "[outbox]\nallow_volatile = true\n")
        db = small_disk / "state" / "outbox.db"
        queue_alerts(db, 30)
        filler = fill(small_disk)
        gw = DaemonProcess(cfg, tmp_path / "d.log").start()
        wait_for(lambda: "Waiting for it" in gw.log_text(), timeout=30, what="the wait")
        time.sleep(2.5)  # a second and third attempt fail the same way
        assert not list(db.parent.glob("*.corrupt-*")) and gw.alive
        filler.unlink()
        wait_for(lambda: len(smtp.received) == 30, timeout=40, what="the 30 queued alerts")
        assert not list(db.parent.glob("*.corrupt-*"))
        assert gw.terminate() == 0


def test_salvage_requeues_a_moved_aside_outbox_with_the_same_ids(tmp_path: Path) -> None:
    from tests.conftest import run_cli, toml_config

    cfg = tmp_path / "gw.toml"
    cfg.write_text(
        toml_config(tmp_path / "state", '[[route]]\nname = "ops"\nmatch = "#"\nto = ["o@x.org"]\n')
    )
    aside = tmp_path / "old.db"
    ob = Outbox(aside)
    ob.add([good(i) for i in range(50)])
    sent = ob.claim(10)
    from gateway.outbox import Outcome

    ob.finish([Outcome(c.key, "sent") for c in sent])  # delivered: not salvaged
    ids = {a for _, _, a in stored_alerts(aside)} - {c.alert.id for c in sent}
    ob.close()
    r = run_cli("queue", "salvage", str(aside), "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "40 alerts queued again" in r.stdout
    live = tmp_path / "state" / "outbox.db"
    assert {a for _, _, a in stored_alerts(live)} == ids
    again = run_cli("queue", "salvage", str(aside), "-c", str(cfg))
    assert "0 alerts queued again" in again.stdout and "40 already" in again.stdout


def test_salvage_holds_again_what_was_held_aside_and_requeues_the_rest(tmp_path: Path) -> None:
    from tests.conftest import run_cli, toml_config

    cfg = tmp_path / "gw.toml"
    cfg.write_text(
        toml_config(tmp_path / "state", '[[route]]\nname = "ops"\nmatch = "#"\nto = ["o@x.org"]\n')
    )
    aside = tmp_path / "old.db"
    ob = Outbox(aside)
    ob.add([routed("poison"), routed("waiting")])
    ob.conn.execute(
        "UPDATE delivery SET state = 'held', last_error = 'held: 3 crashes' WHERE alert_seq ="
        " (SELECT min(alert_seq) FROM delivery)"
    )
    ob.conn.commit()
    ob.close()
    r = run_cli("queue", "salvage", str(aside), "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "2 alerts queued again" in r.stdout and "1 deliveries held aside again" in r.stdout
    live = tmp_path / "state" / "outbox.db"
    conn = sqlite3.connect(f"file:{live}?mode=ro", uri=True)
    try:
        (shard,) = conn.execute(
            "SELECT name FROM sqlite_master WHERE name GLOB 'alert_[0-9]*'"
        ).fetchone()
        got = dict(
            conn.execute(
                f"SELECT a.message, d.state FROM delivery d JOIN {shard} a ON a.seq = d.alert_seq"
            ).fetchall()
        )
    finally:
        conn.close()
    assert got == {"poison": "held", "waiting": "queued"}
    listing = run_cli("queue", "list", "--state", "held", "-c", str(cfg))
    assert " held " in listing.stdout and "held aside in the salvaged outbox" in listing.stdout


# --- memory: an oversized publish is refused before it is buffered -------------------------


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_a_150_mb_publish_is_refused_unread(
    tmp_path: Path, pki: Pki, broker: Mosquitto, protocol: str
) -> None:
    with SmtpServer(pki, "starttls") as smtp:
        cfg = daemon_config(tmp_path, pki, smtp.port, broker.port)
        cfg.write_text(cfg.read_text().replace("[mqtt]\n", f'[mqtt]\nprotocol = "{protocol}"\n'))
        gw = DaemonProcess(cfg, tmp_path / "d.log").start()
        gw.wait_ready(("mqtt",))
        assert gw.proc is not None
        before = peak_rss_kib(gw.proc.pid)
        big = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="big")
        big.connect("127.0.0.1", broker.port)
        big.loop_start()
        info = big.publish("alerts/big/x", b"x" * (150 * 1024 * 1024), qos=1)
        info.wait_for_publish(60)
        big.publish("alerts/good/x", b"after the big one", qos=1).wait_for_publish(10)
        wait_for(lambda: len(smtp.received) == 1, timeout=60, what="the good alert")
        peak = peak_rss_kib(gw.proc.pid)
        assert peak < 64 * 1024, f"peak RSS {peak} KiB (before: {before} KiB)"
        if protocol == "3.1.1":  # MQTT 5: the broker itself does not send it
            wait_for(
                lambda: ((gw.status() or {}).get("rejected") or {}).get("mqtt_oversize") == 1,
                what="the rejection counted",
            )
        # Acknowledged (or never sent): a restart does not take it in again.
        assert gw.terminate() == 0
        gw2 = DaemonProcess(cfg, tmp_path / "d2.log").start()
        gw2.wait_ready(("mqtt",))
        time.sleep(1.5)
        assert peak_rss_kib(gw2.proc.pid) < 64 * 1024  # type: ignore[union-attr]
        assert "mqtt_oversize" not in ((gw2.status() or {}).get("rejected") or {})
        gw2.terminate()
        big.loop_stop()


# --- serial: two devices that share ids ------------------------------------------------


def test_two_devices_with_the_same_ids_on_two_ports_are_not_mixed_up(tmp_path: Path) -> None:
    ports = [Pty(tmp_path / "ttyA"), Pty(tmp_path / "ttyB")]
    cfg = tmp_path / "gw.toml"
    cfg.write_text(
        gateway_toml(tmp_path, "gw") + f'[[serial]]\nport = "{ports[0].link}"\nname = "a"\n'
        f'[[serial]]\nport = "{ports[1].link}"\nname = "b"\n' + OPS_ROUTE
    )
    gw = DaemonProcess(cfg, tmp_path / "d.log").start()
    gw.wait_ready(("serial:a", "serial:b"))
    # A boot counter instead of a random boot id: both devices say boot 1, seq 1, 2, ...
    devs = [Device(p.master, device_id="sensor", boot_id="1", retry_min=0.3).start() for p in ports]
    for i in range(50):
        for name, d in zip("ab", devs, strict=True):
            d.alert("t", "warning", f"{name} {i}")
    assert all(d.wait_acked(timeout=30) for d in devs)
    got = sorted(stored_messages(tmp_path / "state" / "outbox.db"))
    assert got == sorted(f"{n} {i}" for n in "ab" for i in range(50))
    for d in devs:
        d.stop()
    gw.terminate()
    for p in ports:
        p.close()


def test_sighup_during_serial_ingest_loses_nothing(tmp_path: Path) -> None:
    pty = Pty(tmp_path / "tty")
    cfg = tmp_path / "gw.toml"
    routes = [
        '[[route]]\nname = "ops"\nmatch = "#"\nto = ["ops@example.com"]\nmin_severity = "info"\n',
        '[[route]]\nname = "crit"\nmatch = "serial/#"\nto = ["c@example.com"]\n'
        'min_severity = "critical"\n',
    ]
    base = gateway_toml(tmp_path, "gw") + f'[[serial]]\nport = "{pty.link}"\nname = "p"\n'
    cfg.write_text(base + routes[0])
    gw = DaemonProcess(cfg, tmp_path / "d.log").start()
    gw.wait_ready(("serial:p",))
    dev = Device(pty.master, device_id="dev", retry_min=0.3).start()
    stop = threading.Event()

    def reload_often() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            cfg.write_text(base + "".join(routes[: 1 + n % 2]))
            assert gw.proc is not None
            gw.proc.send_signal(signal.SIGHUP)
            time.sleep(0.05)

    reloader = threading.Thread(target=reload_often)
    reloader.start()
    for i in range(1500):
        dev.alert("t", "critical" if i % 3 == 0 else "warning", f"m {i}")
        if i % 100 == 0:
            time.sleep(0.05)
    try:
        assert dev.wait_acked(timeout=60), f"{dev.unacked} never acked"
    finally:
        stop.set()
        reloader.join()
    got = stored_messages(tmp_path / "state" / "outbox.db")
    assert sorted(got) == sorted(f"m {i}" for i in range(1500))
    st = gw.status() or {}
    assert st["sources"]["serial:p"] == "connected" and gw.alive
    assert "Traceback" not in gw.log_text()
    dev.stop()
    gw.terminate()
    pty.close()


# --- threads: a dead one stops the daemon (systemd restarts it) -------------------------


def run_daemon_until(cfg: Path, inject, timeout: float = 20.0) -> tuple[int, Daemon]:  # type: ignore[no-untyped-def]
    """Run the daemon in this process; call inject(daemon) once it runs; its exit code."""
    daemon = Daemon(config_mod.load(cfg))

    async def main() -> int:
        task = asyncio.create_task(daemon.run())
        deadline = time.monotonic() + timeout
        while daemon.writer is None or not daemon.runtime.threads:
            assert time.monotonic() < deadline and not task.done()
            await asyncio.sleep(0.05)
        await asyncio.to_thread(inject, daemon)
        return await asyncio.wait_for(task, timeout)

    return asyncio.run(main()), daemon


def _die(*args: object) -> None:
    raise SystemExit("injected: this thread dies")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_writer_thread_stops_the_daemon(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(gateway_toml(tmp_path, "gw"))

    def inject(d: Daemon) -> None:
        assert d.writer is not None
        d.writer.after_group.append(_die)
        d.writer.submit([good(1)], lambda r: None)

    rc, daemon = run_daemon_until(cfg, inject)
    assert rc == 1
    assert daemon.runtime.threads["outbox-writer"].startswith("dead")
    assert stored_messages(tmp_path / "state" / "outbox.db") == ["good 1"]  # committed before


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_mqtt_thread_stops_the_daemon(tmp_path: Path, broker: Mosquitto) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(
        gateway_toml(tmp_path, "gw") + f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\n'
    )

    def inject(d: Daemon) -> None:
        wait_for(lambda: d.runtime.sources.get("mqtt") == "connected", what="connected")
        source = next(c for c in d.components if c.name == "mqtt")
        source.client.on_message = _die  # type: ignore[attr-defined]
        pub = Publisher(broker.port)
        pub.publish("alerts/x/y", "the last straw")
        pub.close()

    rc, daemon = run_daemon_until(cfg, inject)
    assert rc == 1 and daemon.runtime.threads["mqtt"] == "dead"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_serial_thread_stops_the_daemon(tmp_path: Path) -> None:
    pty = Pty(tmp_path / "tty")
    cfg = tmp_path / "gw.toml"
    cfg.write_text(gateway_toml(tmp_path, "gw") + f'[[serial]]\nport = "{pty.link}"\nname = "p"\n')
    dev = Device(pty.master, device_id="dev", retry_min=0.3)

    def inject(d: Daemon) -> None:
        source = next(c for c in d.components if c.name == "serial:p")
        source._hub._submit = _die  # type: ignore[attr-defined]
        dev.start()
        dev.alert("t", "warning", "the last straw")

    rc, daemon = run_daemon_until(cfg, inject)
    assert rc == 1 and daemon.runtime.threads["serial:p"].startswith("dead")
    dev.stop()
    pty.close()


def test_a_store_failing_for_long_withholds_the_watchdog(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(gateway_toml(tmp_path, "gw"))
    seen: list[str | None] = []

    def inject(d: Daemon) -> None:
        assert d.writer is not None
        seen.append(d.healthy())
        d.writer.failing_since = time.monotonic() - 1000  # as if locked for 1000 s
        d.writer.last_failure_at = time.monotonic()  # and still failing
        d.writer.last_failure = "cannot write the outbox: database is locked"
        seen.append(d.healthy())
        # What `mailgw status` shows, through the status file as the CLI reads it.
        time.sleep(2.5)  # housekeeping writes the file every 2 s
        from tests.conftest import run_cli

        shown.append(run_cli("status", "-c", str(cfg)).stdout)
        d.writer.failing_since = None
        os.kill(os.getpid(), signal.SIGTERM)

    shown: list[str] = []
    rc, _ = run_daemon_until(cfg, inject)
    assert rc == 0 and seen[0] is None
    assert seen[1] is not None and "failed to store alerts" in seen[1]
    assert "STORE      failing since" in shown[0] and "database is locked" in shown[0]


def test_normalize_never_raises_on_deep_nesting() -> None:
    for depth in range(900, 1100):
        normalize(deep(depth), Draft("alerts/x", "mqtt"))


def test_normalize_never_lets_a_surrogate_through() -> None:
    for payload in POISON:
        a = normalize(payload, Draft("alerts/x", "mqtt"), Stamp.now())
        for text in (a.message, a.sensor, a.event_time or "", *map(str, a.fields.values())):
            text.encode("utf-8")  # raises on a lone surrogate
        assert "\n" not in (a.event_time or "") and "\r" not in (a.event_time or "")


def damaged_outbox(tmp_path: Path, n: int = 3000) -> Path:
    path = tmp_path / "old.db"
    ob = Outbox(path)
    for i in range(0, n, 500):
        ob.add([good(j) for j in range(i, min(n, i + 500))])
    ob.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    ob.close()
    return path


@pytest.mark.parametrize("damage", ["one page", "ten pages", "truncated"])
def test_salvage_reads_around_damage(tmp_path: Path, damage: str) -> None:
    import random

    from tests.conftest import run_cli, toml_config

    path = damaged_outbox(tmp_path)
    size = path.stat().st_size
    page = 4096
    rng = random.Random(damage)
    # Pages that hold alerts: a random page of the file may be an index or an empty
    # table's, which salvage does not need, and which pages those are moves with every
    # table a schema migration adds.
    conn = sqlite3.connect(path)
    leaves = [n for (n,) in conn.execute("SELECT pageno FROM dbstat WHERE name = 'alert_0'")]
    conn.close()
    with path.open("r+b") as f:
        if damage == "truncated":
            f.truncate(size // 2)
        else:
            for _ in range(1 if damage == "one page" else 10):
                f.seek(page * (rng.choice(sorted(leaves)) - 1))
                f.write(rng.randbytes(page))
    cfg = tmp_path / "gw.toml"
    cfg.write_text(
        toml_config(tmp_path / "state", '[[route]]\nname = "ops"\nmatch = "#"\nto = ["o@x.org"]\n')
    )
    r = run_cli("queue", "salvage", str(path), "-c", str(cfg))
    live = tmp_path / "state" / "outbox.db"
    got = len(stored_alerts(live)) if live.exists() else 0
    # Damage is reported (exit 1) and what could be read is queued again: most of it.
    assert r.returncode == 1, r.stdout + r.stderr
    assert "damaged" in r.stderr
    floor = 1000 if damage == "truncated" else 2000
    assert got >= floor, f"only {got} of 3000 salvaged ({damage}): {r.stdout}"


def test_a_flipped_byte_in_a_stored_alert_costs_one_character_not_the_queue(
    tmp_path: Path, pki: Pki
) -> None:
    with SmtpServer(pki, "starttls") as smtp:
        cfg = daemon_config(tmp_path, pki, smtp.port)
        db = tmp_path / "state" / "outbox.db"
        queue_alerts(db, 20)
        raw = db.read_bytes()
        at = raw.index(b"good 7")
        db.write_bytes(raw[:at] + b"\xff\xfe" + raw[at + 2 :])  # "go" → invalid UTF-8
        gw = DaemonProcess(cfg, tmp_path / "d.log").start()
        wait_for(lambda: len(smtp.received) == 20, timeout=30, what="all 20, the damaged too")
        assert any("\ufffd\ufffdod 7" in r.message.get_content() for r in smtp.received)
        assert gw.terminate() == 0


def test_a_lock_held_while_running_is_waited_out(tmp_path: Path, pki: Pki) -> None:
    from tests.conftest import run_cli

    with SmtpServer(pki, "starttls") as smtp:
        cfg = daemon_config(tmp_path, pki, smtp.port)
        gw = DaemonProcess(cfg, tmp_path / "d.log").start()
        gw.wait_ready()
        db = tmp_path / "state" / "outbox.db"
        holder = sqlite3.connect(db, isolation_level=None)
        # Longer than SQLite's 10 s busy timeout plus the relay's 2 s idle poll: at least
        # one claim of the relay's runs into it.
        holder.execute("BEGIN IMMEDIATE")
        time.sleep(14)
        holder.execute("ROLLBACK")
        holder.close()
        assert gw.alive, gw.log_text()[-2000:]
        r = run_cli("send", "-c", str(cfg), "--sensor", "s", "--severity", "warning", "after")
        assert r.returncode == 0, r.stderr
        wait_for(lambda: len(smtp.received) == 1, timeout=30, what="the alert after the lock")
        assert "cannot use the outbox" in gw.log_text()
        assert gw.terminate() == 0
