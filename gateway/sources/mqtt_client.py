"""paho's client, reading ahead and acknowledging in bursts.

paho reads each packet with two or three recv() calls (the type byte, each length
byte, the body) and selects on the socket once per packet. Every one of those calls
gives up the GIL, and getting it back waits on the outbox writer's thread, which is
busy with the previous commit: that hand-off, not parsing, is what bounded ingest.
Here the socket reads up to READ_AHEAD bytes at once and serves paho's small reads
from that buffer; `pending()` tells paho's loop (as it does for TLS) not to wait in
select() while buffered bytes remain, and loop_read() parses what is buffered before
going back to the socket.
"""

from __future__ import annotations

import socket as _socket
import struct
import threading
from collections.abc import Callable, Sequence
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

from gateway.sources.mqtt_cut import Cut, Cutter, ProtocolError

PUBACK = 0x40
READ_AHEAD = 64 * 1024
PACKETS_PER_READ = 256  # bounds a loop_read() so pings and writes still get their turn
PAUSE_POLL = 0.1


class ReadAhead:
    """A stream socket (plain or TLS) whose small reads are served from one large one.

    With a `cutter`, oversized PUBLISH packets are dropped from the stream as they
    arrive (gateway/sources/mqtt_cut.py) and handed to `on_cut` instead of paho.
    """

    def __init__(
        self,
        sock: Any,
        cutter: Cutter | None = None,
        on_cut: Callable[[Cut], None] | None = None,
    ) -> None:
        self._sock = sock
        self.raw = sock  # for TLS, the SSLSocket: still the one file descriptor
        self._view = memoryview(b"")
        self._pos = 0
        self._cutter = cutter
        self._on_cut = on_cut

    def recv(self, size: int) -> bytes:
        if self._pos >= len(self._view):
            data = self._sock.recv(READ_AHEAD)  # BlockingIOError / SSLWantRead pass up
            if data and self._cutter is not None:
                try:
                    data, cuts = self._cutter.feed(data)
                except ProtocolError as exc:  # paho reconnects, as after any loss
                    raise ConnectionError(f"the broker's stream is broken: {exc}") from exc
                for cut in cuts:
                    if self._on_cut is not None:
                        self._on_cut(cut)
                if not data:
                    raise BlockingIOError  # all of it dropped: not the end of the stream
            if len(data) <= size:
                return bytes(data)
            self._view = memoryview(data)
            self._pos = 0
        end = min(self._pos + size, len(self._view))
        out = bytes(self._view[self._pos : end])
        self._pos = end
        return out

    def pending(self) -> int:
        inner = self._sock.pending() if hasattr(self._sock, "pending") else 0
        return len(self._view) - self._pos + int(inner)

    def send(self, buffer: bytes | bytearray) -> int:
        return int(self._sock.send(buffer))

    def close(self) -> None:
        self._view = memoryview(b"")
        self._pos = 0
        self._sock.close()

    def fileno(self) -> int:
        return int(self._sock.fileno())

    def setblocking(self, flag: bool) -> None:
        self._sock.setblocking(flag)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class Client(mqtt.Client):
    """paho's client with read-ahead, burst acks and a bound on what it takes in.

    `may_read` says whether another message may be taken: while it says no, the
    socket is not read (TCP pushes back on the broker) and `room` is waited on for
    up to PAUSE_POLL at a time, so pings and queued acks still go out meanwhile.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.may_read: Callable[[], bool] = lambda: True
        self.room = threading.Event()
        # PUBLISH packets longer than this are dropped unread and acknowledged, with
        # on_oversize told (paho's thread); None: no limit.
        self.max_packet: int | None = None
        self.on_oversize: Callable[[Cut], None] = lambda cut: None

    @property
    def network_thread(self) -> threading.Thread | None:
        """paho's loop thread from loop_start(); None once it has ended (for any reason)."""
        thread: threading.Thread | None = self._thread
        return thread

    def ack_many(self, acks: Sequence[tuple[int, int]]) -> None:
        """Acknowledge many messages with one write: one queued packet of PUBACKs.

        paho queues each ack as its own packet, wakes its thread for it and sends it
        with its own send(); a group commit acknowledges hundreds at once.
        """
        frames = bytearray()
        for mid, qos in acks:
            if qos == 1:
                frames += struct.pack("!BBH", PUBACK, 2, mid)
            elif qos == 2:
                self.ack(mid, qos)
        if frames:
            self._packet_queue(PUBACK, frames, 0, 0)

    def _create_socket(self) -> Any:
        cutter = None if self.max_packet is None else Cutter(self.max_packet)
        return ReadAhead(super()._create_socket(), cutter, self._cut)

    def _cut(self, cut: Cut) -> None:
        # Acknowledged unread: it can never be taken, and unacknowledged the broker
        # would send it again at every reconnect. (We subscribe with QoS 1 at most.)
        if cut.qos == 1 and cut.mid is not None:
            self._packet_queue(PUBACK, struct.pack("!BBH", PUBACK, 2, cut.mid), 0, 0)
        self.on_oversize(cut)

    def _peer_closed(self) -> bool:
        """Has the broker closed the connection? Reading nothing, we would not see it.

        Peeks at the raw socket (for TLS, at the encrypted stream: nothing is consumed).
        Only an end with nothing unread before it shows; otherwise paho's keepalive
        notices the loss.
        """
        sock = self._sock
        if not isinstance(sock, ReadAhead) or sock.pending() > 0:
            return False
        try:
            data = _socket.socket.recv(sock.raw, 1, _socket.MSG_PEEK | _socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            return True
        return data == b""

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        for _ in range(PACKETS_PER_READ):
            if not self.may_read():
                self.room.clear()
                if (
                    not self.may_read()
                    and not self.room.wait(PAUSE_POLL)
                    and not self._peer_closed()
                ):
                    break  # paho's loop sends pings and acks, then comes back here
            rc = super().loop_read(max_packets)
            sock = self._sock
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or not isinstance(sock, ReadAhead):
                break
            if sock.pending() <= 0:
                break
        return rc
