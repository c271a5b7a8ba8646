"""Serial ingest over real ptys: the daemon on the slave, a simulated device on the master."""

from __future__ import annotations

import collections
import contextlib
import os
import select
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_bridge import codec
from firmware_bridge.device import Device
from gateway.alert import Draft, clean_sensor, normalize, parse_severity
from gateway.clock import Stamp
from gateway.sources.serial_session import from_frame
from tests.parts import OPS_ROUTE, DaemonProcess, Pty, gateway_toml, stored_alerts, wait_for


@pytest.fixture
def daemon(
    tmp_path: Path, pty: Pty, launch_daemon: Callable[..., DaemonProcess]
) -> Callable[..., DaemonProcess]:
    """daemon(serial_extra) → a daemon reading `pty` as serial port "bench1", ready."""

    def make(serial_extra: str = "") -> DaemonProcess:
        cfg = tmp_path / "gw.toml"
        cfg.write_text(
            gateway_toml(tmp_path, "gw-serial")
            + f'[[serial]]\nport = "{pty.link}"\nname = "bench1"\n{serial_extra}\n'
            + OPS_ROUTE
        )
        return launch_daemon(cfg, ready=("serial:bench1",))

    return make


def rows(tmp_path: Path) -> list[tuple[str, str, str]]:
    db = tmp_path / "state" / "outbox.db"
    return stored_alerts(db) if db.exists() else []


def test_1000_alerts_stored_once_each_acked_after_commit(
    tmp_path: Path, pty: Pty, daemon: Callable[..., DaemonProcess]
) -> None:
    daemon()
    dev = Device(pty.master, device_id="fridge-7", retry_min=1.0).start()
    # A few one at a time: when the ACK arrives the alert is already on disk.
    for i in range(10):
        seq = dev.alert("temp", "warning", f"single {i}")
        assert dev.wait_acked({seq}, timeout=10)
        assert f"single {i}" in {m for _, m, _ in rows(tmp_path)}
    for i in range(990):
        dev.alert("temp", "critical", f"burst {i}")
    assert dev.wait_acked(timeout=60), f"{dev.unacked} alerts never acked"
    got = collections.Counter(m for _, m, _ in rows(tmp_path))
    expected = {f"single {i}" for i in range(10)} | {f"burst {i}" for i in range(990)}
    assert set(got) == expected and max(got.values()) == 1
    assert {t for t, _, _ in rows(tmp_path)} == {"serial/bench1/temp"}
    dev.stop()


def test_noisy_line_still_delivers_each_alert_exactly_once(
    tmp_path: Path, pty: Pty, daemon: Callable[..., DaemonProcess]
) -> None:
    gw = daemon()
    dev = Device(
        pty.master, device_id="noisy", corrupt=0.05, seed=42, retry_min=0.05, retry_max=0.4
    ).start()
    sent = {f"n{i}" for i in range(200)}
    for text in sorted(sent):
        dev.alert("t", "warning", text)
    assert dev.wait_acked(timeout=120), f"{dev.unacked} never acked"
    got = collections.Counter(m for _, m, _ in rows(tmp_path))
    assert set(got) == sent, "a corrupted alert was stored, or one was lost"
    assert max(got.values()) == 1, "a retransmission was stored twice"
    assert dev.stats.retransmits > 0 and dev.stats.naks.get("CRC", 0) > 0
    rejected = (gw.status() or {}).get("rejected", {})
    assert rejected.get("serial_crc", 0) > 0
    dev.stop()


def test_port_vanishing_and_returning_loses_nothing(
    tmp_path: Path, pty: Pty, daemon: Callable[..., DaemonProcess]
) -> None:
    gw = daemon()
    dev = Device(pty.master, device_id="usb-1", retry_min=0.2, retry_max=1.0).start()
    for i in range(100):
        dev.alert("t", "info", f"before {i}")
    wait_for(lambda: len(rows(tmp_path)) >= 20, what="some stored")
    pty.unplug()  # the USB cable is pulled mid-stream
    for i in range(100):
        dev.alert("t", "info", f"during {i}")
    wait_for(lambda: "is gone" in gw.log_text(), what="the loss logged")
    time.sleep(1.0)
    dev.reattach(pty.plug())
    assert dev.wait_acked(timeout=60), f"{dev.unacked} never acked"
    got = collections.Counter(m for _, m, _ in rows(tmp_path))
    assert set(got) == {f"before {i}" for i in range(100)} | {f"during {i}" for i in range(100)}
    assert max(got.values()) == 1
    assert "is back" in gw.log_text()
    assert gw.log_text().count("is gone") == 1  # logged once, not per retry
    dev.stop()


def exchange(
    master: int, frames: list[bytes], replies: int, timeout: float = 10.0
) -> list[codec.Event]:
    for f in frames:
        os.write(master, f)
    decoder = codec.Decoder()
    events: list[codec.Event] = []
    deadline = time.monotonic() + timeout
    while len(events) < replies and time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            events += decoder.feed(os.read(master, 4096))
    return events


def test_protocol_replies_and_dedupe_across_restart(
    tmp_path: Path, pty: Pty, daemon: Callable[..., DaemonProcess]
) -> None:
    gw = daemon()
    alert = codec.encode(codec.Alert(5, "door", "critical", "door open, 5 min"))
    # An ALERT before HELLO: the gateway cannot dedupe it yet, so it asks for HELLO.
    assert exchange(pty.master, [alert], 1) == [codec.Nak(5, "HELLO")]
    hello = codec.encode(codec.Hello(1, "cab-9", "2.1", "boot-a"))
    events = exchange(pty.master, [hello, alert, alert, codec.encode(codec.Ping(6))], 4)
    assert events.count(codec.Ack(5)) == 2 and codec.Ack(1) in events
    assert codec.Pong(6) in events
    bad = b"$ALERT,7,door,critical,x*0000\r\n"
    assert exchange(pty.master, [bad, b"$" + b"A" * 600 + b"\r\n"], 2) == [
        codec.Nak(7, "CRC"),
        codec.Nak(None, "SIZE"),
    ]
    assert [m for _, m, _ in rows(tmp_path)] == ["door open, 5 min"]
    gw.kill9()
    gw.start()
    gw.wait_ready(("serial:bench1",))
    # A retransmission after the gateway restarted is still recognised.
    events = exchange(pty.master, [hello, alert], 2)
    assert events == [codec.Ack(1), codec.Ack(5)]
    assert [m for _, m, _ in rows(tmp_path)] == ["door open, 5 min"]
    st = gw.status() or {}
    assert st["sources"]["serial:bench1"] == "connected"


def test_lines_mode_for_legacy_devices(
    tmp_path: Path, pty: Pty, daemon: Callable[..., DaemonProcess]
) -> None:
    daemon(
        'protocol = "lines"\nline_regex = "^(?P<severity>\\\\w+) (?P<sensor>\\\\w+): '
        '(?P<message>.*)$"\nsensor = "legacy"\n'
    )
    os.write(pty.master, b"critical boiler: pressure high\r\nplain text line\n\n")
    wait_for(lambda: len(rows(tmp_path)) == 2, what="two alerts")
    got = {(t, m) for t, m, _ in rows(tmp_path)}
    assert got == {
        ("serial/bench1/boiler", "pressure high"),
        ("serial/bench1/legacy", "plain text line"),
    }


def test_missing_port_at_start_is_waited_for(tmp_path: Path, pty: Pty) -> None:
    pty.unplug()
    cfg = tmp_path / "gw.toml"
    cfg.write_text(
        f'[gateway]\nstate_dir = "{tmp_path}/state"\nruntime_dir = "{tmp_path}/run"\n'
        f'[[serial]]\nport = "{pty.link}"\nname = "late"\n'
        '[[route]]\nmatch = "#"\nto = ["ops@example.com"]\n'
    )
    gw = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    try:
        gw.wait_ready()
        wait_for(
            lambda: (gw.status() or {})["sources"]["serial:late"] == "absent",
            what="the port reported absent",
        )
        dev = Device(pty.plug(), retry_min=0.2).start()
        seq = dev.alert("t", "info", "late device")
        assert dev.wait_acked({seq}, timeout=40)
        dev.stop()
    finally:
        gw.terminate()


def test_ports_share_one_reader_and_a_url_port_has_its_own(tmp_path: Path) -> None:
    """Two ptys (read by the one hub thread) and a socket:// port (its own thread)."""
    import socket

    ptys = [Pty(tmp_path / f"ttyHUB{i}") for i in range(2)]
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    cfg = tmp_path / "gw.toml"
    cfg.write_text(
        gateway_toml(tmp_path, "gw-hub")
        + "".join(f'[[serial]]\nport = "{p.link}"\nname = "hub{i}"\n' for i, p in enumerate(ptys))
        + f'[[serial]]\nport = "socket://127.0.0.1:{port}"\nname = "net"\n'
        + OPS_ROUTE
    )
    gw = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    devices: list[Device] = []
    try:
        server.settimeout(20)
        conn, _ = server.accept()  # the gateway dialled the "device server"
        gw.wait_ready(("serial:hub0", "serial:hub1", "serial:net"))
        devices = [
            Device(ptys[0].master, device_id="a").start(),
            Device(ptys[1].master, device_id="b").start(),
            Device(conn.fileno(), device_id="c").start(),
        ]
        for i in range(100):
            for d in devices:
                d.alert("temp", "warning", f"{d.device_id} {i}")
        for d in devices:
            assert d.wait_acked(timeout=30), f"{d.device_id}: {d.unacked} never acked"
        got = collections.Counter(m for _, m, _ in rows(tmp_path))
        assert set(got) == {f"{d} {i}" for d in "abc" for i in range(100)}
        assert max(got.values()) == 1
        topics = {t for t, _, _ in rows(tmp_path)}
        assert topics == {"serial/hub0/temp", "serial/hub1/temp", "serial/net/temp"}
        assert gw.terminate() == 0
    finally:
        for d in devices:
            d.stop()
        if gw.alive:
            gw.terminate()
        server.close()
        for p in ptys:
            p.close()


def test_a_device_that_stops_reading_holds_up_nothing_else(tmp_path: Path) -> None:
    """Its replies queue up to a bound and are then dropped (logged once); another port's
    ACKs keep coming, and every alert of both is stored once."""
    ptys = [Pty(tmp_path / f"ttyW{i}") for i in range(2)]
    cfg = tmp_path / "gw.toml"
    cfg.write_text(
        gateway_toml(tmp_path, "gw-wedge")
        + "".join(f'[[serial]]\nport = "{p.link}"\nname = "w{i}"\n' for i, p in enumerate(ptys))
        + OPS_ROUTE
    )
    gw = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    dev = None
    try:
        gw.wait_ready(("serial:w0", "serial:w1"))
        # Port 0: a device that sends and never reads. ~84 KiB of ACKs (7,000 x 12 bytes)
        # is more than the pty holds plus the gateway's 64 KiB queue.
        wedged = codec.encode(codec.Hello(0, "wedged", "1.0", "boot1")) + b"".join(
            codec.encode(codec.Alert(i + 1, "temp", "warning", f"wedged {i}")) for i in range(7000)
        )
        for i in range(0, len(wedged), 4096):
            os.write(ptys[0].master, wedged[i : i + 4096])
        wait_for(lambda: "not reading its replies" in gw.log_text(), 30, "the drop logged")
        # Port 1 is served as usual meanwhile.
        dev = Device(ptys[1].master, device_id="fine").start()
        t0 = time.monotonic()
        seqs = {dev.alert("temp", "warning", f"fine {i}") for i in range(20)}
        assert dev.wait_acked(seqs, timeout=10)
        assert time.monotonic() - t0 < 5
        wait_for(lambda: len(rows(tmp_path)) == 7020, 30, "every alert stored")
        got = collections.Counter(m for _, m, _ in rows(tmp_path))
        assert max(got.values()) == 1
        assert gw.log_text().count("not reading its replies") == 1
        # The device reads again: the queue drains and the gateway says so.
        os.set_blocking(ptys[0].master, False)
        deadline = time.monotonic() + 20
        while "reads its replies again" not in gw.log_text() and time.monotonic() < deadline:
            with contextlib.suppress(BlockingIOError):
                os.read(ptys[0].master, 65536)
            time.sleep(0.01)
        assert "reads its replies again" in gw.log_text()
        assert gw.terminate() == 0
    finally:
        if dev is not None:
            dev.stop()
        if gw.alive:
            gw.terminate()
        for p in ptys:
            p.close()


@settings(max_examples=300)
@given(
    st.builds(
        codec.Alert,
        st.integers(0, codec.MAX_SEQ),
        st.text("abcxyzABC019._:-", min_size=1, max_size=64),
        st.sampled_from(["debug", "info", "warning", "critical"]),
        st.text(max_size=400),
    )
)
def test_a_frame_becomes_the_alert_normalize_would_make(frame: codec.Alert) -> None:
    """The serial source skips normalize() for decoded frames; the result must be the
    same for anything the codec lets through."""
    try:
        wire = codec.encode(frame)
    except ValueError:
        return  # not sendable
    decoded = codec.Decoder().feed(wire)
    if decoded != [frame]:
        return  # the codec refuses it (e.g. control characters): never reaches the source
    stamp = Stamp.now()
    fields: dict[str, str | int | float | bool | None] = {"serial_seq": frame.seq}
    fast = from_frame(frame, frame.sensor, f"serial/p/{frame.sensor}", stamp, fields)
    slow = normalize(
        frame.message,
        Draft(f"serial/p/{frame.sensor}", "serial", frame.sensor, parse_severity(frame.severity)),
        stamp,
        parse_json=False,
        alert_id=fast.id,
        fields=fields,
    )
    assert fast == slow
    assert clean_sensor(frame.sensor) == frame.sensor
