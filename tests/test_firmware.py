"""The wire protocol: the Python codec and the C reference encoder, on the same vectors."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_bridge import codec
from firmware_bridge.crc import CHECK_VALUE, crc16

ROOT = Path(__file__).resolve().parent.parent / "firmware_bridge"
VECTORS = json.loads((ROOT / "vectors.json").read_text())

FRAME_TYPES = {
    "HELLO": codec.Hello,
    "ALERT": codec.Alert,
    "PING": codec.Ping,
    "ACK": codec.Ack,
    "NAK": codec.Nak,
    "PONG": codec.Pong,
}


def frame_of(d: dict[str, object]) -> codec.Frame:
    fields = {k: v for k, v in d.items() if k != "type"}
    return FRAME_TYPES[str(d["type"])](**fields)  # type: ignore[no-any-return]


def test_crc_check_value() -> None:
    assert crc16(b"123456789") == CHECK_VALUE == int(VECTORS["crc_check"]["crc"], 16)


@pytest.mark.parametrize("vector", VECTORS["device_frames"] + VECTORS["gateway_frames"])
def test_python_codec_matches_vectors(vector: dict[str, object]) -> None:
    frame = frame_of(vector["frame"])  # type: ignore[arg-type]
    wire = str(vector["wire"]).encode()
    assert codec.encode(frame) == wire
    assert codec.Decoder().feed(wire) == [frame]


def _c_string(value: str) -> str:
    # Octal escapes: at most 3 digits, so a following digit cannot extend them.
    return (
        '"'
        + "".join(
            chr(b) if 0x20 <= b < 0x7F and chr(b) not in '"\\?' else f"\\{b:03o}"
            for b in value.encode()
        )
        + '"'
    )


def test_c_encoder_matches_vectors_byte_for_byte(tmp_path: Path) -> None:
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (make test installs gcc)")
    rows = []
    for v in VECTORS["device_frames"]:
        f = v["frame"]
        args = {
            "HELLO": (f.get("device_id"), f.get("fw_version"), f.get("boot_id")),
            "ALERT": (f.get("sensor"), f.get("severity"), f.get("message")),
            "PING": ("", "", ""),
        }[f["type"]]
        rows.append(
            f'    {{"{f["type"]}", {f["seq"]}u, '
            + ", ".join(_c_string(a or "") for a in args)
            + "},"
        )
    replies = [v["wire"] for v in VECTORS["gateway_frames"]] + VECTORS["invalid_replies"]
    header = (
        "struct device_vector { const char *type; uint32_t seq; const char *a, *b, *c; };\n"
        "static const struct device_vector device_vectors[] = {\n" + "\n".join(rows) + "\n};\n"
        "static const char *const reply_vectors[] = {\n"
        + "\n".join(f"    {_c_string(r)}," for r in replies)
        + "\n};\n"
    )
    (tmp_path / "vectors.h").write_text(header)
    exe = tmp_path / "test_vectors"
    subprocess.run(
        [
            cc,
            "-std=c99",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-pedantic",
            "-O2",
            f"-I{tmp_path}",
            str(ROOT / "firmware" / "mailgw_proto.c"),
            str(ROOT / "firmware" / "test_vectors.c"),
            "-o",
            str(exe),
        ],
        check=True,
    )
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert lines[0] == "crc 29B1"
    n = len(VECTORS["device_frames"])
    for v, line in zip(VECTORS["device_frames"], lines[1 : 1 + n], strict=True):
        assert bytes.fromhex(line) == v["wire"].encode(), v["frame"]
    kinds = {"ACK": 1, "NAK": 2, "PONG": 3}
    for v, line in zip(VECTORS["gateway_frames"], lines[1 + n :], strict=False):
        f = v["frame"]
        ok, kind, has_seq, seq, *reason = line.split()[1:]
        assert (ok, int(kind)) == ("1", kinds[f["type"]])
        assert has_seq == ("0" if f.get("seq") is None else "1")
        assert int(seq) == (f.get("seq") or 0)
        assert reason == ([f["reason"]] if f["type"] == "NAK" else [])
    invalid = lines[1 + n + len(VECTORS["gateway_frames"]) : -2]
    assert invalid and all(line.split()[1] == "0" for line in invalid)
    assert lines[-2:] == ["small 0", "reserved 0"]


# --- properties ------------------------------------------------------------------

ident = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:-",
    min_size=1,
    max_size=20,
)
message = st.text(
    st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp", "Cf", "Co", "Cn")), max_size=200
).filter(lambda s: "$" not in s and s.isprintable())
seqs = st.integers(0, codec.MAX_SEQ)
frames = st.one_of(
    st.builds(codec.Hello, seqs, ident, ident, ident),
    st.builds(
        codec.Alert, seqs, ident, st.sampled_from(["debug", "info", "warning", "critical"]), message
    ),
    st.builds(codec.Ping, seqs),
    st.builds(codec.Ack, seqs),
    st.builds(codec.Pong, seqs),
    st.builds(codec.Nak, st.none() | seqs, st.sampled_from(["CRC", "FULL", "PARSE", "SIZE"])),
)


@given(st.lists(frames, max_size=8), st.integers(1, 64))
def test_round_trip_in_any_chunking(batch: list[codec.Frame], chunk: int) -> None:
    wire = b"".join(codec.encode(f) for f in batch)
    decoder = codec.Decoder()
    events = []
    for i in range(0, len(wire), chunk):
        events += decoder.feed(wire[i : i + chunk])
    assert events == batch


@settings(max_examples=300)
@given(st.binary(max_size=3000))
def test_arbitrary_bytes_never_raise_or_forge(data: bytes) -> None:
    decoder = codec.Decoder()
    for event in decoder.feed(data):
        if isinstance(event, codec.Alert | codec.Hello):
            # Anything accepted came from an intact frame in the input.
            assert codec.encode(event).rstrip(b"\r\n") in data
    assert len(decoder._buf) <= codec.MAX_LINE


@given(frames, st.data())
def test_one_flipped_bit_is_rejected(frame: codec.Frame, data: st.DataObject) -> None:
    wire = bytearray(codec.encode(frame))
    body_end = len(wire) - 2  # flip within $...*CRC, not the line end
    i = data.draw(st.integers(0, body_end - 1))
    bit = data.draw(st.integers(0, 7))
    wire[i] ^= 1 << bit
    events = codec.Decoder().feed(bytes(wire))
    assert frame not in events
    assert all(isinstance(e, codec.FrameError) for e in events if e != frame)


ascii_message = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E, blacklist_characters="$"), max_size=120
)
alert_frames = st.builds(
    codec.Alert, seqs, ident, st.sampled_from(["debug", "info", "warning", "critical"]), message
) | st.builds(codec.Alert, seqs, ident, st.sampled_from(["info", "warning"]), ascii_message)


@settings(max_examples=500)
@given(alert_frames, st.data())
def test_the_fast_alert_path_agrees_with_the_general_parser(
    frame: codec.Alert, data: st.DataObject
) -> None:
    """The shortcut for ALERT lines either declines or returns what parse_line's
    general path returns: on intact frames, on damaged ones, and on damage a device
    then sealed with a valid CRC (control bytes, non-ASCII, extra separators)."""
    wire = codec.encode(frame)
    body = bytearray(wire[1 : wire.rindex(b"*")])
    for _ in range(data.draw(st.integers(0, 3))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        i = data.draw(st.integers(0, len(body) - 1))
        if op == "flip":
            body[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "insert":
            body.insert(i, data.draw(st.sampled_from(b"$*,\t\x00\x7f9AFa \xc3\xff")))
        elif len(body) > 1:
            del body[i]
    crc = crc16(bytes(body)) if data.draw(st.booleans()) else int(wire[-6:-2], 16)
    line = b"$%s*%04X" % (body, crc) + data.draw(st.sampled_from([b"", b"\r", b"\r\r", b" "]))
    fast = codec._fast_alert(line)
    assert fast is None or fast == codec._parse_line(line)
    if (
        line.rstrip(b"\r") == wire.rstrip(b"\r\n")
        and frame.message.isascii()
        and line[-2:] != b"\r\r"
    ):
        assert fast == frame  # the common case does take the shortcut


@given(st.lists(seqs, max_size=20))
def test_encode_acks_is_encode(batch: list[int]) -> None:
    assert codec.encode_acks(batch) == b"".join(codec.encode(codec.Ack(s)) for s in batch)
    with pytest.raises(ValueError):
        codec.encode_acks([*batch, codec.MAX_SEQ + 1])


@pytest.mark.parametrize("severity", [b"warning", b"crit", b"WARNING", b"warn", b""])
@pytest.mark.parametrize(
    "odd", [bytes([b]) for b in b"\x00\t\x1f\x7f\x80\xc3\xff$*,"] + [b"\xc3\xa9"]
)
def test_the_fast_alert_path_on_sealed_odd_bytes(severity: bytes, odd: bytes) -> None:
    for body in (
        b"ALERT,7,temp," + severity + b",a" + odd + b"b",
        b"ALERT,7,te" + odd + b"mp," + severity + b",ab",
        b"ALERT,7" + odd + b",temp," + severity + b",ab",
    ):
        line = b"$%s*%04X\r" % (body, crc16(body))
        fast = codec._fast_alert(line)
        assert fast is None or fast == codec._parse_line(line), line


@settings(max_examples=300)
@given(st.binary(max_size=600))
def test_the_fast_alert_path_never_accepts_what_the_parser_rejects(line: bytes) -> None:
    fast = codec._fast_alert(b"$ALERT," + line)
    assert fast is None or fast == codec._parse_line(b"$ALERT," + line)


def test_garbage_then_frame_resynchronises() -> None:
    events = codec.Decoder().feed(b"\x00\xffnoise$$garbage\r\n" + codec.encode(codec.Ping(5)))
    assert events[-1] == codec.Ping(5)
    assert isinstance(events[0], codec.FrameError)


def test_overlong_line_is_one_size_error_and_memory_stays_bounded() -> None:
    decoder = codec.Decoder()
    events = []
    for _ in range(100):
        events += decoder.feed(b"$" + b"A" * 999)
        assert len(decoder._buf) <= codec.MAX_LINE
    events += decoder.feed(b"\r\n" + codec.encode(codec.Ping(1)))
    assert [type(e) for e in events] == [codec.FrameError, codec.Ping]
    assert events[0].reason is codec.Reason.SIZE  # type: ignore[union-attr]


def test_decoder_is_linear() -> None:
    """A hostile peer trickling one byte at a time must not make parsing quadratic."""
    decoder = codec.Decoder()
    line = b"$" + b"x" * 500
    for i in range(len(line)):
        decoder.feed(line[i : i + 1])
    assert decoder._scanned == len(line)  # never rescanned from the start


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"$ALERT,1,temp,critical,msg*0000", codec.Reason.CRC),
        (b"$ALERT,1,temp,loud,msg", codec.Reason.PARSE),
        (b"hello there", codec.Reason.PARSE),
    ],
)
def test_rejections(line: bytes, reason: codec.Reason) -> None:
    (event,) = codec.Decoder().feed(line + b"\r\n")
    assert isinstance(event, codec.FrameError) and event.reason is reason


def test_parse_errors_carry_seq_for_the_nak() -> None:
    body = b"ALERT,9,temp,loud,msg"
    (event,) = codec.Decoder().feed(b"$" + body + b"*%04X\r\n" % crc16(body))
    assert isinstance(event, codec.FrameError) and event.seq == 9
    assert event.reason is codec.Reason.PARSE


def test_encode_refuses_reserved_characters() -> None:
    with pytest.raises(ValueError):
        codec.encode(codec.Alert(1, "a,b", "info", "m"))
    with pytest.raises(ValueError):
        codec.encode(codec.Alert(1, "a", "info", "line\nbreak"))
    with pytest.raises(ValueError):
        codec.encode(codec.Alert(1, "a", "info", "m" * 600))
