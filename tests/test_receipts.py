"""Receipts without I/O: the request rules (gateway/receipts.py), the outbox's storage
(gateway/outbox/receipts.py: stored with the alert, due with the outcome, a digest's
receipt naming what it carried), and the config keys' refusals."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import compose, receipts
from gateway.alert import Draft, normalize
from gateway.config import ConfigError, Policy, RouteSection, parse
from gateway.config.sections import filter_overlaps
from gateway.ingest import storm_keys
from gateway.outbox import Outbox, Outcome, Routed, State
from gateway.outbox import receipts as stored
from gateway.receipts import MAX_CORRELATION, MAX_TOPIC, Ask, Refused, ask_mqtt
from gateway.routing import topic_matches

ASK = {
    "alert_topic": "alerts/x/door",
    "device_id": "gw",
    "template": "receipts/{sensor}",
    "prefix": "receipts/",
}
BY_TOPIC = {**ASK, "template": "receipts/{topic}"}


# --- asking --------------------------------------------------------------------------


def test_mqtt5_properties_ask_on_their_response_topic() -> None:
    got = ask_mqtt({}, b"\x00\xffid", "receipts/door/app-1", **ASK)
    assert got == Ask("mqtt", "receipts/door/app-1", b"\x00\xffid", v5=True)
    assert ask_mqtt({}, b"id", "receipts/door", **ASK) == Ask("mqtt", "receipts/door", b"id", True)


def test_a_json_correlation_id_asks_on_the_configured_topic_or_its_reply_to() -> None:
    assert ask_mqtt({"correlation_id": "c-1"}, None, None, **ASK) == Ask(
        "mqtt", "receipts/door", b"c-1"
    )
    got = ask_mqtt({"correlation_id": 42, "reply_to": "receipts/door/y"}, None, None, **ASK)
    assert got == Ask("mqtt", "receipts/door/y", b"42")
    assert ask_mqtt({"message": "no id"}, None, None, **ASK) is None


@pytest.mark.parametrize(
    ("fields", "corr", "topic", "reason"),
    [
        ({}, b"x" * (MAX_CORRELATION + 1), "receipts/door", "receipt_id_too_long"),
        # Another sensor's receipt topic, or one that only starts like this sensor's.
        ({}, b"id", "receipts/temp1", "receipt_topic"),
        ({}, b"id", "receipts/doorbell", "receipt_topic"),
        ({}, b"id", "receipts/", "receipt_topic"),
        ({"correlation_id": "c", "reply_to": "receipts/temp1/x"}, None, None, "receipt_topic"),
        ({"correlation_id": "x" * 129}, None, None, "receipt_id_too_long"),
        ({}, b"id", "alerts/other-sensor", "receipt_bad_topic"),  # not under the prefix
        ({}, b"id", "receipts/+", "receipt_bad_topic"),
        ({}, b"id", "receipts/" + "a" * MAX_TOPIC, "receipt_bad_topic"),
        ({"correlation_id": "c", "reply_to": "cmd/unlock"}, None, None, "receipt_bad_topic"),
        ({"correlation_id": "c", "reply_to": 5}, None, None, "receipt_bad_topic"),
        ({"correlation_id": ""}, None, None, "receipt_bad_id"),
        ({"correlation_id": True}, None, None, "receipt_bad_id"),
        ({"correlation_id": 1.5}, None, None, "receipt_bad_id"),
    ],
)
def test_requests_past_a_bound_are_refused_with_a_reason(
    fields: dict[str, object], corr: bytes | None, topic: str | None, reason: str
) -> None:
    got = ask_mqtt(fields, corr, topic, **ASK)
    assert isinstance(got, Refused) and got.reason == reason and got.why


@given(
    fields=st.dictionaries(
        st.sampled_from(["correlation_id", "reply_to", "x"]),
        st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text()),
    ),
    corr=st.one_of(st.none(), st.binary(max_size=300)),
    topic=st.one_of(st.none(), st.text(max_size=300)),
)
def test_whatever_a_publisher_sends_a_receipt_stays_bounded_and_under_the_prefix(
    fields: dict[str, object], corr: bytes | None, topic: str | None
) -> None:
    got = ask_mqtt(fields, corr, topic, **ASK)
    if isinstance(got, Ask):
        assert got.reply == "receipts/door" or got.reply.startswith("receipts/door/")
        assert "+" not in got.reply and "#" not in got.reply
        assert len(got.reply.encode("utf-8", "surrogatepass")) <= MAX_TOPIC
        assert len(got.correlation) <= MAX_CORRELATION


def test_the_sensor_whose_receipt_topic_is_allowed_comes_from_the_topic() -> None:
    """Not from the payload: `{"sensor": "temp1"}` on alerts/x/door does not make the
    publisher temp1's (the alert is still called temp1 in its mail)."""
    forged = normalize(
        b'{"sensor": "temp1", "correlation_id": "t1-7"}', Draft("alerts/x/door", "mqtt")
    )
    assert forged.sensor == "temp1"
    got = ask_mqtt(forged.fields, None, None, **{**ASK, "alert_topic": forged.topic})
    assert got == Ask("mqtt", "receipts/door", b"t1-7")
    got = ask_mqtt({}, b"t1-7", "receipts/temp1", **{**ASK, "alert_topic": forged.topic})
    assert isinstance(got, Refused) and got.reason == "receipt_topic"


@pytest.mark.parametrize(
    "alert_topic",
    [
        "alerts/siteB/T\u00fcr",
        "alerts/siteB/T r",
        "alerts/siteB/T\u00a0r",
        "alerts/siteB/" + "s" * 64 + "-a",  # the same as "-b" once cut at 64
        "alerts/siteB/ door",
        "alerts/siteB/",
        "alerts/siteB/{device_id}",
    ],
)
def test_a_topic_not_ending_in_a_plain_sensor_name_has_no_sensor_receipt_topic(
    alert_topic: str,
) -> None:
    """Normalisation would make these T_r, a 64-character cut, door, unknown or
    _device_id_: each shares that name with other topics, so none owns its receipt
    topic. Refused however the request is made, and counted as receipt_topic."""
    at = {**ASK, "alert_topic": alert_topic}
    for got in (
        ask_mqtt({"correlation_id": "c"}, None, None, **at),
        ask_mqtt({}, b"c", "receipts/T_r", **at),
        ask_mqtt({}, b"c", "receipts/door", **at),
    ):
        assert isinstance(got, Refused) and got.reason == "receipt_topic", got
        assert "does not end in a plain sensor name" in got.why
    # The plain name is its own, and {topic} gives every one of them its own topic.
    plain = ask_mqtt({"correlation_id": "c"}, None, None, **{**ASK, "alert_topic": "a/T_r"})
    assert plain == Ask("mqtt", "receipts/T_r", b"c")
    got = ask_mqtt({"correlation_id": "c"}, None, None, **{**BY_TOPIC, "alert_topic": alert_topic})
    if alert_topic.isprintable():
        assert got == Ask("mqtt", "receipts/" + alert_topic, b"c")
    else:  # a non-printable character is no topic the gateway publishes to
        assert isinstance(got, Refused) and got.reason == "receipt_bad_topic"


def test_with_topic_two_sites_sensors_of_one_name_have_their_own_receipt_topics() -> None:
    site_a = {**BY_TOPIC, "alert_topic": "alerts/siteA/door"}
    site_b = {**BY_TOPIC, "alert_topic": "alerts/siteB/door"}
    assert ask_mqtt({"correlation_id": "c"}, None, None, **site_a) == Ask(
        "mqtt", "receipts/alerts/siteA/door", b"c"
    )
    assert ask_mqtt({}, b"c", "receipts/alerts/siteB/door", **site_b) == Ask(
        "mqtt", "receipts/alerts/siteB/door", b"c", v5=True
    )
    for got in (
        ask_mqtt({}, b"c", "receipts/alerts/siteA/door", **site_b),
        ask_mqtt(
            {"correlation_id": "c", "reply_to": "receipts/alerts/siteA/door"}, None, None, **site_b
        ),
        # Below one topic's receipt topic lies another topic's: not with {topic}.
        ask_mqtt({}, b"c", "receipts/alerts/siteA/door/x", **site_a),
    ):
        assert isinstance(got, Refused) and got.reason == "receipt_topic", got
    # Filled in once: a topic level that reads {device_id} stays as it is.
    odd = {**BY_TOPIC, "alert_topic": "alerts/{device_id}"}
    assert ask_mqtt({"correlation_id": "c"}, None, None, **odd) == Ask(
        "mqtt", "receipts/alerts/{device_id}", b"c"
    )


tricky = st.text(alphabet="ab_ /\u00fc\u00a0{}\t", max_size=8)


@given(
    template=st.sampled_from(
        [
            "receipts/{sensor}",
            "receipts/{topic}",
            "receipts/{device_id}/{sensor}",
            "receipts/{topic}/r",
        ]
    ),
    first=tricky,
    second=tricky,
    reply=st.sampled_from(["", "/x", "/", "/r", "/r/r"]),
    via=st.sampled_from(["first", "second"]),
)
def test_no_receipt_topic_is_two_topics_own(
    template: str, first: str, second: str, reply: str, via: str
) -> None:
    """Two alert topics that differ (in their last level, with {sensor}) are never
    both allowed one receipt topic, whatever it is built from."""
    a, b = f"alerts/{first}", f"alerts/{second}"
    distinct = a != b if "{topic}" in template else a.rsplit("/", 1)[-1] != b.rsplit("/", 1)[-1]
    base = ask_mqtt(
        {"correlation_id": "c"},
        None,
        None,
        **{**ASK, "template": template, "alert_topic": a if via == "first" else b},
    )
    if not distinct or not isinstance(base, Ask):
        return
    asked = base.reply + reply
    got_a = ask_mqtt({}, b"c", asked, **{**ASK, "template": template, "alert_topic": a})
    got_b = ask_mqtt({}, b"c", asked, **{**ASK, "template": template, "alert_topic": b})
    assert not (isinstance(got_a, Ask) and isinstance(got_b, Ask)), (a, b, asked)


@pytest.mark.parametrize(
    ("fields", "corr", "topic", "expected"),
    [
        # The Response Topic is MQTT 5's request; Correlation Data is optional.
        ({}, None, "receipts/door/req-17", Ask("mqtt", "receipts/door/req-17", b"", v5=True)),
        ({"other": 1}, None, "receipts/door", Ask("mqtt", "receipts/door", b"", v5=True)),
        # Half a request, or one made two ways at once: refused and counted.
        ({}, b"c", None, "receipt_bad_request"),
        ({"correlation_id": "c"}, None, "receipts/door", "receipt_bad_request"),
        ({"correlation_id": "c"}, b"c", "receipts/door", "receipt_bad_request"),
        ({"correlation_id": "c"}, b"c", None, "receipt_bad_request"),
        ({"reply_to": "receipts/door"}, None, "receipts/door", "receipt_bad_request"),
        ({"reply_to": "receipts/door"}, None, None, "receipt_bad_request"),
        ({"correlation_id": None}, None, None, "receipt_bad_id"),
    ],
)
def test_every_half_formed_or_mixed_request_is_answered_or_refused_never_dropped(
    fields: dict[str, object], corr: bytes | None, topic: str | None, expected: Ask | str
) -> None:
    got = ask_mqtt(fields, corr, topic, **ASK)
    if isinstance(expected, Ask):
        assert got == expected
    else:
        assert isinstance(got, Refused) and got.reason == expected and got.why


def test_refusal_log_lines_are_throttled_per_reason() -> None:
    t = receipts.Throttle(60.0)
    assert t.note("receipt_topic", 0.0) == 1
    assert [t.note("receipt_topic", 1.0 + i) for i in range(50)] == [None] * 50
    assert t.note("receipt_bad_id", 2.0) == 1  # its own reason, its own line
    assert t.note("receipt_topic", 60.5) == 51  # the count since the last line


def test_the_message_id_is_the_mails() -> None:
    a = normalize(b"x", Draft("alerts/a", "mqtt"))
    route = RouteSection(name="ops", match="#", to=("ops@example.com",))
    mail = compose.compose(a, route, device_id="gw", sender="gw@example.com")
    digest = compose.compose_digest((a, a), route, device_id="gw", sender="gw@example.com")
    assert receipts.message_id(a.id, "ops", "gw") == mail.message_id
    assert receipts.message_id(a.id, "ops", "gw", "digest") == digest.message_id


# --- storage -------------------------------------------------------------------------


def _routed(
    text: str, ask: Ask | None, routes: tuple[str, ...] = ("ops",), policy: Policy | None = None
) -> Routed:
    alert = normalize(text.encode(), Draft("alerts/x", "mqtt", "door"))
    deliveries = tuple((r, 2) for r in routes)
    keys = storm_keys(alert, deliveries, {"ops": policy}) if policy else ()
    return Routed(alert, deliveries, storm_keys=keys, receipt=ask)


def _due(ob: Outbox) -> list[receipts.Due]:
    return stored.take_due(ob, "mqtt", 100)


def test_a_receipt_waits_for_the_outcome_then_is_due_once_and_published(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db")
    ask = Ask("mqtt", "receipts/door", b"c-1")
    ob.add([_routed("door open", ask, ("ops", "fleet")), _routed("no ask", None)])
    [c1, c2, c3] = ob.claim(10)
    assert _due(ob) == []  # stored, claimed, sending: nothing said yet
    ob.finish([Outcome(c1.key, State.QUEUED, due=0.0, error="451 later")])
    [deferred] = _due(ob)  # not an outcome, but the publisher is told: not yet, and why
    assert (deferred.outcome, deferred.reason) == ("deferred", "451 later")
    ob.finish([Outcome(c1.key, State.SENT), Outcome(c3.key, State.SENT)])
    [d] = _due(ob)
    assert (d.alert_id, d.route, d.outcome, d.reason, d.correlation) == (
        c1.alert.id,
        c1.route,
        "sent",
        None,
        b"c-1",
    )
    ob.finish([Outcome(c2.key, State.DEAD, error="550 5.1.1 no such user")])
    dead = [x for x in _due(ob) if x.outcome == "dead"]
    assert [(x.route, x.reason) for x in dead] == [(c2.route, "550 5.1.1 no such user")]
    body = json.loads(receipts.payload(dead[0], "gw"))
    assert body["outcome"] == "dead" and body["reason"] == "550 5.1.1 no such user"
    assert body["message_id"] == compose.message_id(c2.alert, c2.route, "gw")
    assert stored.mark_published(ob, [d.mark for d in _due(ob)]) == 2
    assert _due(ob) == []
    states = ob.conn.execute("SELECT state FROM receipt").fetchall()
    assert states == [("published",), ("published",)]


def test_a_retried_dead_letter_that_goes_out_gets_a_sent_receipt(tmp_path: Path) -> None:
    from gateway.outbox import retry

    ob = Outbox(tmp_path / "o.db")
    ob.add([_routed("door open", Ask("mqtt", "receipts/door", b"c"))])
    [c] = ob.claim(10)
    ob.finish([Outcome(c.key, State.DEAD, error="550 5.1.1 no such user")])
    [dead] = _due(ob)
    stored.mark_published(ob, [dead.mark])
    assert retry(ob.conn, c.alert.id) == 1  # the operator fixed the address
    [again] = ob.claim(10)
    ob.finish([Outcome(again.key, State.SENT)])
    [sent] = _due(ob)
    assert (sent.outcome, sent.reason) == ("sent", None)


def test_a_deferral_is_said_once_then_the_final_outcome_follows(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db")
    ob.add([_routed("door open", Ask("mqtt", "receipts/door", b"c"))])
    ob.add([_routed("serial", Ask("serial", "/dev/ttyS1", b"s"))])
    claimed = ob.claim(10)
    refusal = "550 5.7.60 SMTP; Client does not have permissions to send as this sender"
    ob.finish([Outcome(c.key, State.QUEUED, error=refusal, count_attempt=False) for c in claimed])
    [deferred] = _due(ob)
    assert (deferred.outcome, deferred.reason) == ("deferred", refusal)
    assert json.loads(receipts.payload(deferred, "gw"))["outcome"] == "deferred"
    # RCPT has no such outcome (PROTOCOL.md v1): a serial device waits for the final one.
    assert stored.take_due(ob, "serial", 10) == []
    assert stored.mark_published(ob, [deferred.mark]) == 1
    # Once: the relay's next try refused again says nothing more.
    claimed = ob.claim(10, now=1e12)
    ob.finish([Outcome(c.key, State.QUEUED, error=refusal, count_attempt=False) for c in claimed])
    assert _due(ob) == []
    claimed = ob.claim(10, now=2e12)
    ob.finish([Outcome(c.key, State.SENT) for c in claimed])
    [sent] = _due(ob)
    assert (sent.outcome, sent.correlation) == ("sent", b"c")
    assert [d.outcome for d in stored.take_due(ob, "serial", 10)] == ["sent"]


def test_a_deferral_overtaken_in_flight_never_marks_the_final_one(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db")
    ob.add([_routed("door open", Ask("mqtt", "receipts/door", b"c"))])
    [c] = ob.claim(10)
    ob.finish([Outcome(c.key, State.QUEUED, error="451 later")])
    [deferred] = _due(ob)  # published; its PUBACK not back yet...
    [c] = ob.claim(10, now=1e12)
    ob.finish([Outcome(c.key, State.SENT)])  # ...when the 250 is recorded
    assert stored.mark_published(ob, [deferred.mark]) == 0  # the late PUBACK
    [sent] = _due(ob)
    assert sent.outcome == "sent"
    assert stored.mark_published(ob, [sent.mark]) == 1
    assert ob.conn.execute("SELECT state, outcome FROM receipt").fetchall() == [
        ("published", "sent")
    ]


def test_a_request_lands_with_its_alert_or_not_at_all(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db", max_messages=10)
    ask = Ask("mqtt", "receipts/door", b"c")
    with pytest.raises(Exception, match="bound"):
        ob.add([_routed(f"a{i}", ask) for i in range(11)])
    assert ob.conn.execute("SELECT count(*) FROM receipt").fetchone()[0] == 0


def test_a_digest_receipt_names_every_alert_it_carried(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db", policies={"ops": Policy(rate=(1, 3600.0), digest_every=1)})
    asks = [Ask("mqtt", "receipts/door", f"c{i}".encode()) for i in range(4)]
    batch = [_routed(f"door {i}", a) for i, a in enumerate(asks)]
    ob.add(batch, now=1000.0, mono=0.0)
    claimed = ob.claim(10, now=10.0)
    assert sorted(c.kind for c in claimed) == ["digest", "mail"]
    ob.finish([Outcome(c.key, State.SENT) for c in claimed])
    due = {d.correlation: d for d in _due(ob)}
    assert set(due) == {b"c0", b"c1", b"c2", b"c3"}
    digest = next(c for c in claimed if c.kind == "digest")
    carried = [digest.alert.id, *(m.id for m in digest.members)]
    for i in (1, 2, 3):
        d = due[f"c{i}".encode()]
        assert (d.kind, d.count, list(d.carried)) == ("digest", 3, carried)
        body = json.loads(receipts.payload(d, "gw"))
        assert body["carried"] == carried and body["alert_id"] == batch[i].alert.id
        assert body["message_id"] == f"<{digest.alert.id}.ops.digest@gw.mailgw>"
    assert (due[b"c0"].kind, due[b"c0"].count) == ("mail", 1)


def test_repeats_folded_into_a_lead_share_its_outcome(tmp_path: Path) -> None:
    p = Policy(dedupe_window=600.0)
    ob = Outbox(tmp_path / "o.db", policies={"ops": p})
    ask = Ask("mqtt", "receipts/door", b"lead")
    ob.add([_routed("door open", ask, policy=p)], now=1000.0, mono=0.0)
    again = _routed("door open", dataclasses.replace(ask, correlation=b"rep"), policy=p)
    ob.add([again], now=1001.0, mono=1.0)
    [lead] = ob.claim(10)
    assert len(lead.members) == 1
    ob.finish([Outcome(lead.key, State.DEAD, error="550 5.7.1 refused")])
    due = {d.correlation: d for d in _due(ob)}
    assert set(due) == {b"lead", b"rep"}
    assert {(d.outcome, d.reason, d.count, d.mail_alert) for d in due.values()} == {
        ("dead", "550 5.7.1 refused", 2, lead.alert.id)
    }


def test_requests_past_the_cap_are_not_kept_and_intake_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(stored, "MAX_KEPT", 3)
    monkeypatch.setattr(stored, "_refusals", stored._Refusals())
    ob = Outbox(tmp_path / "o.db")
    ask = Ask("mqtt", "receipts/door", b"c")
    with caplog.at_level(logging.WARNING, "gateway.outbox.receipts"):
        ob.add([_routed(f"a{i}", ask) for i in range(5)])
        ob.add([_routed(f"b{i}", ask) for i in range(5)])
    assert ob.live == 10  # every alert stored
    assert ob.conn.execute("SELECT count(*) FROM receipt").fetchone()[0] == 3
    # Said once (then at most once a minute, with the count since), not per batch.
    [line] = [r.getMessage() for r in caplog.records]
    assert "2 receipt requests were not kept: 3 receipts already wait" in line


# --- config --------------------------------------------------------------------------


def test_receipt_keys_have_safe_defaults() -> None:
    cfg = parse('[mqtt]\ntopics = ["alerts/#"]\n', source="gw.toml")
    assert cfg.mqtt is not None
    assert (cfg.mqtt.receipts, cfg.mqtt.receipt_prefix, cfg.mqtt.receipt_topic) == (
        True,
        "receipts/",
        "receipts/{sensor}",
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('topics = ["#"]\nreceipts = true', "come back as alerts through the subscription '#'"),
        ('topics = ["+/door"]\nreceipt_prefix = "r/"', "would come back as alerts"),
        ('receipt_prefix = "alerts/r/"', "would come back as alerts"),
        ('receipt_prefix = "r/+/"', "cannot hold '+'"),
        ('receipt_prefix = "receipts"', "must end in '/'"),
        ('receipt_prefix = ""', "must end in '/'"),
        ('receipt_topic = "receipts/{alert}"', "only {sensor}, {topic} and {device_id}"),
        ('receipt_topic = "receipts/{sensor"', "only {sensor}, {topic} and {device_id}"),
        ('receipt_topic = "receipts/{topic}x}"', "only {sensor}, {topic} and {device_id}"),
        ('receipt_topic = "other/{sensor}"', "must start with mqtt.receipt_prefix"),
        ('receipt_topic = "receipts/#"', "cannot hold '+', '#'"),
        ('receipt_topic = "receipts/' + "a" * 200 + '"', "stay under 192 bytes"),
    ],
)
def test_receipt_key_refusals(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(f"[mqtt]\n{text}\n", source="gw.toml")
    assert any(expected in p for p in info.value.problems), info.value.problems


def test_receipt_topic_may_name_the_alerts_whole_topic() -> None:
    cfg = parse('[mqtt]\nreceipt_topic = "receipts/{device_id}/{topic}"\n', source="gw.toml")
    assert cfg.mqtt is not None and cfg.mqtt.receipt_topic == "receipts/{device_id}/{topic}"


def test_receipts_off_lets_any_prefix_be() -> None:
    cfg = parse('[mqtt]\ntopics = ["#"]\nreceipts = false\n', source="gw.toml")
    assert cfg.mqtt is not None and not cfg.mqtt.receipts


def test_a_config_from_before_receipts_subscribed_to_everything_runs_without_them() -> None:
    cfg = parse('[mqtt]\ntopics = ["#"]\n', source="gw.toml")
    assert cfg.mqtt is not None and not cfg.mqtt.receipts


level = st.sampled_from(["a", "b", "receipts", "r", "", "x1"])
filters = st.lists(st.sampled_from(["a", "b", "receipts", "r", "+", ""]), min_size=1, max_size=4)


@given(
    filters,
    st.booleans(),
    st.lists(level, min_size=1, max_size=3),
    st.text("ab/", max_size=6),
)
def test_a_subscription_that_could_take_a_receipt_is_always_seen(
    f_levels: list[str], hash_end: bool, p_levels: list[str], suffix: str
) -> None:
    """The slow, obvious version: a topic under the prefix that the filter matches.
    filter_overlaps must never miss one (a miss is a receipt loop)."""
    topic_filter = "/".join(f_levels + (["#"] if hash_end else []))
    prefix = "/".join(p_levels)
    if topic_matches(topic_filter, prefix + suffix):
        assert filter_overlaps(topic_filter, prefix), (topic_filter, prefix, suffix)
