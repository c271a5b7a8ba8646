from __future__ import annotations

import json
import re
import uuid

from hypothesis import given
from hypothesis import strategies as st

from gateway.alert import (
    MAX_FIELDS,
    MAX_MESSAGE_BYTES,
    Draft,
    Severity,
    clean_sensor,
    new_alert_id,
    normalize,
    parse_severity,
)
from gateway.clock import Stamp

DRAFT = Draft(topic="alerts/cold-room/temp", source="mqtt", sensor="temp")
STAMP = Stamp(wall=1_700_000_000.0, boottime=100.0, boot_id="b", synced=True)


def test_plain_text_is_the_message() -> None:
    a = normalize(b"door open", DRAFT, STAMP)
    assert a.message == "door open"
    assert a.sensor == "temp" and a.severity is Severity.WARNING
    assert a.topic == "alerts/cold-room/temp" and a.notes == ()


def test_json_object_supplies_alert_keys() -> None:
    payload = json.dumps(
        {
            "message": "too warm",
            "sensor": "t1",
            "severity": "critical",
            "event_time": "2026-01-01T00:00:00Z",
            "celsius": 9.5,
            "ok": False,
        }
    )
    a = normalize(payload.encode(), DRAFT, STAMP)
    assert (a.message, a.sensor, a.severity) == ("too warm", "t1", Severity.CRITICAL)
    assert a.event_time == "2026-01-01T00:00:00Z"
    assert a.fields == {"celsius": 9.5, "ok": False}


def test_payload_cannot_set_gateway_owned_keys() -> None:
    a = normalize(
        b'{"message": "x", "id": "forged", "topic": "other", "device_id": "z"}', DRAFT, STAMP
    )
    assert a.id != "forged" and a.topic == DRAFT.topic
    assert "reserved_field" in a.notes and "id" not in a.fields


def test_non_utf8_is_replaced_and_noted() -> None:
    a = normalize(b"temp \xff\xfe high", DRAFT, STAMP)
    assert "\ufffd" in a.message and "non_utf8" in a.notes


def test_malformed_json_and_arrays_become_text() -> None:
    a = normalize(b'{"message": ', DRAFT, STAMP)
    assert a.message == '{"message": ' and "malformed_json" in a.notes
    b = normalize(b"[1, 2]", DRAFT, STAMP)
    assert b.message == "[1, 2]" and "json_not_object" in b.notes


def test_deep_nesting_does_not_crash() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    a = normalize(deep, DRAFT, STAMP)
    assert "malformed_json" in a.notes
    assert len(a.message.encode()) <= MAX_MESSAGE_BYTES


def test_limits_message_fields_and_keys() -> None:
    obj = {f"k{i}": i for i in range(200)}
    obj["bad key!"] = 1
    obj["message"] = "m" * 20_000  # type: ignore[assignment]
    a = normalize(json.dumps(obj).encode(), DRAFT, STAMP)
    assert len(a.fields) == MAX_FIELDS
    assert len(a.message.encode()) <= MAX_MESSAGE_BYTES
    assert {"too_many_fields", "bad_field_key", "message_truncated"} <= set(a.notes)


def test_unknown_severity_is_kept_not_dropped() -> None:
    a = normalize(b'{"message": "m", "severity": "apocalyptic"}', DRAFT, STAMP)
    assert a.severity is DRAFT.severity and a.fields["severity_given"] == "apocalyptic"
    assert "unknown_severity" in a.notes


def test_severity_words() -> None:
    assert parse_severity("WARN") is Severity.WARNING
    assert parse_severity("err") is Severity.CRITICAL
    assert parse_severity("notice") is Severity.INFO
    assert parse_severity("bogus") is None


def test_sensor_names_are_one_topic_level() -> None:
    assert clean_sensor("a/b+#c d") == "a_b__c_d"
    assert clean_sensor("") == "unknown"
    assert len(clean_sensor("x" * 500)) == 64


def test_ids_are_uuid7_and_time_ordered() -> None:
    ids = [new_alert_id(1_700_000_000 + i) for i in range(50)]
    assert ids == sorted(ids)
    u = uuid.UUID(ids[0])
    assert u.version == 7 and u.variant == uuid.RFC_4122
    assert len(set(new_alert_id(1.0) for _ in range(1000))) == 1000


def test_control_characters_are_removed_but_newlines_kept() -> None:
    a = normalize(b"line1\nline2\x00\x1b[31m", DRAFT, STAMP)
    assert a.message == "line1\nline2[31m"


@given(st.binary(max_size=2048))
def test_any_bytes_normalise_without_error(payload: bytes) -> None:
    a = normalize(payload, DRAFT, STAMP)
    assert a.topic == DRAFT.topic and a.source == "mqtt"
    assert len(a.message.encode("utf-8", "surrogatepass")) <= MAX_MESSAGE_BYTES
    assert len(a.fields) <= MAX_FIELDS
    assert all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k) for k in a.fields)


@given(
    st.dictionaries(
        st.text(max_size=20),
        st.recursive(
            st.none()
            | st.booleans()
            | st.integers()
            | st.floats(allow_nan=False)
            | st.text(max_size=50),
            lambda children: (
                st.lists(children, max_size=3)
                | st.dictionaries(st.text(max_size=5), children, max_size=3)
            ),
            max_leaves=10,
        ),
        max_size=10,
    )
)
def test_any_json_object_normalises(obj: dict[str, object]) -> None:
    a = normalize(json.dumps(obj).encode(), DRAFT, STAMP)
    assert "/" not in a.sensor and a.severity in Severity
    assert all(k not in ("id", "topic", "source") for k in a.fields)


def test_clock_correction_same_boot() -> None:
    unsynced = Stamp(wall=1000.0, boottime=50.0, boot_id="b1", synced=False)
    now = Stamp(wall=1_800_000_000.0, boottime=150.0, boot_id="b1", synced=True)
    assert unsynced.corrected(now) == (1_800_000_000.0 - 100.0, True)
    other_boot = Stamp(wall=1_800_000_000.0, boottime=150.0, boot_id="b2", synced=True)
    assert unsynced.corrected(other_boot) == (1000.0, False)
    still_unsynced = Stamp(wall=2000.0, boottime=150.0, boot_id="b1", synced=False)
    assert unsynced.corrected(still_unsynced) == (1000.0, False)
