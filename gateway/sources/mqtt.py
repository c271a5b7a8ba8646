"""MQTT ingest with end-to-end at-least-once: PUBACK only after the outbox commit.

paho-mqtt runs its network loop in its own thread. Each QoS 1 message is
normalised there and handed to the outbox writer; the writer thread calls back
after the group commit, and only then is the PUBACK sent (invariant 1). A crash
before that leaves the message unacknowledged in our persistent session, so the
broker redelivers it: at worst a duplicate with the same content, never a loss.

Memory stays flat because we take no more than mqtt.max_inflight messages (and
MAX_HELD_BYTES) ahead of their commit: past that the socket is not read and TCP
pushes back on the broker. Brokers should not send past their own window anyway
(Mosquitto's max_inflight_messages, or the MQTT 5 Receive Maximum we announce),
but Debian 12's Mosquitto 2.0.11 sends a resumed session's whole backlog at once.
While the outbox is full the messages we hold are retried every second and stay
unacknowledged, so ingestion pauses by itself. The throughput side (read-ahead,
acks in bursts after each group commit) is in mqtt_client.py.

A PUBACK can be lost after the commit: the process dies before writing it, or it dies in
a socket buffer (kill -9 with unread input resets the connection; a power cut). The
broker then sends the message again with the same packet id and the DUP flag, and it
would be stored, and mailed, twice under two Message-IDs. So the commit also records
(packet id, digest of the content) in `mqtt_pending`, and a DUP message matching its
row is acknowledged without being stored again (Outbox.add). The row must go as soon as
the broker has the PUBACK: from then on the broker may reuse the packet id, possibly
for a message with the same content (sensors repeat themselves), and a crash before
that one's commit would bring it back with DUP, matching the row: a loss. MQTT gives
no receipt for a PUBACK, but the broker handles a connection's packets in order: once
it answers a QoS 1 publish of ours sent after some PUBACKs, it has processed them. So
about once a second, while acks are unconfirmed, we publish an empty message to
`mailgw/<device_id>/confirm`; its PUBACK, on the same connection, deletes their rows.
A lost connection drops the pending confirmation. The next connection's first
confirmation also deletes every row that did not come again on it: by then the broker
has redelivered what it held (it does so right after CONNACK, before reading on), so
those rows name PUBACKs it had. A new session (the broker holds nothing) clears them.

What remains, and cannot be closed with QoS 1: the broker could reuse a packet id in
the second or so before the confirmation returns, for an identical message, and the
gateway die before committing that one. Mosquitto numbers its packets to a client in
sequence (an id comes back after 65,535 others), far beyond what arrives in a second.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.alert import Draft, Severity, normalize
from gateway.config import Config
from gateway.errors import OutboxFull, ThreadDied
from gateway.ingest import Ingest
from gateway.outbox import MqttKey, Outbox
from gateway.sources.mqtt_client import Client
from gateway.sources.mqtt_cut import Cut
from gateway.status import Runtime
from gateway.writer import Stored

log = logging.getLogger(__name__)

RETRY_FULL = 1.0
# What we read ahead of the commits: mqtt.max_inflight messages, and at most this many
# payload bytes (alerts are small, but max_payload allows 64 KiB each).
MAX_HELD_BYTES = 4 * 1024 * 1024
SESSION_NEVER_EXPIRES = 0xFFFFFFFF
RECONNECT_MAX = 30
# A packet's topic (up to 64 KiB), packet id and MQTT 5 properties come on top of its
# payload: only packets past max_payload plus this are surely oversized.
OVERSIZE_SLACK = 128 * 1024
# A session can stay connected (pings answered) and yet deliver nothing: a broker bug,
# or a window of messages the broker thinks are in flight to us. When the session has
# been quiet for PROBE_EVERY we publish an empty QoS 1 message to a topic of our own;
# if neither it nor anything else arrives for STALL_AFTER while we hold nothing,
# we reconnect, which makes the broker send again what it has in flight.
PROBE_EVERY = 30.0
STALL_AFTER = 90.0

PendingKey = tuple[int, bytes, int]  # a row of mqtt_pending: packet id, digest, connection


@dataclass(frozen=True, slots=True)
class _Confirm:
    """A confirmation publish in flight: its PUBACK proves the broker has the PUBACKs
    of `keys`, and (`sweep`) that it has redelivered what it held at connect."""

    mid: int
    conn: int
    keys: list[PendingKey]
    sweep: bool


def _not_paho_noise(record: logging.LogRecord) -> bool:
    # paho logs this at ERROR on every reconnect attempt while the broker is away; the
    # source says so once, with the broker's address, in _on_connect_fail.
    return not str(record.msg).startswith("Client is not connected")


_paho_log = logging.getLogger("gateway.sources.paho")
_paho_log.addFilter(_not_paho_noise)


class MqttSource:
    name = "mqtt"

    def __init__(self, config: Config, ingest: Ingest, runtime: Runtime) -> None:
        assert config.mqtt is not None
        self.cfg = config.mqtt
        self.device_id = config.gateway.device_id
        self.ingest = ingest
        self.runtime = runtime
        self.status_topic = f"mailgw/{self.device_id}/status"
        self.probe_topic = f"mailgw/{self.device_id}/probe"
        self.confirm_topic = f"mailgw/{self.device_id}/confirm"
        self.own_prefix = f"mailgw/{self.device_id}/"
        self.probe_every = PROBE_EVERY
        self.stall_after = STALL_AFTER
        self._probe_sent: float | None = None
        self.probes_back = 0
        self._last_rx = time.monotonic()
        self.client_id = self.cfg.client_id or f"mailgw-{self.device_id}"
        self._lock = threading.Lock()
        # mid → (qos, routed, payload bytes); bounded by may_read below. A commit acks
        # only the very tuple it was made for (identity), not whatever holds that mid.
        self._held: dict[int, tuple[int, Any, int]] = {}
        self._held_bytes = 0
        # Held messages the outbox refused (full, disk full): stored again every second
        # until they fit. Each holds one of the broker's in-flight slots meanwhile.
        self._waiting: set[int] = set()
        # (mid, qos, its mqtt_pending row or None) committed, not yet acked
        self._acks: list[tuple[int, int, PendingKey | None]] = []
        # The connection's token (rows of mqtt_pending name it), the rows of messages
        # acked on it and not yet confirmed, the confirmation in flight, and whether this
        # connection's first confirmation (which clears older connections' rows) is due.
        self._conn = 0
        self._unconfirmed: list[PendingKey] = []
        self._confirm: _Confirm | None = None
        self._sweep_due = False
        self._puback_seen: collections.deque[tuple[int, int]] = collections.deque(maxlen=64)
        ingest.after_commit(self._flush_acks)
        self._store_error_logged = False
        self._stopping = False
        self._connected = threading.Event()
        self._unreachable_logged = False
        self.client = self._make_client()
        # Mosquitto 2.0.11 (Debian 12) does not keep to max_inflight_messages for a
        # resumed session: it sends a whole backlog at once. Reading no further than
        # our own window keeps memory flat whatever the broker does (TCP pushes back).
        # Between connections always read: the next CONNACK must get through.
        self.client.may_read = lambda: (
            not self._connected.is_set()
            or (len(self._held) < self.cfg.max_inflight and self._held_bytes < MAX_HELD_BYTES)
        )
        # Past this a PUBLISH is dropped as it arrives, never buffered (mqtt_cut.py);
        # between max_payload and this, paho reads it and _on_message refuses it.
        self.client.max_packet = self.cfg.max_payload + OVERSIZE_SLACK
        self.client.on_oversize = self._on_oversize
        self.runtime.sources[self.name] = "connecting"
        self.on_connected: Callable[[], None] | None = None  # paho's thread, each CONNACK

    # --- paho setup -------------------------------------------------------------

    def _make_client(self) -> Client:
        v5 = self.cfg.protocol == "5"
        client = Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=None if v5 else False,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            manual_ack=True,
        )
        client.enable_logger(_paho_log)
        # A bug in a callback must not end paho's network thread: the daemon would stay
        # up, "connected", and take no MQTT alert again. paho logs the exception instead.
        client.suppress_exceptions = True
        client.reconnect_delay_set(min_delay=1, max_delay=RECONNECT_MAX)
        client.max_queued_messages_set(1000)
        client.will_set(self.status_topic, "offline", qos=1, retain=True)
        if self.cfg.username:
            password = None
            if self.cfg.password_file:
                try:
                    text = Path(self.cfg.password_file).read_text(encoding="utf-8")
                    password = text.rstrip("\r\n")
                except (OSError, UnicodeDecodeError) as exc:
                    # check-config read it; it changed since. The broker will refuse us
                    # (status says so) while serial and local intake go on.
                    log.error(
                        "cannot read mqtt.password_file %s (%s): connecting without a "
                        "password; fix the file (UTF-8, one line), then restart mailgw",
                        self.cfg.password_file,
                        type(exc).__name__,
                    )
            client.username_pw_set(self.cfg.username, password)
        if self.cfg.tls:
            ctx = ssl.create_default_context(
                cafile=str(self.cfg.ca_file) if self.cfg.ca_file else None
            )
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if self.cfg.cert_file:
                ctx.load_cert_chain(
                    str(self.cfg.cert_file), str(self.cfg.key_file) if self.cfg.key_file else None
                )
            client.tls_set_context(ctx)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return client

    def _connect_properties(self) -> Properties | None:
        if self.cfg.protocol != "5":
            return None
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = SESSION_NEVER_EXPIRES  # a persistent session
        props.ReceiveMaximum = self.cfg.max_inflight  # bounds what we hold unacknowledged
        # MQTT 5 §3.1.2.11.4: the broker must not send us a larger packet at all.
        props.MaximumPacketSize = self.cfg.max_payload + OVERSIZE_SLACK
        return props

    # --- paho callbacks (paho's thread) -----------------------------------------

    def _on_connect(
        self, client: mqtt.Client, userdata: object, flags: Any, reason: Any, properties: Any
    ) -> None:
        if reason.is_failure:
            log.warning(
                "the MQTT broker %s:%d refused the connection: %s",
                self.cfg.host,
                self.cfg.port,
                reason,
            )
            self.runtime.sources[self.name] = f"refused ({reason})"
            return
        self._unreachable_logged = False
        resumed = bool(getattr(flags, "session_present", False))
        with self._lock:
            # What we held from the last connection will be redelivered by the broker.
            self._held.clear()
            self._held_bytes = 0
            self._waiting.clear()
            # PUBACKs written on the last connection are unconfirmed for good; their rows
            # stay until this connection's first confirmation (or until they come again).
            self._conn = secrets.randbits(62)
            self._unconfirmed.clear()
            self._confirm = None
            self._sweep_due = resumed
            conn = self._conn
        if not resumed:
            # A new session (first start, expired, another client id): the broker holds
            # nothing in flight for us, so no row can match a redelivery. Queued to the
            # writer ahead of anything this connection delivers.
            self._settle([], keep_conn=conn)
        self.client.room.set()
        self._probe_sent = None
        self._last_rx = time.monotonic()
        client.subscribe([(t, 1) for t in self.cfg.topics] + [(self.probe_topic, 1)])
        client.publish(self.status_topic, "online", qos=1, retain=True)
        self.runtime.sources[self.name] = "connected"
        self._connected.set()
        if self.on_connected is not None:
            self.on_connected()
        log.info(
            "connected to the MQTT broker %s:%d as %s (session %s); subscribed to %s",
            self.cfg.host,
            self.cfg.port,
            self.client_id,
            "resumed" if getattr(flags, "session_present", False) else "new",
            ", ".join(self.cfg.topics),
        )

    def _on_connect_fail(self, client: mqtt.Client, userdata: object) -> None:
        self.runtime.sources[self.name] = "unreachable"
        if not self._unreachable_logged:
            self._unreachable_logged = True
            log.error(
                "cannot connect to the MQTT broker %s:%d (is it running? systemctl status "
                "mosquitto); retrying every %d s at most, serial alerts are still taken",
                self.cfg.host,
                self.cfg.port,
                RECONNECT_MAX,
            )

    def _on_disconnect(
        self, client: mqtt.Client, userdata: object, flags: Any, reason: Any, properties: Any
    ) -> None:
        self._connected.clear()
        if self._stopping:
            return
        self.runtime.sources[self.name] = "disconnected"
        log.warning(
            "lost the MQTT broker %s:%d (%s); reconnecting", self.cfg.host, self.cfg.port, reason
        )

    def _on_oversize(self, cut: Cut) -> None:  # paho's thread; already acknowledged
        self._last_rx = time.monotonic()
        self.runtime.reject("mqtt_oversize")
        log.warning(
            "rejected a %d-byte message on %s unread (mqtt.max_payload is %d); acked so "
            "the broker does not redeliver it forever",
            cut.payload,
            ascii(cut.topic.decode("utf-8", "replace")),
            self.cfg.max_payload,
        )

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        self._last_rx = time.monotonic()
        if self._stopping:
            return  # not acked: the broker redelivers it to the next run
        if msg.retain and not self.cfg.accept_retained:
            # Retained messages at subscribe time are old news, not new alerts.
            self.runtime.reject("mqtt_retained_ignored")
            client.ack(msg.mid, msg.qos)
            return
        if len(msg.payload) > self.cfg.max_payload:
            self.runtime.reject("mqtt_oversize")
            log.warning(
                "rejected a %d-byte message on %s (mqtt.max_payload is %d); acked so "
                "the broker does not redeliver it forever",
                len(msg.payload),
                msg.topic,
                self.cfg.max_payload,
            )
            client.ack(msg.mid, msg.qos)
            return
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            self.runtime.reject("mqtt_bad_topic")
            client.ack(msg.mid, msg.qos)
            return
        if topic.startswith(self.own_prefix):
            # Our own status and probe messages (a subscription to '#' gets them too):
            # news about the gateway, not alerts.
            if topic == self.probe_topic:
                self._probe_sent = None  # the session delivers
                self.probes_back += 1
            client.ack(msg.mid, msg.qos)
            return
        try:
            alert = normalize(
                bytes(msg.payload),
                Draft(
                    topic=topic,
                    source="mqtt",
                    sensor=topic.rsplit("/", 1)[-1] or "unknown",
                    severity=Severity.WARNING,
                ),
            )
            key = None
            if msg.qos == 1:
                key = MqttKey(
                    msg.mid, self._digest(msg.qos, topic, msg.payload), bool(msg.dup), self._conn
                )
            routed = self.ingest.prepare(alert, mqtt=key)
        except Exception:
            # normalize() should never raise; if it does, this message is a counted
            # rejection, acknowledged: unacknowledged, it would hold a slot of the
            # broker's window for ever and come back at every reconnect.
            self.runtime.reject("mqtt_unreadable")
            log.exception("rejected a message on %s that could not be read", ascii(topic))
            client.ack(msg.mid, msg.qos)
            return
        with self._lock:
            old = self._held.get(msg.mid)
            if old is not None:  # a redelivery of a message we still hold
                self._held_bytes -= old[2]
            self._held[msg.mid] = (msg.qos, routed, len(msg.payload))
            self._held_bytes += len(msg.payload)
        self._store(msg.mid)

    def _digest(self, qos: int, topic: str, payload: bytes | bytearray) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        for part in (self.client_id.encode(), bytes([qos]), topic.encode(), payload):
            h.update(len(part).to_bytes(4, "big"))  # lengths first: no two splits collide
            h.update(part)
        return h.digest()

    def _on_publish(
        self, client: mqtt.Client, userdata: object, mid: int, reason: Any, properties: Any
    ) -> None:  # paho's thread, for every publish of ours the broker acknowledged
        with self._lock:
            self._puback_seen.append((mid, self._conn))
        self._settle_confirm()

    # --- storing and acknowledging ----------------------------------------------------

    def _store(self, mid: int) -> None:
        with self._lock:
            held = self._held.get(mid)
        if held is None:
            return
        qos, routed, size = held
        key: PendingKey | None = None
        if routed.mqtt is not None:
            key = (mid, routed.mqtt.digest, routed.mqtt.conn)

        # The broker redelivers what we held with the same packet ids after a reconnect,
        # so a mid alone does not name a message: only this very entry may be acked or
        # retried by this commit. (Matching on the mid let an old connection's commit
        # take the redelivered entry unacked, stranding a slot of the broker's window.)
        def done(result: Stored | BaseException) -> None:  # the writer's thread
            # Stored with this message rejected (it can never be stored): acknowledged
            # all the same, as a counted rejection; redelivering it could only fail again.
            if isinstance(result, BaseException):
                # Not acked; stays held and is stored again by the loop. (Dropping it
                # would leave the broker's in-flight slot taken until a reconnect.)
                if isinstance(result, OutboxFull):
                    self.runtime.outbox_full = True
                elif not self._store_error_logged:
                    self._store_error_logged = True
                    log.error(
                        "could not store an MQTT alert (it stays unacknowledged; retrying "
                        "every %.0f s): %s",
                        RETRY_FULL,
                        result,
                    )
                with self._lock:
                    if self._held.get(mid) is held:
                        self._waiting.add(mid)
                return
            self._store_error_logged = False
            with self._lock:
                if self._held.get(mid) is held:
                    del self._held[mid]
                    self._held_bytes -= size
                    self._acks.append((mid, qos, key))  # sent once the group's callbacks ran
            self.client.room.set()

        self.ingest.submit_routed([routed], done)

    def _flush_acks(self) -> None:  # the writer's thread, after each group commit
        with self._lock:
            if not self._acks:
                return
            acks, self._acks = self._acks, []
            conn = self._conn
        if self._connected.is_set():
            # Disconnected, the broker redelivers these anyway; PUBACKs queued now
            # could reach the next connection ahead of its CONNECT.
            self.client.ack_many([(mid, qos) for mid, qos, _ in acks])
            # Queued now on paho's one ordered packet queue: a confirmation published
            # from here on goes out behind them. If a reconnect came in between they may
            # never have been written: then they are not ours to confirm.
            with self._lock:
                if self._conn == conn:
                    self._unconfirmed.extend(k for _, _, k in acks if k is not None)

    def _retry_held(self) -> None:
        with self._lock:
            mids = [m for m in self._held if m in self._waiting]  # in arrival order
            self._waiting.clear()
        for mid in mids:
            self._store(mid)

    # --- life cycle (the event loop) ------------------------------------------------

    async def run(self) -> None:
        self.client.connect_async(
            self.cfg.host,
            self.cfg.port,
            keepalive=self.cfg.keepalive,
            clean_start=False,
            properties=self._connect_properties(),
        )
        self.client.loop_start()
        last_status = 0.0
        try:
            while True:
                await asyncio.sleep(RETRY_FULL)
                self._check_thread()
                if self._waiting:
                    self._retry_held()
                now = time.monotonic()
                if self._connected.is_set():
                    self._check_delivery(now)
                    self._send_confirm()
                if self._connected.is_set() and now - last_status >= self.cfg.status_interval:
                    last_status = now
                    self.client.publish(
                        f"{self.status_topic}/report",
                        json.dumps(self.runtime.snapshot()),
                        qos=0,
                        retain=True,
                    )
        finally:
            # Stop taking input; what was submitted still commits and is acked by
            # the writer's callbacks before close() disconnects.
            self._stopping = True

    def _check_thread(self) -> None:
        """paho's network thread is ours to watch: if it ends, MQTT intake has stopped,
        and the daemon must say so and stop (systemd restarts it), not stay "connected"."""
        thread = self.client.network_thread
        if thread is not None and thread.is_alive():
            self.runtime.threads[self.name] = "alive"
            return
        self.runtime.threads[self.name] = "dead"
        self.runtime.sources[self.name] = "stopped (network thread died)"
        raise ThreadDied("the MQTT network thread has ended: MQTT alerts are no longer taken")

    # --- confirming acks (see the module's docstring) ---------------------------------

    def _send_confirm(self) -> None:  # the event loop, about once a second
        with self._lock:
            if self._confirm is not None or not (self._unconfirmed or self._sweep_due):
                return
            keys, self._unconfirmed = self._unconfirmed, []
            conn, sweep = self._conn, self._sweep_due
        # Not under self._lock: paho calls on_publish holding its own lock, which
        # publish() takes too.
        info = self.client.publish(self.confirm_topic, b"", qos=1)
        with self._lock:
            if info.rc != mqtt.MQTT_ERR_SUCCESS or conn != self._conn:
                # Not sent on that connection: a reconnect dropped these keys (their rows
                # are cleared by the next sweep); otherwise try again next time.
                if conn == self._conn:
                    self._unconfirmed[:0] = keys
                return
            self._confirm = _Confirm(info.mid, conn, keys, sweep)
        self._settle_confirm()  # its PUBACK may have come before we noted it

    def _settle_confirm(self) -> None:
        with self._lock:
            c = self._confirm
            if c is None or c.conn != self._conn or (c.mid, c.conn) not in self._puback_seen:
                return
            self._confirm = None
            if c.sweep:
                self._sweep_due = False
        self._settle(c.keys, keep_conn=c.conn if c.sweep else None)

    def _settle(self, keys: list[PendingKey], keep_conn: int | None) -> None:
        """Delete mqtt_pending rows through the writer; nobody waits for it."""

        def settle(outbox: Outbox) -> int:
            return outbox.mqtt_settled(keys, keep_conn)

        def logged(fut: concurrent.futures.Future[int]) -> None:
            exc = fut.exception()
            if exc is not None:
                # The rows stay: a later sweep removes them.
                log.warning("could not forget acknowledged MQTT messages: %s", exc)

        self.ingest.writer.call(settle).add_done_callback(logged)

    def _check_delivery(self, now: float) -> None:
        if self._probe_sent is None:
            if now - self._last_rx >= self.probe_every:
                self._probe_sent = now
                self.client.publish(self.probe_topic, b"", qos=1)
            return
        quiet = now - max(self._probe_sent, self._last_rx)
        if quiet < self.stall_after or self._held:
            return  # still in time, or we hold messages (a full outbox): not the broker
        log.error(
            "the MQTT broker %s:%d has delivered nothing to this session for %.0f s, not "
            "even the gateway's own probe on %s; reconnecting, so that it sends again "
            "what it holds for us",
            self.cfg.host,
            self.cfg.port,
            quiet,
            self.probe_topic,
        )
        self._probe_sent = None
        sock = self.client.socket()
        if sock is not None:
            # paho sees the end of the stream and reconnects as after any loss.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # type: ignore[attr-defined]

    def close(self) -> None:
        try:
            if self._connected.is_set():
                info = self.client.publish(self.status_topic, "offline", qos=1, retain=True)
                info.wait_for_publish(2)
            self.client.disconnect()
        except (RuntimeError, ValueError, OSError) as exc:
            log.debug("closing the MQTT session: %s", exc)
        finally:
            self.client.loop_stop()
