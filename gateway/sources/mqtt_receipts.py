"""The MQTT source's receipts: reading a publisher's request, publishing what is due.

The rules are in gateway/receipts.py; the storage in gateway/outbox/receipts.py. Here:
a message's request taken from its MQTT 5 properties or JSON fields (a refused one is
counted and logged, and its alert stored as usual), and the publisher that the
source's loop ticks. A receipt is published at QoS 1 and marked published only once
paho reports the broker's PUBACK (`is_published()`); until then it stays due, so a
crash, a restart or a lost session publishes it again: at least once.
"""

from __future__ import annotations

import logging
import time
from functools import partial

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.alert import Alert
from gateway.config import MqttSection
from gateway.outbox.receipts import count_refused, mark_published, take_due
from gateway.outbox.writer import Writer
from gateway.receipts import (
    MQTT,
    Ask,
    Due,
    Refused,
    Throttle,
    ask_mqtt,
    payload,
    topic_problem,
)
from gateway.runtime import Runtime

log = logging.getLogger(__name__)

BATCH = 100  # receipts published per tick at most: intake's PUBACKs share the socket
RESEND_AFTER = 60.0  # a receipt with no PUBACK after this is published again


class Receipts:
    def __init__(
        self,
        cfg: MqttSection,
        client: mqtt.Client,
        writer: Writer,
        runtime: Runtime,
        device_id: str,
    ) -> None:
        self.cfg = cfg
        self.client = client
        self.writer = writer
        self.runtime = runtime
        self.device_id = device_id
        # (seq, route) → (paho's handle, when published, its Due.mark): for the PUBACK
        self._inflight: dict[
            tuple[int, str], tuple[mqtt.MQTTMessageInfo, float, tuple[int, str, float]]
        ] = {}
        self.published = 0
        self._throttle = Throttle()
        if cfg.receipts and cfg.protocol != "5":
            # The broker drops MQTT 5 properties on their way to an MQTT 3.1.1 session:
            # a request made with Correlation Data never reaches the gateway, so it can
            # be neither answered nor counted here. Said once, at start (as information:
            # most 3.1.1 fleets ask for no receipts, or ask with JSON).
            log.info(
                "mqtt.protocol is %s: receipt requests made with MQTT 5 properties "
                "(Correlation Data, Response Topic) never reach the gateway and get no "
                'receipt; publishers must ask with a JSON "correlation_id", or set '
                'mqtt.protocol = "5"',
                cfg.protocol,
            )
        if not cfg.receipts:
            log.info(
                "receipts are off (mqtt.receipts = false, or mqtt.topics covers "
                "mqtt.receipt_prefix %r); publishers asking for one get none",
                cfg.receipt_prefix,
            )

    # --- asking (paho's thread) ---------------------------------------------------

    def ask(self, msg: mqtt.MQTTMessage, alert: Alert) -> Ask | None:
        if not self.cfg.receipts:
            return None
        props = getattr(msg, "properties", None)
        corr = getattr(props, "CorrelationData", None) if props is not None else None
        topic = getattr(props, "ResponseTopic", None) if props is not None else None
        got = ask_mqtt(
            alert.fields,
            bytes(corr) if isinstance(corr, bytes | bytearray) else None,
            topic if isinstance(topic, str) else None,
            alert_topic=alert.topic,
            device_id=self.device_id,
            template=self.cfg.receipt_topic,
            prefix=self.cfg.receipt_prefix,
        )
        if isinstance(got, Refused):
            self.runtime.reject(got.reason)
            n = self._throttle.note(got.reason, time.monotonic())
            if n is not None:
                log.warning(
                    "alert %s on %s asked for a receipt that is refused: %s; the alert is "
                    "stored, no receipt will be published (%d such refusal(s) since the "
                    "last line like this; counted as %s in mailgw status)",
                    alert.id,
                    ascii(alert.topic),
                    got.why,
                    n,
                    got.reason,
                )
            return None
        return got

    # --- publishing (the event loop) -------------------------------------------------

    async def tick(self, connected: bool) -> None:
        """Mark what the broker acknowledged; publish what is due and not in flight."""
        now = time.monotonic()
        acked = [k for k, (info, _, _) in self._inflight.items() if info.is_published()]
        marks = [self._inflight.pop(k)[2] for k in acked]
        for k in [k for k, (_, at, _) in self._inflight.items() if now - at > RESEND_AFTER]:
            del self._inflight[k]  # published again below: a duplicate, never a loss
        count_refused(self.runtime)
        if acked:
            self.published += len(acked)
            self.writer.call(partial(mark_published, keys=marks)).add_done_callback(_logged)
        if not connected or not self.cfg.receipts:
            return
        try:
            due = await self.writer.run(
                partial(take_due, origin=MQTT, limit=BATCH + len(self._inflight))
            )
        except Exception as exc:  # the outbox cannot be read now: intake goes on
            log.warning("could not read due receipts (tried again in a second): %s", exc)
            return
        for d in due:
            if d.key in self._inflight or d.key in acked:
                continue
            if (why := topic_problem(d.reply, self.cfg.receipt_prefix)) is not None:
                # Asked for under an earlier config: mqtt.receipt_prefix has moved since,
                # and the gateway publishes nowhere outside the current one (the old
                # subtree may now be another's, or subscribed to as alerts).
                self._drop(d, why)
                continue
            props = None
            # A Response Topic without Correlation Data is answered without it.
            if d.v5 and d.correlation and self.cfg.protocol == "5":
                props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                props.CorrelationData = d.correlation
            try:
                info = self.client.publish(
                    d.reply, payload(d, self.device_id), qos=1, properties=props
                )
            except (ValueError, TypeError) as exc:
                # Stored requests were checked (gateway/receipts.py); should one still be
                # refused, it must not come back every second.
                log.error("receipt for %s cannot be published, dropped: %s", d.alert_id, exc)
                self.writer.call(partial(mark_published, keys=[d.mark])).add_done_callback(_logged)
                continue
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                log.debug("receipt for %s not queued (%s); next tick", d.alert_id, info.rc)
                break
            self._inflight[d.key] = (info, now, d.mark)

    def _drop(self, d: Due, why: str) -> None:
        self.runtime.reject("receipt_bad_topic")
        n = self._throttle.note("receipt_dropped", time.monotonic())
        if n is not None:
            log.warning(
                "receipt for alert %s is not published: %s (asked for before the "
                "configuration changed; %d such receipt(s) dropped since the last line "
                "like this; counted as receipt_bad_topic in mailgw status)",
                d.alert_id,
                why,
                n,
            )
        self.writer.call(partial(mark_published, keys=[d.mark])).add_done_callback(_logged)


def _logged(fut: object) -> None:
    exc = fut.exception()  # type: ignore[attr-defined]
    if exc is not None:
        # They stay due: published again at the next tick (a duplicate at worst).
        log.warning("could not mark receipts published: %s", exc)
