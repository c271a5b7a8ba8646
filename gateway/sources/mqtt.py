"""The MQTT source: PUBACK only after the outbox commit, and a session that is watched.

paho-mqtt runs its network loop in its own thread (`mqtt_client.py`). Each QoS 1
message is screened and normalised there, taken into the ack window and submitted
through `Ingest`; the writer's thread reports the commit, and after the group the
window's PUBACKs go out in one write (invariant 1). A crash before that leaves the
message unacknowledged in our persistent session, so the broker redelivers it: at worst
a copy, recognised as one (invariant 11), never a loss.

What is held, when a PUBACK is due, the read-ahead bound and the confirmation round
trip are decided by the pure `mqtt_window.Window` (its docstring has the rules). This
is its adapter: paho's callbacks become window events under one lock, its actions paho
calls and writer requests. Here too: status, the online/offline topic, a probe that
notices a session which delivers nothing, and the watch on paho's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

from gateway.alert import Draft, Severity, normalize
from gateway.config import Config
from gateway.errors import OutboxFull, ThreadDied
from gateway.ingest import Ingest
from gateway.outbox import MqttKey, Routed
from gateway.outbox.writer import Stored
from gateway.runtime import Runtime
from gateway.sources.mqtt_client import RECONNECT_MAX, connect_properties, make_client
from gateway.sources.mqtt_cut import Cut
from gateway.sources.mqtt_receipts import Receipts
from gateway.sources.mqtt_window import ConfirmDue, Held, Settle, Window

log = logging.getLogger(__name__)

# The window's tick: messages the outbox refused (full) are stored again this often.
RETRY_FULL = 1.0
# A session can stay connected (pings answered) and yet deliver nothing: a broker bug,
# or a window of messages the broker thinks are in flight to us. When the session has
# been quiet for PROBE_EVERY we publish an empty QoS 1 message to a topic of our own;
# if neither it nor anything else arrives for STALL_AFTER while we hold nothing,
# we reconnect, which makes the broker send again what it has in flight.
PROBE_EVERY = 30.0
STALL_AFTER = 90.0
# At stop, paho's network thread is waited for this long, well under the daemon's
# EXIT_WITHIN: a thread blocked in a call is abandoned rather than holding the loop.
STOP_WITHIN = 3.0


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
        # Held by paho's thread, the writer's and the event loop around every window call.
        self._lock = threading.Lock()
        self._window: Window[Routed] = Window(self.cfg.max_inflight)
        self._store_error_logged = False
        self._stopping = False
        self._unreachable_logged = False
        ingest.after_commit(self._flush_acks)
        self.client = make_client(self.cfg, self.client_id, self.status_topic)
        self.client.may_read = self._window.may_read  # paho's thread, unlocked: one read
        self.client.on_oversize = self._on_oversize
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.receipts = Receipts(self.cfg, self.client, ingest.writer, runtime, self.device_id)
        self.runtime.sources[self.name] = "connecting"
        self.on_connected: Callable[[], None] | None = None  # paho's thread, each CONNACK

    @property
    def holding(self) -> int:  # messages taken from the broker, not yet acknowledged
        return self._window.holding

    # --- the connection (paho's thread) -----------------------------------------

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
            settle = self._window.on_connect(secrets.randbits(62), resumed)
        if settle is not None:
            self._forget(settle)  # queued to the writer ahead of this connection's messages
        self.client.room.set()
        self._probe_sent = None
        self._last_rx = time.monotonic()
        client.subscribe([(t, 1) for t in self.cfg.topics] + [(self.probe_topic, 1)])
        client.publish(self.status_topic, "online", qos=1, retain=True)
        self.runtime.sources[self.name] = "connected"
        if self.on_connected is not None:
            self.on_connected()
        log.info(
            "connected to the MQTT broker %s:%d as %s (session %s); subscribed to %s",
            self.cfg.host,
            self.cfg.port,
            self.client_id,
            "resumed" if resumed else "new",
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
        with self._lock:
            self._window.on_disconnect()
        if self._stopping:
            return
        self.runtime.sources[self.name] = "disconnected"
        log.warning(
            "lost the MQTT broker %s:%d (%s); reconnecting", self.cfg.host, self.cfg.port, reason
        )

    # --- messages (paho's thread) -----------------------------------------------

    def _on_oversize(self, cut: Cut) -> None:  # already acknowledged by the client
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
        topic = self._screen(msg)
        routed = None if topic is None else self._prepare(msg, topic)
        if routed is None:
            # Not an alert, or one that can never be: acked, as a counted rejection.
            # Unacknowledged, it would hold a slot of the broker's window for ever and
            # come back at every reconnect.
            client.ack(msg.mid, msg.qos)
            return
        key = None if routed.mqtt is None else (msg.mid, routed.mqtt.digest, routed.mqtt.conn)
        with self._lock:
            entry = self._window.take(msg.mid, msg.qos, len(msg.payload), key, routed)
        self._store(entry)

    def _screen(self, msg: mqtt.MQTTMessage) -> str | None:
        """The topic of a message that may be an alert; None for one to ack and drop."""
        if msg.retain and not self.cfg.accept_retained:
            # Retained messages at subscribe time are old news, not new alerts.
            self.runtime.reject("mqtt_retained_ignored")
            return None
        if len(msg.payload) > self.cfg.max_payload:
            self.runtime.reject("mqtt_oversize")
            log.warning(
                "rejected a %d-byte message on %s (mqtt.max_payload is %d); acked so "
                "the broker does not redeliver it forever",
                len(msg.payload),
                msg.topic,
                self.cfg.max_payload,
            )
            return None
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            self.runtime.reject("mqtt_bad_topic")
            return None
        if topic.startswith(self.own_prefix):
            # Our own status and probe messages (a subscription to '#' gets them too):
            # news about the gateway, not alerts.
            if topic == self.probe_topic:
                self._probe_sent = None  # the session delivers
                self.probes_back += 1
            return None
        return topic

    def _prepare(self, msg: mqtt.MQTTMessage, topic: str) -> Routed | None:
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
                digest = self._digest(msg.qos, topic, msg.payload)
                key = MqttKey(msg.mid, digest, bool(msg.dup), self._window.conn)
            return self.ingest.prepare(alert, mqtt=key, receipt=self.receipts.ask(msg, alert))
        except Exception:
            # normalize() should never raise; if it does, a counted rejection.
            self.runtime.reject("mqtt_unreadable")
            log.exception("rejected a message on %s that could not be read", ascii(topic))
            return None

    def _digest(self, qos: int, topic: str, payload: bytes | bytearray) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        for part in (self.client_id.encode(), bytes([qos]), topic.encode(), payload):
            h.update(len(part).to_bytes(4, "big"))  # lengths first: no two splits collide
            h.update(part)
        return h.digest()

    # --- storing and acknowledging ----------------------------------------------

    def _store(self, entry: Held[Routed]) -> None:
        def done(result: Stored | BaseException) -> None:  # the writer's thread
            if isinstance(result, BaseException):
                self._not_stored(result)
                with self._lock:
                    self._window.refused(entry)
                return
            # Stored, or this message rejected (it can never be stored): acknowledged
            # all the same, as a counted rejection; a redelivery could only fail again.
            self._store_error_logged = False
            with self._lock:
                self._window.stored(entry)
            self.client.room.set()

        self.ingest.submit_routed([entry.item], done)

    def _not_stored(self, exc: BaseException) -> None:
        if isinstance(exc, OutboxFull):
            self.runtime.outbox_full = True
        elif not self._store_error_logged:
            self._store_error_logged = True
            log.error(
                "could not store an MQTT alert (it stays unacknowledged; retrying every "
                "%.0f s): %s",
                RETRY_FULL,
                exc,
            )

    def _flush_acks(self) -> None:  # the writer's thread, after each group commit
        with self._lock:
            acks = self._window.flush()
        if acks is not None:
            self.client.ack_many(acks.packets)
            with self._lock:
                self._window.acks_written(acks)

    def _on_publish(
        self, client: mqtt.Client, userdata: object, mid: int, reason: Any, properties: Any
    ) -> None:  # paho's thread, for every publish of ours the broker acknowledged
        with self._lock:
            settle = self._window.puback(mid)
        if settle is not None:
            self._forget(settle)

    def _send_confirm(self, due: ConfirmDue) -> None:  # the event loop
        # Not under self._lock: paho calls on_publish holding its own lock, which
        # publish() takes too.
        info = self.client.publish(self.confirm_topic, b"", qos=1)
        mid = info.mid if info.rc == mqtt.MQTT_ERR_SUCCESS else None
        with self._lock:
            settle = self._window.confirm_published(due, mid)
        if settle is not None:
            self._forget(settle)

    def _forget(self, settle: Settle) -> None:
        """Delete mqtt_pending rows the broker no longer holds for us; nobody waits."""
        self.ingest.settle_mqtt(settle.keys, settle.keep_conn)

    # --- life cycle (the event loop) --------------------------------------------

    async def run(self) -> None:
        self.client.connect_async(
            self.cfg.host,
            self.cfg.port,
            keepalive=self.cfg.keepalive,
            clean_start=False,
            properties=connect_properties(self.cfg),
        )
        self.client.loop_start()
        last_status = 0.0
        # Receipts wait on the writer; in a task of their own, a busy or failing outbox
        # never holds up this loop (stores again, PUBACK confirms, the delivery probe).
        receipts = asyncio.create_task(self._publish_receipts(), name=f"{self.name}-receipts")
        try:
            while True:
                await asyncio.sleep(RETRY_FULL)
                self._check_thread()
                with self._lock:
                    tick = self._window.tick()
                for entry in tick.store_again:  # in arrival order
                    self._store(entry)
                now = time.monotonic()
                if self._window.connected:
                    self._check_delivery(now)
                if tick.confirm is not None:
                    self._send_confirm(tick.confirm)
                if self._window.connected and now - last_status >= self.cfg.status_interval:
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
            receipts.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await receipts

    async def _publish_receipts(self) -> None:
        while True:
            await asyncio.sleep(RETRY_FULL)
            try:
                await self.receipts.tick(self._window.connected)
            except asyncio.CancelledError:
                raise
            except Exception:  # never the end of intake: the next tick tries again
                log.exception("publishing receipts failed; trying again")

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

    def _check_delivery(self, now: float) -> None:
        if self._probe_sent is None:
            if now - self._last_rx >= self.probe_every:
                self._probe_sent = now
                self.client.publish(self.probe_topic, b"", qos=1)
            return
        quiet = now - max(self._probe_sent, self._last_rx)
        if quiet < self.stall_after or self._window.holding:
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
            if self._window.connected:
                info = self.client.publish(self.status_topic, "offline", qos=1, retain=True)
                info.wait_for_publish(2)
            self.client.disconnect()
        except (RuntimeError, ValueError, OSError) as exc:
            log.debug("closing the MQTT session: %s", exc)
        finally:
            self._stop_network_thread()

    def _stop_network_thread(self) -> None:
        """paho's loop_stop joins its thread without a bound, and that thread may be
        stuck in a call that does not see the stop (a DNS lookup of the broker that is
        never answered): joined here for STOP_WITHIN at most, then left behind (it is a
        daemon thread), so that the daemon still exits by systemd's stop deadline."""
        stopper = threading.Thread(
            target=self.client.loop_stop, name=f"{self.name}-stop", daemon=True
        )
        stopper.start()
        stopper.join(STOP_WITHIN)
        if stopper.is_alive():
            log.warning(
                "the MQTT network thread did not stop within %.0f s (it is blocked, e.g. "
                "looking up the broker %s); leaving it behind",
                STOP_WITHIN,
                self.cfg.host,
            )
