"""The oversized-PUBLISH cutter, sans-IO: packets in any chunking, what paho gets out."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.sources.mqtt_cut import TOPIC_KEPT, Cut, Cutter, ProtocolError


def remaining(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish(topic: bytes, payload: bytes, qos: int, mid: int) -> bytes:
    var = len(topic).to_bytes(2, "big") + topic + (mid.to_bytes(2, "big") if qos else b"")
    body = var + payload
    return bytes([0x30 | (qos << 1)]) + remaining(len(body)) + body


packets = st.one_of(
    st.builds(
        lambda t, size, qos, mid: ("publish", t, size, qos, mid),
        st.binary(min_size=1, max_size=300),
        st.integers(0, 3000),
        st.integers(0, 1),
        st.integers(1, 65535),
    ),
    st.builds(lambda body: ("other", body), st.binary(max_size=40)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(packets, max_size=12), st.integers(1, 700), st.integers(0, 1500))
def test_paho_gets_every_packet_but_the_oversized_ones(
    plan: list[tuple], chunk: int, limit: int
) -> None:
    stream, expected_out, expected_cuts = b"", b"", []
    for p in plan:
        if p[0] == "publish":
            _, topic, size, qos, mid = p
            raw = publish(topic, b"x" * size, qos, mid)
            body_len = len(raw) - 1 - len(remaining(len(raw) - 1 - 1))
            length = len(topic) + 2 + (2 if qos else 0) + size
            assert body_len >= 0
            if length > limit:
                expected_cuts.append(
                    Cut(qos, mid if qos else None, topic[:TOPIC_KEPT], length, size)
                )
            else:
                expected_out += raw
        else:
            raw = bytes([0x90]) + remaining(len(p[1])) + p[1]  # a SUBACK-typed packet
            expected_out += raw
        stream += raw
    cutter = Cutter(limit)
    out, cuts = b"", []
    for i in range(0, len(stream), chunk):
        got, cut = cutter.feed(stream[i : i + chunk])
        out += got
        cuts += cut
    assert out == expected_out
    assert cuts == expected_cuts


def test_a_huge_publish_is_dropped_with_bounded_memory() -> None:
    cutter = Cutter(64 * 1024)
    size = 150 * 1024 * 1024
    head = publish(b"alerts/big", b"", 1, 77)
    header = bytes([head[0]]) + remaining(len(head) - 2 + size)
    stream_start = header + head[2:]
    out, cuts = cutter.feed(stream_start)
    assert out == b"" and cuts == []
    block = b"y" * (1 << 20)
    for _ in range(150):
        out, cuts = cutter.feed(block)
        assert out == b""
        assert len(cutter._var) <= 4 + len(b"alerts/big")
    assert cuts == [Cut(1, 77, b"alerts/big", len(head) - 2 + size, size)]
    nxt = publish(b"alerts/ok", b"fine", 1, 78)
    assert cutter.feed(nxt) == (nxt, [])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000), st.integers(0, 100))
def test_arbitrary_bytes_never_crash(data: bytes, limit: int) -> None:
    cutter = Cutter(limit)
    try:
        out, _ = cutter.feed(data)
    except ProtocolError:
        return
    assert len(out) <= len(data)


def test_a_fifth_length_byte_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        Cutter(10).feed(bytes([0x30, 0x80, 0x80, 0x80, 0x80, 0x01]))
