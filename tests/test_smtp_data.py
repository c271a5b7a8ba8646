"""The DATA payload in bounded pieces (gateway/smtp_data.py): the bytes aiosmtplib would
send for the whole message, whatever the pieces, for any bytes."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
import tracemalloc

import aiosmtplib
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.replies import Broken
from gateway.smtp import failure
from gateway.smtp_data import DataEncoder, encoded_size, pieces, send_bytes

# Bytes where line ends, dots and CRs meet piece boundaries often.
_DENSE = st.lists(st.sampled_from([b"\r", b"\n", b".", b"a", b"\r\n", b"\xff"]), max_size=60).map(
    b"".join
)
_MESSAGE = st.one_of(st.binary(max_size=400), _DENSE)


def _whole(message: bytes) -> bytes:
    """What aiosmtplib's execute_data_command writes after DATA."""
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(message)) + b".\r\n"


@settings(max_examples=400)
@given(_MESSAGE, st.lists(st.integers(min_value=0, max_value=50), max_size=20))
def test_any_pieces_give_the_bytes_aiosmtplib_sends_whole(message: bytes, cuts: list[int]) -> None:
    enc = DataEncoder()
    out, pos = [], 0
    for n in cuts:
        out.append(enc.feed(message[pos : pos + n]))
        pos += n
    out.append(enc.feed(message[pos:]))
    out.append(enc.end())
    assert b"".join(out) == _whole(message)


@given(_MESSAGE, st.integers(min_value=1, max_value=64))
def test_pieces_and_size_agree_with_the_whole(message: bytes, piece: int) -> None:
    sent = b"".join(pieces(message, piece))
    assert sent == _whole(message)
    assert encoded_size(message, piece) == len(sent) - 3


def test_ten_mib_of_empty_lines_cost_a_piece_not_a_list_per_line() -> None:
    message = b"Subject: s\n\n" + b"\n" * (10 * 1024 * 1024)
    tracemalloc.start()
    try:
        total = sum(len(p) for p in pieces(message))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == len(message) + message.count(b"\n") + 3
    assert peak < 1024 * 1024, f"{peak} bytes at the peak"


class _StopsReadingAfter354:
    """A real SMTP server on loopback that answers EHLO, MAIL, RCPT and DATA (354),
    then reads nothing more, keeping the connection open: the sender's socket buffers
    fill and stay full."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.stalled = threading.Event()
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self._listener.accept()
            self._socks.append(conn)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            conn.sendall(b"220 stalls\r\n")
            f = conn.makefile("rb")
            while line := f.readline():
                cmd = line[:4].upper()
                if cmd == b"EHLO":
                    conn.sendall(b"250-stalls\r\n250 SIZE 50000000\r\n")
                elif cmd == b"DATA":
                    conn.sendall(b"354 go on\r\n")
                    self.stalled.set()
                    return  # reads nothing more; the socket stays open
                else:
                    conn.sendall(b"250 ok\r\n")

    def close(self) -> None:
        for s in [self._listener, *self._socks]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


def test_a_server_that_stops_reading_after_354_times_out_within_the_timeout() -> None:
    timeout = 2.0
    server = _StopsReadingAfter354()
    message = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 10_000  # about 10 MB

    async def send() -> tuple[Exception, float, bool]:
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=server.port, timeout=timeout, start_tls=False
        )
        await client.connect()
        t0 = time.monotonic()
        try:
            # The outer bound only keeps a failing test from hanging.
            async with asyncio.timeout(timeout + 30):
                await send_bytes(client, "gw@example.com", ["ops@example.com"], message)
        except Exception as exc:
            return exc, time.monotonic() - t0, client.is_connected
        raise AssertionError("the stalled server took the message")

    try:
        exc, took, connected = asyncio.run(send())
    finally:
        server.close()
    assert server.stalled.is_set()
    assert isinstance(exc, aiosmtplib.SMTPTimeoutError), repr(exc)
    assert took < timeout + 3, f"{took:.1f} s"
    assert not connected  # closed: the session is not used again
    # What the relay sees: a session that timed out mid-transaction, which sends it to
    # the fallback at once (relay.py _went_silent).
    result = failure(exc)
    assert isinstance(result, Broken) and result.timed_out, result
