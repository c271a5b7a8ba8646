"""The serial session without a port: events in, actions out (gateway/sources/serial_session.py)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_bridge import codec
from gateway.clock import Stamp
from gateway.errors import OutboxFull
from gateway.outbox.writer import Stored
from gateway.sources.serial_session import MAX_SENSORS, Answer, Pending, Session

STAMP = Stamp(wall=1_700_000_000.0, boottime=42.0, boot_id="test-boot", synced=True)
HELLO = codec.Hello(1, "cab-9", "2.1", "boot-a")


def stored(rejected: dict[int, str] | None = None, duplicates: list[str] | None = None) -> Stored:
    return Stored(duplicates or [], rejected or {})


def test_hello_ping_and_an_alert_before_hello() -> None:
    s = Session("p")
    early = s.receive([codec.Alert(5, "door", "critical", "open")], STAMP)
    # Without the boot id a retransmission cannot be told from a new alert: ask for HELLO.
    assert early.replies == [codec.Nak(5, "HELLO")] and early.alerts == []
    out = s.receive([HELLO, codec.Ping(6)], STAMP)
    assert out.replies == [codec.Ack(1), codec.Pong(6)]
    assert out.hellos == [HELLO] and out.alerts == [] and out.rejected == []
    assert s.boot == ("cab-9", "boot-a")


def test_an_alert_after_hello_is_to_store_and_not_yet_answered() -> None:
    s = Session("bench1")
    s.receive([HELLO], STAMP)
    out = s.receive([codec.Alert(5, "door", "critical", "door open, 5 min")], STAMP)
    assert out.replies == []  # the ACK waits for the commit
    [p] = out.alerts
    assert p.seq == 5 and p.key == "port:bench1/cab-9/boot-a/5"
    assert p.alert.topic == "serial/bench1/door" and p.alert.sensor == "door"
    assert p.alert.message == "door open, 5 min" and p.alert.received == STAMP
    # Shown in the mail, not read back: the seq rides in Pending.
    assert p.alert.fields == {"serial_device": "cab-9", "serial_boot": "boot-a", "serial_seq": 5}


def test_broken_and_foreign_frames_are_nakked_and_counted() -> None:
    s = Session("p")
    out = s.receive(
        [
            codec.FrameError(codec.Reason.CRC, 7, "CRC mismatch"),
            codec.FrameError(codec.Reason.SIZE, None, "too long"),
            codec.Ack(3),
            codec.Nak(None, "CRC"),
        ],
        STAMP,
    )
    assert out.replies == [
        codec.Nak(7, "CRC"),
        codec.Nak(None, "SIZE"),
        codec.Nak(3, "TYPE"),
        codec.Nak(None, "TYPE"),
    ]
    assert out.rejected == [
        ("serial_crc", "CRC mismatch"),
        ("serial_size", "too long"),
        ("serial_type", None),
        ("serial_type", None),
    ]


def test_a_new_boot_is_reported_once() -> None:
    s = Session("p")
    assert s.receive([HELLO, HELLO], STAMP).hellos == [HELLO]
    again = codec.Hello(1, "cab-9", "2.1", "boot-b")
    out = s.receive([again], STAMP)
    assert out.hellos == [again] and out.replies == [codec.Ack(1)]
    s.receive([codec.Alert(9, "t", "info", "x")], STAMP)
    assert s.receive([codec.Alert(9, "t", "info", "x")], STAMP).alerts[0].key == (
        "port:p/cab-9/boot-b/9"
    )


def test_two_ports_with_the_same_ids_have_different_keys() -> None:
    frame = codec.Alert(1, "t", "warning", "m")
    keys = []
    for name in ("a", "b"):
        s = Session(name)
        s.receive([codec.Hello(0, "sensor", "1", "1")], STAMP)
        keys.append(s.receive([frame], STAMP).alerts[0].key)
    assert keys[0] != keys[1]


def test_sensor_names_remembered_are_bounded() -> None:
    s = Session("p")
    s.receive([HELLO], STAMP)
    frames = [codec.Alert(i, f"s{i}", "info", "m") for i in range(MAX_SENSORS * 3)]
    out = s.receive(frames, STAMP)
    assert len(s._topics) <= MAX_SENSORS
    assert [p.alert.topic for p in out.alerts] == [f"serial/p/s{i}" for i in range(len(frames))]


def pending(*seqs: int) -> list[Pending]:
    s = Session("p")
    s.receive([HELLO], STAMP)
    return s.receive([codec.Alert(q, "t", "info", f"m{q}") for q in seqs], STAMP).alerts


def test_answers_after_the_commit() -> None:
    s = Session("p")
    batch = pending(4, 5, 6)
    assert s.answer(batch, stored()) == Answer([4, 5, 6], [])
    # Already stored (a retransmission) is ACKed like stored.
    assert s.answer(batch, stored(duplicates=["port:p/cab-9/boot-a/5"])) == Answer([4, 5, 6], [])
    assert s.answer(batch, OutboxFull("full")) == Answer(
        [], [codec.Nak(4, "FULL"), codec.Nak(5, "FULL"), codec.Nak(6, "FULL")]
    )
    assert s.answer(batch, stored({1: "too big"})) == Answer([4, 6], [codec.Nak(5, "PARSE")])
    # This batch starts at 10 in a submission shared with other ports: index 11 is seq 5;
    # indexes outside it belong to other ports.
    assert s.answer(batch, stored({3: "x", 11: "y", 13: "z"}), at=10) == Answer(
        [4, 6], [codec.Nak(5, "PARSE")]
    )


# --- properties ------------------------------------------------------------------------

seqs = st.integers(0, codec.MAX_SEQ)
ids = st.from_regex(r"[A-Za-z0-9._:-]{1,64}", fullmatch=True)
events = st.one_of(
    st.builds(codec.Hello, seqs, st.sampled_from(["d1", "d2"]), ids, st.sampled_from(["b1", "b2"])),
    st.builds(
        codec.Alert,
        seqs,
        ids,
        st.sampled_from(["debug", "info", "warning", "critical"]),
        st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=80),
    ),
    st.builds(codec.Ping, seqs),
    st.builds(codec.Ack, seqs),
    st.builds(codec.Pong, seqs),
    st.builds(codec.Nak, st.none() | seqs, st.sampled_from(list(codec.Reason))),
    st.builds(codec.FrameError, st.sampled_from(list(codec.Reason)), st.none() | seqs, st.text()),
)


def expected(event: codec.Event, booted: bool) -> codec.Frame | None:
    """The obvious slow version: the immediate reply to one event (None: wait for the commit)."""
    match event:
        case codec.Alert(seq):
            return None if booted else codec.Nak(seq, "HELLO")
        case codec.Hello(seq):
            return codec.Ack(seq)
        case codec.Ping(seq):
            return codec.Pong(seq)
        case codec.FrameError(reason, seq):
            return codec.Nak(seq, reason.value)
        case codec.Ack(seq) | codec.Pong(seq) | codec.Nak(seq):
            return codec.Nak(seq, "TYPE")
    raise AssertionError(event)


@settings(max_examples=300)
@given(st.lists(st.lists(events, max_size=8), max_size=8), st.data())
def test_every_frame_gets_its_one_answer(
    chunks: list[list[codec.Event]], data: st.DataObject
) -> None:
    s = Session("p")
    booted = False
    for chunk in chunks:
        out = s.receive(chunk, STAMP)
        replies: list[codec.Frame] = []
        to_store: list[int] = []
        for event in chunk:
            reply = expected(event, booted)
            if reply is not None:
                replies.append(reply)
            elif isinstance(event, codec.Alert):
                to_store.append(event.seq)
            booted = booted or isinstance(event, codec.Hello)
        assert out.replies == replies
        assert [p.seq for p in out.alerts] == to_store
        for frame in out.replies:
            codec.encode(frame)  # every reply can be sent
        if not out.alerts:
            continue
        # The commit's outcome, whatever it is, answers each stored-or-not alert once.
        result: Stored | BaseException = data.draw(
            st.just(OutboxFull("full"))
            | st.builds(stored, st.dictionaries(st.integers(0, len(out.alerts) - 1), st.text()))
        )
        answer = s.answer(out.alerts, result)
        answered = sorted([*answer.acks, *(n.seq for n in answer.naks if n.seq is not None)])
        assert answered == sorted(to_store)
        if isinstance(result, BaseException):
            assert answer.acks == [] and {n.reason for n in answer.naks} <= {"FULL"}
        else:
            assert {n.reason for n in answer.naks} <= {"PARSE"}
            assert len(answer.naks) == len(result.rejected)
        codec.encode_acks(answer.acks)


@settings(max_examples=300)
@given(
    st.lists(
        st.binary(max_size=600)
        | st.sampled_from(
            [
                codec.encode(HELLO),
                codec.encode(codec.Alert(3, "t", "info", "m")),
                b"$ALERT,3,t,info,m*0000\r\n",  # a bad CRC
            ]
        ),
        max_size=12,
    )
)
def test_arbitrary_bytes_through_the_decoder_never_break_the_session(
    chunks: list[bytes],
) -> None:
    s = Session("p")
    decoder = codec.Decoder()
    for chunk in chunks:
        out = s.receive(decoder.feed(chunk), STAMP)
        for frame in out.replies:
            codec.encode(frame)
        assert s.answer(out.alerts, stored()).acks == [p.seq for p in out.alerts]
