"""The read-ahead socket under paho: the byte stream paho sees is the one sent."""

from __future__ import annotations

import socket

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.sources.mqtt_client import ReadAhead


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(min_size=0, max_size=100_000),
    reads=st.lists(st.integers(min_value=1, max_value=70_000), min_size=1, max_size=50),
)
def test_small_reads_from_one_large_one_keep_the_stream(data: bytes, reads: list[int]) -> None:
    a, b = socket.socketpair()
    try:
        a.sendall(data)  # fits in the socket pair's buffer: no reader needed yet
        a.shutdown(socket.SHUT_WR)
        sock = ReadAhead(b)
        got = bytearray()
        i = 0
        while True:
            size = reads[i % len(reads)]
            i += 1
            chunk = sock.recv(size)
            assert len(chunk) <= size
            if not chunk:
                break
            got += chunk
            assert sock.pending() >= 0
        assert bytes(got) == data
        assert sock.pending() == 0
    finally:
        a.close()
        b.close()


def test_pending_counts_what_is_buffered() -> None:
    a, b = socket.socketpair()
    try:
        a.sendall(b"\x30\x05abcde" * 3)
        sock = ReadAhead(b)
        assert sock.recv(1) == b"\x30"
        assert sock.pending() == 20  # the rest of the first recv() waits in the buffer
        assert sock.recv(1) == b"\x05"
        assert sock.recv(5) == b"abcde"
        assert sock.pending() == 14
        assert sock.fileno() == b.fileno()
    finally:
        a.close()
        b.close()


def test_a_read_past_the_buffer_returns_what_is_left() -> None:
    a, b = socket.socketpair()
    try:
        a.sendall(b"\x00\x00")
        sock = ReadAhead(b)
        assert sock.recv(1) == b"\x00"
        assert sock.recv(2) == b"\x00"  # short, as recv() may be
        assert sock.pending() == 0
    finally:
        a.close()
        b.close()
