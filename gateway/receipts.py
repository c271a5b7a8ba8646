"""Receipts: telling a publisher what became of its alert (sans-IO).

A publisher asks by giving a correlation id: MQTT 5's Correlation Data and Response
Topic properties, or a JSON field `correlation_id` (with `reply_to`, or the configured
`mqtt.receipt_topic`). The request is stored with the alert, in the same transaction
(gateway/outbox/receipts.py), so an acknowledged alert never loses it. When the
delivery's outcome (accepted by the smarthost, or dead-lettered) is recorded, its
receipt becomes due in that same transaction, never before; the MQTT source publishes
due receipts at QoS 1 and marks them published after the PUBACK. At least once: a
crash between the PUBACK and the mark publishes it again.

A receipt is per (alert, route): one for each mail the alert went into. That is what
the outbox records outcomes for, so it needs no state of its own across routes, and a
publisher whose alert reaches two routes learns about each.

What a publisher controls is bounded here: the correlation id's size, and the topic,
which must be its own receipt topic: `mqtt.receipt_topic` filled in from the MQTT topic
the broker delivered the alert on, never from the payload (whose `sensor` field anyone
can write). With `{sensor}` that is the topic's last level, taken only when it is a
sensor name as it stands: a level that normalisation would change (a space, a '+', more
than 64 characters) is refused, since `Tür`, `T r` and `T\u00a0r` would all become
`T_r` and share one receipt topic. With `{topic}` it is the whole topic, so
`alerts/siteA/door` and `alerts/siteB/door` never share one. So a publisher allowed by
the broker's ACL to publish on alerts/siteA/door gets receipts only on its own receipt
topic; it cannot answer with another sensor's correlation id on another sensor's
receipt topic. A request that breaks a bound is refused and counted; the alert itself
is stored as usual, since losing an alert over its receipt would be the worse failure.

A message asks one way: MQTT 5 properties, whose request is the Response Topic (MQTT 5
section 4.10: Correlation Data is optional, and alone asks for nothing), or JSON
fields, whose request is `correlation_id` (`reply_to` is optional). A message that mixes
the two, or sends the optional half alone, is refused as a bad request: answering one
half would publish a receipt the publisher may not be waiting for, or on a topic it
did not name, and the count and the log line tell its operator what to fix.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.alert import clean_sensor

MAX_CORRELATION = 128  # bytes: an id, not a payload (it is copied into every receipt)
MAX_TOPIC = 256  # bytes: under MQTT's 65535, and short enough to store per alert
MAX_CARRIED = 100  # alert ids a digest's receipt lists; `count` says how many in all
# Receipts not yet published (waiting for their mail, or due and not published). Past
# this new requests are refused with a log line: a publisher that asks for receipts
# while nobody reads them (no broker, for weeks) must not fill the disk.
MAX_KEPT = 10_000
SLOTS_FULL = "receipt_slots_full"  # the status counter of requests refused at MAX_KEPT
MQTT = "mqtt"
SERIAL = "serial"


@dataclass(frozen=True, slots=True)
class Ask:
    """A request for a receipt, stored with its alert.

    origin: `mqtt` or `serial`. reply: the MQTT topic, or the serial port's name.
    correlation: the publisher's id, as it gave it. v5: set MQTT 5's Correlation Data
    on the receipt (asked through properties).
    """

    origin: str
    reply: str
    correlation: bytes
    v5: bool = False


@dataclass(frozen=True, slots=True)
class Refused:
    """A request that was refused: `reason` is the counter, `why` the log line's words."""

    reason: str
    why: str


@dataclass(frozen=True, slots=True)
class Due:
    """A receipt ready to go: what the outbox settled for one (alert, route)."""

    alert_seq: int
    route: str
    origin: str
    reply: str
    correlation: bytes
    v5: bool
    alert_id: str
    outcome: str  # sent | dead | deferred (not final: sent or dead follows; MQTT only)
    reason: str | None  # the server's reply for a dead letter or a deferral
    mail_alert: str  # the alert whose Message-ID the mail had (a digest's or lead's)
    kind: str  # mail | digest
    carried: tuple[str, ...]  # alert ids the mail carried (at most MAX_CARRIED)
    count: int  # how many alerts the mail carried
    at: float  # wall time the outcome was recorded

    @property
    def key(self) -> tuple[int, str]:
        return (self.alert_seq, self.route)

    @property
    def mark(self) -> tuple[int, str, float]:
        """What marks this receipt published: its key and when its outcome was recorded,
        so that an outcome recorded since (a deferral overtaken) is never marked."""
        return (self.alert_seq, self.route, self.at)


class Throttle:
    """One log line per reason at most every `every` seconds, carrying the count since:
    a publisher flooding refused requests is told about in a line a minute, not one per
    message (every refusal is still counted in status). Fed with `now`; no clock."""

    def __init__(self, every: float = 60.0) -> None:
        self.every = every
        self._logged_at: dict[str, float] = {}
        self._since: dict[str, int] = {}

    def note(self, reason: str, now: float) -> int | None:
        """Count one `reason`; how many to report now (this one included), or None."""
        self._since[reason] = self._since.get(reason, 0) + 1
        last = self._logged_at.get(reason)
        if last is not None and now - last < self.every:
            return None
        self._logged_at[reason] = now
        return self._since.pop(reason)


def topic_problem(topic: str, prefix: str) -> str | None:
    """Why the gateway will not publish a receipt on `topic`, or None."""
    if len(topic.encode("utf-8", "surrogatepass")) > MAX_TOPIC:
        return f"the receipt topic is longer than {MAX_TOPIC} bytes"
    if not topic or any(c in topic for c in "+#\x00") or not topic.isprintable():
        return f"the receipt topic {topic!a} is not a topic one can publish to"
    if not topic.startswith(prefix):
        return f"the receipt topic {topic!a} is not under mqtt.receipt_prefix {prefix!r}"
    return None


def own_topic(template: str, alert_topic: str, device_id: str) -> str | Refused:
    """The receipt topic of an alert that came on `alert_topic`: `mqtt.receipt_topic`
    filled in, or why it has none. Only the broker's topic picks it, never the payload."""
    level = alert_topic.rsplit("/", 1)[-1]
    if "{sensor}" in template and clean_sensor(level) != level:
        # clean_sensor is many-to-one (each bad character becomes '_', and it cuts at
        # 64 characters): a level it changes would share its receipt topic with others.
        return Refused(
            "receipt_topic",
            f"the alert's topic {alert_topic!a} does not end in a plain sensor name (ASCII "
            "letters, digits and ._:@- only, at most 64 of them), so it has no receipt "
            "topic of its own under mqtt.receipt_topic's {sensor}; name the sensor "
            "plainly, or use {topic} in mqtt.receipt_topic",
        )
    return fill_topic(template, level, alert_topic, device_id)


def own_topic_problem(topic: str, own: str, *, below: bool) -> str | None:
    """Why `topic` is not the alert's own receipt topic `own` (or, if `below`, a topic
    below it), or None."""
    if topic == own or (below and topic.startswith(own.rstrip("/") + "/")):
        return None
    return (
        f"the receipt topic {topic!a} is not this sensor's ({own!a}"
        + (", or a topic below it" if below else "")
        + "): a publisher gets receipts only on the receipt topic of the topic it "
        "publishes on"
    )


def below_allowed(template: str) -> bool:
    """May a publisher ask for a topic below its own receipt topic? Not with `{topic}`:
    below receipts/{topic} of alerts/door lies receipts/alerts/door/x, the receipt topic
    of alerts/door/x, which may be another publisher's. A `{sensor}` is one level, so
    nothing below one sensor's receipt topic is another's."""
    return "{topic}" not in template


_NAMES = re.compile(r"{(sensor|device_id|topic)}")


def fill_topic(template: str, sensor: str, topic: str, device_id: str) -> str:
    """`mqtt.receipt_topic` for an alert: {sensor}, {topic} and {device_id} only
    (check-config refuses any other name). One pass: a topic level that reads
    `{device_id}` is put in as it is, never filled in again."""
    values = {"sensor": sensor, "topic": topic, "device_id": device_id}
    return _NAMES.sub(lambda m: values[m.group(1)], template)


BAD_REQUEST = "receipt_bad_request"


def ask_mqtt(
    fields: Mapping[str, object],
    correlation: bytes | None,
    response_topic: str | None,
    *,
    alert_topic: str,
    device_id: str,
    template: str,
    prefix: str,
) -> Ask | Refused | None:
    """The receipt an MQTT message asks for (None: none), from its MQTT 5 properties or
    its JSON fields `correlation_id` / `reply_to`, one way or the other (module doc).
    `alert_topic`: the topic the broker delivered it on, which picks the only receipt
    topics allowed."""
    by_json = "correlation_id" in fields or "reply_to" in fields
    if by_json and (correlation is not None or response_topic is not None):
        return Refused(
            BAD_REQUEST,
            "it asks both with MQTT 5 properties and with JSON fields (correlation_id, "
            "reply_to); a request is made one way",
        )
    if correlation is not None and response_topic is None:
        return Refused(
            BAD_REQUEST,
            "it has MQTT 5 Correlation Data without a Response Topic, and only a Response "
            "Topic asks for an answer",
        )
    topic: str | None
    if response_topic is not None:
        # Correlation Data is optional in MQTT 5: a publisher that gives none tells its
        # answers apart by topic, and gets them without the property (and an empty
        # correlation_id in the JSON), as the protocol's responders do.
        corr, topic, v5 = bytes(correlation or b""), response_topic, True
    elif by_json:
        if "correlation_id" not in fields:
            return Refused(
                BAD_REQUEST, "it has reply_to without correlation_id, which is what asks"
            )
        given = fields["correlation_id"]
        if not isinstance(given, str | int) or isinstance(given, bool) or given == "":
            return Refused("receipt_bad_id", "correlation_id must be a non-empty string")
        corr, v5 = str(given).encode("utf-8", "surrogatepass"), False
        reply = fields.get("reply_to")
        if reply is not None and not isinstance(reply, str):
            return Refused("receipt_bad_topic", "reply_to must be a string")
        topic = reply if isinstance(reply, str) else None
    else:
        return None
    own = own_topic(template, alert_topic, device_id)
    if isinstance(own, Refused):
        return own
    if topic is None:
        topic = own
    if len(corr) > MAX_CORRELATION:
        return Refused(
            "receipt_id_too_long",
            f"the correlation id is {len(corr)} bytes, more than {MAX_CORRELATION}",
        )
    if (why := topic_problem(topic, prefix)) is not None:
        return Refused("receipt_bad_topic", why)
    if (why := own_topic_problem(topic, own, below=below_allowed(template))) is not None:
        return Refused("receipt_topic", why)
    return Ask(MQTT, topic, corr, v5)


def message_id(alert_id: str, route: str, device_id: str, kind: str = "mail") -> str:
    """The Message-ID of the mail, as gateway/compose.py makes it (message_id for a
    mail, compose_digest's for a digest), from the id of the alert that owns it."""
    if kind == "digest":
        return f"<{alert_id}.{route}.digest@{device_id}.mailgw>"
    return f"<{alert_id}.{route}@{device_id}.mailgw>"


def payload(due: Due, device_id: str) -> bytes:
    """The receipt's MQTT payload: one JSON object a script can read."""
    doc: dict[str, object] = {
        "correlation_id": due.correlation.decode("utf-8", "replace"),
        "alert_id": due.alert_id,
        "outcome": due.outcome,
        "route": due.route,
        "message_id": message_id(due.mail_alert, due.route, device_id, due.kind),
        "kind": due.kind,
        "count": due.count,
        "at": round(due.at, 3),
        "device_id": device_id,
    }
    if due.kind == "digest" or due.count > 1:
        doc["carried"] = list(due.carried)
    if due.reason is not None:
        doc["reason"] = due.reason
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
