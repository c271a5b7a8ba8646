"""paho's client for the MQTT source: made from the config, reading ahead, acking in bursts.

`make_client` builds the session the gateway needs: MQTT 3.1.1 or 5, a persistent
session, manual acks, TLS (>= 1.2) and credentials from the config, a will that says
"offline". `Client` changes how paho reads and acks, and nothing else.

paho reads each packet with two or three recv() calls (the type byte, each length
byte, the body) and selects on the socket once per packet. Every one of those calls
gives up the GIL, and getting it back means waiting for the outbox writer's thread,
which is busy with the previous commit. So the socket here reads up to READ_AHEAD
bytes at once and serves paho's small reads from that buffer; `pending()` tells paho's
loop (as it does for TLS) not to wait in select() while buffered bytes remain, and
loop_read() parses what is buffered before going back to the socket. Acks go out as
one write per group commit (`ack_many`), not one packet and one wake-up each.
"""

from __future__ import annotations

import logging
import socket as _socket
import ssl
import struct
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.config import MqttSection
from gateway.sources.mqtt_cut import Cut, Cutter, ProtocolError

log = logging.getLogger(__name__)

PUBACK = 0x40
READ_AHEAD = 64 * 1024
PACKETS_PER_READ = 256  # bounds a loop_read() so pings and writes still get their turn
PAUSE_POLL = 0.1
SESSION_NEVER_EXPIRES = 0xFFFFFFFF
RECONNECT_MAX = 30  # seconds between connection attempts, at most
MAX_QUEUED = 1000  # our own publishes paho queues while disconnected
# A packet's topic (up to 64 KiB), packet id and MQTT 5 properties come on top of its
# payload: only packets past max_payload plus this are surely oversized.
OVERSIZE_SLACK = 128 * 1024


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


def _not_paho_noise(record: logging.LogRecord) -> bool:
    # paho logs this at ERROR on every reconnect attempt while the broker is away; the
    # source says so once, with the broker's address.
    return not str(record.msg).startswith("Client is not connected")


_paho_log = logging.getLogger("gateway.sources.paho")
_paho_log.addFilter(_not_paho_noise)


def make_client(cfg: MqttSection, client_id: str, will_topic: str) -> Client:
    """A client for a persistent session with manual acks; no callbacks set yet."""
    v5 = cfg.protocol == "5"
    client = Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=None if v5 else False,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        manual_ack=True,
    )
    client.enable_logger(_paho_log)
    # A bug in a callback must not end paho's network thread: the daemon would stay
    # up, "connected", and take no MQTT alert again. paho logs the exception instead.
    client.suppress_exceptions = True
    client.reconnect_delay_set(min_delay=1, max_delay=RECONNECT_MAX)
    client.max_queued_messages_set(MAX_QUEUED)
    client.will_set(will_topic, "offline", qos=1, retain=True)
    if cfg.username:
        client.username_pw_set(cfg.username, _password(cfg))
    if cfg.tls:
        ctx = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if cfg.cert_file:
            ctx.load_cert_chain(str(cfg.cert_file), str(cfg.key_file) if cfg.key_file else None)
        client.tls_set_context(ctx)
    # Past this a PUBLISH is dropped as it arrives, never buffered (mqtt_cut.py);
    # between max_payload and this, paho reads it and the source refuses it.
    client.max_packet = cfg.max_payload + OVERSIZE_SLACK
    return client


def _password(cfg: MqttSection) -> str | None:
    if not cfg.password_file:
        return None
    try:
        return Path(cfg.password_file).read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        # check-config read it; it changed since. The broker will refuse us (status
        # says so) while serial and local intake go on.
        log.error(
            "cannot read mqtt.password_file %s (%s): connecting without a password; fix "
            "the file (UTF-8, one line), then restart mailgw",
            cfg.password_file,
            type(exc).__name__,
        )
        return None


def connect_properties(cfg: MqttSection) -> Properties | None:
    """MQTT 5's CONNECT properties (None for 3.1.1, where clean_session=False does it)."""
    if cfg.protocol != "5":
        return None
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = SESSION_NEVER_EXPIRES  # a persistent session
    props.ReceiveMaximum = cfg.max_inflight  # bounds what we hold unacknowledged
    # MQTT 5 §3.1.2.11.4: the broker must not send us a larger packet at all.
    props.MaximumPacketSize = cfg.max_payload + OVERSIZE_SLACK
    return props
