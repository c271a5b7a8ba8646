"""The DATA payload in bounded pieces (gateway/smtp_data.py): the bytes aiosmtplib would
send for the whole message, whatever the pieces, for any bytes."""

from __future__ import annotations

import tracemalloc

from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.smtp_data import DataEncoder, encoded_size, pieces

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
