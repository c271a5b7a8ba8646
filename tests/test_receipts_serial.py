"""Receipts over the serial line: the ALERTR, RCPT and RACK frames (the Python codec
and the C reference on the same vectors, property tests), the session's handling, and
the daemon on a real pty sending a RCPT after the smarthost's 250, again until RACKed."""

from __future__ import annotations

import asyncio
import json
import os
import select
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_bridge import codec
from gateway.alert import Draft, normalize
from gateway.clock import Stamp
from gateway.lab import SmtpServer
from gateway.outbox import Outbox, Outcome, Routed, State
from gateway.outbox.writer import Writer
from gateway.receipts import SERIAL, Ask, Due
from gateway.sources.serial_receipts import SerialReceipts, receipt_frame
from gateway.sources.serial_session import Session
from tests.parts import DaemonProcess, Pki, Pty, daemon_config, stored_alerts, wait_for

ROOT = Path(__file__).resolve().parent.parent / "firmware_bridge"
VECTORS = json.loads((ROOT / "vectors.json").read_text())["receipt_frames"]


def frame_of(d: dict[str, object]) -> codec.Frame:
    fields = {k: v for k, v in d.items() if k != "type"}
    kind = {"ALERTR": codec.Alert, "RCPT": codec.Receipt, "RACK": codec.ReceiptAck}[str(d["type"])]
    return kind(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("vector", VECTORS["device_frames"] + VECTORS["gateway_frames"])
def test_python_codec_matches_the_receipt_vectors(vector: dict[str, object]) -> None:
    frame = frame_of(vector["frame"])  # type: ignore[arg-type]
    wire = str(vector["wire"]).encode()
    assert codec.encode(frame) == wire
    assert codec.Decoder().feed(wire) == [frame]


def test_invalid_receipts_are_not_receipts() -> None:
    for line in VECTORS["invalid_receipts"]:
        assert not any(isinstance(e, codec.Receipt) for e in codec.Decoder().feed(line.encode()))


def _c(value: str) -> str:
    return (
        '"'
        + "".join(
            chr(b) if 0x20 <= b < 0x7F and chr(b) not in '"\\?' else f"\\{b:03o}"
            for b in value.encode()
        )
        + '"'
    )


def test_c_reference_encodes_and_decodes_the_receipt_vectors(tmp_path: Path) -> None:
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (make test installs gcc)")
    alerts = [v for v in VECTORS["device_frames"] if v["frame"]["type"] == "ALERTR"]
    racks = [v for v in VECTORS["device_frames"] if v["frame"]["type"] == "RACK"]
    rcpts = [v["wire"] for v in VECTORS["gateway_frames"]] + VECTORS["invalid_receipts"]
    f = [v["frame"] for v in alerts]
    header = (
        "struct alert_r_vector { uint32_t seq; const char *receipt, *sensor, *severity,"
        " *message; };\nstatic const struct alert_r_vector alert_r_vectors[] = {\n"
        + "\n".join(
            f"    {{{a['seq']}u, {_c(a['receipt'])}, {_c(a['sensor'])}, {_c(a['severity'])},"
            f" {_c(a['message'])}}},"
            for a in f
        )
        + "\n};\nstatic const char *const rack_vectors[] = {\n"
        + "\n".join(f"    {_c(v['frame']['receipt'])}," for v in racks)
        + "\n};\nstatic const char *const rcpt_vectors[] = {\n"
        + "\n".join(f"    {_c(r)}," for r in rcpts)
        + "\n};\n"
    )
    (tmp_path / "receipt_vectors.h").write_text(header)
    exe = tmp_path / "test_receipts"
    subprocess.run(
        [
            *(cc, "-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-O2"),
            f"-I{tmp_path}",
            str(ROOT / "firmware" / "mailgw_proto.c"),
            str(ROOT / "firmware" / "test_receipts.c"),
            *("-o", str(exe)),
        ],
        check=True,
    )
    lines = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    out = lines.splitlines()
    for v, line in zip(alerts + racks, out, strict=False):
        assert bytes.fromhex(line) == v["wire"].encode(), v["frame"]
    decoded = out[len(alerts) + len(racks) : -2]
    for v, line in zip(VECTORS["gateway_frames"], decoded, strict=False):
        r = v["frame"]
        sent = "1" if r["outcome"] == "SENT" else "0"
        assert line == f"rcpt 1 {sent} {r['receipt']} {r['alert_id']}|{r['reason']}"
    invalid = decoded[len(VECTORS["gateway_frames"]) :]
    assert len(invalid) == len(VECTORS["invalid_receipts"])
    assert all(line.startswith("rcpt 0 ") for line in invalid)
    assert out[-2:] == ["long 0", "reserved 0"]


# --- properties ------------------------------------------------------------------------

rid = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:-",
    min_size=1,
    max_size=codec.MAX_RECEIPT_ID,
)
ident = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._:-", min_size=1, max_size=36)
text = st.text(
    st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp", "Cf", "Co", "Cn")), max_size=150
).filter(lambda s: "$" not in s and s.isprintable())
receipt_frames = st.one_of(
    st.builds(
        codec.Alert,
        st.integers(0, codec.MAX_SEQ),
        ident,
        st.sampled_from(["debug", "info", "warning", "critical"]),
        text,
        rid,
    ),
    st.builds(codec.Receipt, rid, st.sampled_from(["SENT", "DEAD"]), ident, text),
    st.builds(codec.ReceiptAck, rid),
)


@given(st.lists(receipt_frames, max_size=6), st.integers(1, 64))
def test_receipt_frames_round_trip_in_any_chunking(batch: list[codec.Frame], chunk: int) -> None:
    wire = b"".join(codec.encode(f) for f in batch)
    decoder = codec.Decoder()
    events: list[codec.Event] = []
    for i in range(0, len(wire), chunk):
        events += decoder.feed(wire[i : i + chunk])
    assert events == batch


@settings(max_examples=300)
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=200),
            st.sampled_from([b"$ALERTR,", b"$RCPT,", b"$RACK,", b"*", b",", b"\r\n"]),
        )
    )
)
def test_arbitrary_bytes_around_receipt_frames_never_raise_or_forge(parts: list[bytes]) -> None:
    data = b"".join(parts)
    for event in codec.Decoder().feed(data):
        if isinstance(event, codec.Alert | codec.Receipt | codec.ReceiptAck):
            assert codec.encode(event).rstrip(b"\r\n") in data


@given(rid, st.sampled_from(["sent", "dead"]), st.one_of(st.none(), st.text(max_size=2000)))
def test_any_due_receipt_makes_a_frame_that_fits_and_decodes(
    r: str, outcome: str, reason: str | None
) -> None:
    due = Due(
        1,
        "ops",
        "serial",
        "bench1",
        r.encode(),
        False,
        "01a22d27-5253-71cc-bcdc-74f0f9b96ef5",
        outcome,
        reason,
        "x",
        "mail",
        (),
        1,
        0.0,
    )
    wire = codec.encode(receipt_frame(due))
    assert len(wire) <= codec.MAX_LINE
    [got] = codec.Decoder().feed(wire)
    assert isinstance(got, codec.Receipt)
    assert (got.receipt, got.outcome, got.alert_id) == (r, outcome.upper(), due.alert_id)


# --- the session -------------------------------------------------------------------------


def test_the_session_takes_a_request_a_rack_and_refuses_what_it_only_sends() -> None:
    s = Session("bench1")
    stamp = Stamp.now()
    s.receive([codec.Hello(1, "cab-9", "2.1", "b")], stamp)
    out = s.receive(
        codec.Decoder().feed(
            codec.encode(codec.Alert(2, "door", "critical", "open", "r-1"))
            + codec.encode(codec.ReceiptAck("r-0"))
            + codec.encode(codec.Receipt("r-9", "SENT", "a", ""))
        ),
        stamp,
    )
    [p] = out.alerts
    assert p.receipt == Ask("serial", "bench1", b"r-1")
    assert out.receipts_read == ["r-0"]
    assert out.replies == [codec.Nak(None, "TYPE")] and out.rejected == [("serial_type", None)]


def test_an_oversized_receipt_id_is_a_counted_parse_error_and_intake_goes_on() -> None:
    body = b"ALERTR,3," + b"r" * (codec.MAX_RECEIPT_ID + 1) + b",door,info,open"
    from firmware_bridge.crc import crc16

    line = b"$" + body + b"*%04X\r\n" % crc16(body)
    ok = codec.encode(codec.Alert(4, "door", "info", "still open"))
    s = Session("bench1")
    s.receive([codec.Hello(1, "cab-9", "2.1", "b")], Stamp.now())
    out = s.receive(codec.Decoder().feed(line + ok), Stamp.now())
    assert out.replies == [codec.Nak(3, "PARSE")] and out.rejected[0][0] == "serial_parse"
    assert [p.alert.message for p in out.alerts] == ["still open"]


# --- the daemon on a pty -------------------------------------------------------------------


def read_frames(master: int, want: int, timeout: float = 20.0) -> list[codec.Event]:
    decoder = codec.Decoder()
    events: list[codec.Event] = []
    deadline = time.monotonic() + timeout
    while len(events) < want and time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            events += decoder.feed(os.read(master, 4096))
    return events


def receipt_states(db: Path) -> list[str]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [r[0] for r in conn.execute("SELECT state FROM receipt")]
    finally:
        conn.close()


def test_a_serial_device_gets_its_receipt_after_the_250_until_it_racks_across_a_kill_9(
    tmp_path: Path, pki: Pki, pty: Pty
) -> None:
    with SmtpServer(pki, "starttls") as smtp:
        smtp.stop()  # the mail waits: the RCPT must wait with it
        cfg = daemon_config(tmp_path, pki, smtp.port)
        cfg.write_text(cfg.read_text() + f'[[serial]]\nport = "{pty.link}"\nname = "cold"\n')
        gw = DaemonProcess(cfg, tmp_path / "daemon.log").start()
        gw.wait_ready(("serial:cold",))
        os.write(pty.master, codec.encode(codec.Hello(1, "cab-9", "2.1", "boot-a")))
        os.write(pty.master, codec.encode(codec.Alert(2, "temp", "critical", "9.5 C", "cr3-1")))
        assert read_frames(pty.master, 2) == [codec.Ack(1), codec.Ack(2)]
        assert read_frames(pty.master, 1, timeout=2.5) == []  # no mail, no receipt
        smtp.start()
        [first] = read_frames(pty.master, 1)
        [mail] = smtp.received  # the 250 came before the RCPT
        [(_, _, alert_id)] = stored_alerts(tmp_path / "state/outbox.db")
        assert first == codec.Receipt("cr3-1", "SENT", alert_id, "")
        assert "9.5 C" in str(mail.message["Subject"])
        # Not acknowledged: sent again (the line may have lost it)...
        assert read_frames(pty.master, 1, timeout=15) == [first]
        # ...and by the next run after a kill -9: it is kept in the outbox until its RACK.
        gw.kill9()
        gw.start()
        gw.wait_ready(("serial:cold",))
        assert read_frames(pty.master, 1, timeout=15) == [first]
        os.write(pty.master, codec.encode(codec.ReceiptAck("cr3-1")))
        db = tmp_path / "state/outbox.db"
        wait_for(lambda: receipt_states(db) == ["published"], what="the RACK recorded")
        assert read_frames(pty.master, 1, timeout=7) == []  # and not sent again
        assert gw.terminate() == 0


def test_the_simulated_device_gets_a_dead_letters_receipt_and_racks_it(
    tmp_path: Path, pki: Pki, pty: Pty
) -> None:
    from firmware_bridge.device import Device

    with SmtpServer(pki, "starttls") as smtp:
        smtp.script.data_refusal = "550 5.7.1 message refused by policy"
        cfg = daemon_config(tmp_path, pki, smtp.port)
        cfg.write_text(cfg.read_text() + f'[[serial]]\nport = "{pty.link}"\nname = "cold"\n')
        gw = DaemonProcess(cfg, tmp_path / "daemon.log").start()
        gw.wait_ready(("serial:cold",))
        dev = Device(pty.master, device_id="cab-9", retry_min=0.2).start()
        dev.alert("temp", "critical", "9.5 C", receipt="b00t-2")
        wait_for(lambda: "b00t-2" in dev.receipts, what="the RCPT")
        rcpt = dev.receipts["b00t-2"]
        assert rcpt.outcome == "DEAD" and "550 5.7.1 message refused by policy" in rcpt.reason
        db = tmp_path / "state/outbox.db"
        wait_for(lambda: receipt_states(db) == ["published"], what="RACKed")
        dev.stop()
        assert gw.terminate() == 0


def test_one_rack_acknowledges_one_of_two_routes_receipts(tmp_path: Path) -> None:
    """An alert mailed on two routes has two receipts with one id; a RACK names only the
    id, so the second RCPT is sent after the first is acknowledged, and a frame lost on
    the line is sent again (found by review: one RACK marked both)."""
    ob = Outbox(tmp_path / "o.db")
    writer = Writer(ob)
    writer.start()
    try:
        alert = normalize(b"door open", Draft("alerts/x", "serial", "door"))
        ask = Ask(SERIAL, "/dev/ttyS9", b"r-42", False)
        ob.add([Routed(alert, (("ops", 2), ("fac", 2)), receipt=ask)])
        ob.finish([Outcome(c.key, State.SENT) for c in ob.claim(10, now=1e12)])
        sent: list[bytes] = []
        receipts = SerialReceipts("/dev/ttyS9", writer, sent.append)

        def rcpts() -> list[codec.Receipt]:
            return [e for e in codec.Decoder().feed(b"".join(sent)) if isinstance(e, codec.Receipt)]

        asyncio.run(receipts.tick(True))
        assert len(rcpts()) == 1  # one in flight per receipt id
        receipts.read(["r-42"])
        writer.call(lambda _: None).result(5)  # the mark is written
        asyncio.run(receipts.tick(True))
        assert len(rcpts()) == 2  # now the other route's
        receipts.read(["r-42"])
        writer.call(lambda _: None).result(5)
        states = ob.conn.execute("SELECT route, state FROM receipt ORDER BY route").fetchall()
        assert states == [("fac", "published"), ("ops", "published")]
    finally:
        writer.stop()


def test_resends_back_off_to_a_cap_and_never_give_up() -> None:
    from gateway.sources.serial_receipts import RESEND_MAX, resend_after

    gaps = [resend_after(n) for n in range(1, 40)]
    assert gaps[:4] == [5.0, 10.0, 20.0, RESEND_MAX] and set(gaps[3:]) == {RESEND_MAX}


def test_a_device_silent_past_45_s_still_gets_its_receipt_when_it_comes_back(
    tmp_path: Path, pki: Pki, pty: Pty
) -> None:
    """PROTOCOL.md: the outcome is kept until the RACK. A device that reboots for a
    minute behind an open UART (it reads nothing, RACKs nothing) gets its RCPT again
    once it is back: at its HELLO, and by the capped resends without one."""
    with SmtpServer(pki, "starttls") as smtp:
        cfg = daemon_config(tmp_path, pki, smtp.port)
        cfg.write_text(cfg.read_text() + f'[[serial]]\nport = "{pty.link}"\nname = "cold"\n')
        gw = DaemonProcess(cfg, tmp_path / "daemon.log").start()
        gw.wait_ready(("serial:cold",))
        os.write(pty.master, codec.encode(codec.Hello(1, "cab-9", "2.1", "boot-a")))
        os.write(pty.master, codec.encode(codec.Alert(2, "temp", "critical", "9.5 C", "cr3-9")))
        assert read_frames(pty.master, 2) == [codec.Ack(1), codec.Ack(2)]
        [first] = read_frames(pty.master, 1)
        assert isinstance(first, codec.Receipt) and first.receipt == "cr3-9"
        db = tmp_path / "state/outbox.db"
        # The device is gone for 50 s: what reaches the line is lost (read and dropped).
        lost = read_frames(pty.master, 100, timeout=50)
        assert lost and set(lost) == {first}
        assert len(lost) <= 4  # backing off: 5, 10, 20, 30 s apart, not every 5 s
        assert receipt_states(db) == ["due"]  # kept, not given up
        # Back from its reboot: a HELLO from a new boot gets the RCPT again at once.
        os.write(pty.master, codec.encode(codec.Hello(1, "cab-9", "2.1", "boot-b")))
        events = read_frames(pty.master, 2, timeout=5)
        assert events == [codec.Ack(1), first]
        os.write(pty.master, codec.encode(codec.ReceiptAck("cr3-9")))
        wait_for(lambda: receipt_states(db) == ["published"], what="the RACK recorded")
        assert gw.terminate() == 0
