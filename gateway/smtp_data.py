"""A message's bytes → the DATA payload, in bounded pieces (sans-IO), and its sending.

aiosmtplib prepares DATA with two regex substitutions over the whole message (lone CR
or LF → CRLF, a leading "." doubled). For a message of short lines, each match costs
the substitution a list entry and a piece: a 10 MiB message of empty lines needs
hundreds of MiB, over the unit's MemoryMax. DataEncoder produces the same bytes
(RFC 5321 4.5.2 transparency, CRLF line ends, the closing "." line) one piece at a
time with bytes.replace, whose cost is a copy of the piece, whatever its lines; so a
message of any shape costs the gateway a piece's memory on top of the message itself.

send_bytes is aiosmtplib's sendmail with this DATA: MAIL (with SIZE when offered),
RCPT per recipient (refusals as data, all refused an SMTPRecipientsRefused), DATA
written piece by piece under the transport's flow control, RSET after a refusal.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence

import aiosmtplib

PIECE = 64 * 1024  # bytes of the message encoded and written at a time


class DataEncoder:
    """feed(bytes) → encoded bytes, end() → the rest and the closing ".". Feeding a
    message in any pieces gives the bytes aiosmtplib's data() would send for it whole."""

    def __init__(self) -> None:
        self._cr = False  # the last piece ended in CR: a CRLF or a lone CR, not known yet
        self._line_start = True  # the next byte out begins a line (dot-stuffing)
        self._sent = False  # anything encoded yet (an empty message still gets a CRLF)

    def feed(self, data: bytes | memoryview) -> bytes:
        chunk = bytes(data)
        if self._cr:
            chunk = b"\r" + chunk
            self._cr = False
        if chunk.endswith(b"\r"):
            self._cr = True
            chunk = chunk[:-1]
        return self._encode(chunk)

    def end(self) -> bytes:
        tail = b"\n" if self._cr else b""  # a lone CR at the very end is a line end
        self._cr = False
        out = self._encode(tail)
        if not self._line_start or not self._sent:
            out += b"\r\n"
        return out + b".\r\n"

    def _encode(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        # CRLF and lone CR become LF, then every LF a CRLF: line ends as aiosmtplib's.
        out = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        out = out.replace(b"\r\n.", b"\r\n..")
        if self._line_start and out.startswith(b"."):
            out = b"." + out
        self._line_start = out.endswith(b"\r\n")
        self._sent = True
        return out


def encoded_size(message: bytes | bytearray | memoryview, piece: int = PIECE) -> int:
    """The octets DATA carries before its closing ".", piece by piece: RFC 1870's SIZE
    with line ends made CRLF (as aiosmtplib counts) and doubled dots (a few more: SIZE
    is an estimate the server checks against its limit, and a larger one is safe)."""
    enc = DataEncoder()
    view = memoryview(message)
    n = sum(len(enc.feed(view[i : i + piece])) for i in range(0, len(view), piece))
    return n + len(enc.end()) - 3


def pieces(message: bytes | bytearray | memoryview, piece: int = PIECE) -> Iterator[bytes]:
    """The DATA payload for `message`, ending with the "." line, `piece` bytes of the
    message at a time."""
    enc = DataEncoder()
    view = memoryview(message)
    for i in range(0, len(view), piece):
        if out := enc.feed(view[i : i + piece]):
            yield out
    yield enc.end()


async def send_bytes(
    client: aiosmtplib.SMTP, sender: str, recipients: Sequence[str], message: bytes | bytearray
) -> tuple[dict[str, aiosmtplib.SMTPResponse], str]:
    """Send `message` (bytes as they are to go, line ends normalised on the way) as
    aiosmtplib's sendmail does: refused recipients and the final reply's text, or its
    exceptions."""
    await client._ehlo_or_helo_if_needed()
    options = [f"SIZE={encoded_size(message)}"] if client.supports_extension("size") else []
    try:
        await client.mail(sender, options=options)
        refused: dict[str, aiosmtplib.SMTPResponse] = {}
        errors: list[aiosmtplib.SMTPRecipientRefused] = []
        for rcpt in recipients:
            try:
                await client.rcpt(rcpt)
            except aiosmtplib.SMTPRecipientRefused as exc:
                errors.append(exc)
                refused[exc.recipient] = aiosmtplib.SMTPResponse(exc.code, exc.message)
        if len(errors) == len(recipients):
            raise aiosmtplib.SMTPRecipientsRefused(errors)
        reply = await _data(client, message)
    except (aiosmtplib.SMTPResponseException, aiosmtplib.SMTPRecipientsRefused):
        # The refusal is what the caller needs to see, not a failed RSET after it.
        with contextlib.suppress(ConnectionError, aiosmtplib.SMTPResponseException):
            await client.rset()
        raise
    return refused, reply.message


async def _data(client: aiosmtplib.SMTP, message: bytes | bytearray) -> aiosmtplib.SMTPResponse:
    start = await client.execute_command(b"DATA")
    if start.code != aiosmtplib.SMTPStatus.start_input:
        raise aiosmtplib.SMTPDataError(start.code, start.message)
    protocol = client.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    # Set before the first byte goes, as aiosmtplib does for every command: a reply that
    # arrives while no response is pending is dropped by its protocol.
    protocol._response_pending = True
    try:
        for out in pieces(message):
            protocol.write(out)
            # The transport's buffer is bounded by its flow control: wait while it is
            # above its high-water mark instead of queueing the whole message. A server
            # that stops reading keeps it there for ever: each wait gets smtp.timeout,
            # as a reply does, so the relay sees a session that went silent.
            try:
                async with asyncio.timeout(client.timeout):
                    await protocol._drain_helper()
            except TimeoutError:
                raise aiosmtplib.SMTPTimeoutError(
                    f"the server stopped reading the message ({client.timeout:g} s)"
                ) from None
        reply = await protocol.read_response(timeout=client.timeout)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, ConnectionError):
        client.close()
        raise
    if reply.code != aiosmtplib.SMTPStatus.completed:
        raise aiosmtplib.SMTPDataError(reply.code, reply.message)
    return reply
