"""Reply classification (gateway/replies.py) as data: a table of cases, then properties
over arbitrary reply data. No server: what the session gives back is tested in
test_smtp.py."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.replies import (
    Accepted,
    Broken,
    NoRecipients,
    Refused,
    Reply,
    Result,
    Unexpected,
    Verdict,
    explain,
    judge,
)

R = ("a@x", "b@x")
OK = Reply(250, "2.0.0 queued as 1234")


def rc(code: int, text: str = "text") -> Reply:
    return Reply(code, text)


CASES: list[tuple[str, Result, Verdict]] = [
    ("2xx to end of DATA", Accepted(OK), Verdict("sent")),
    (
        "5xx for one recipient, the other accepted",
        Accepted(OK, (("b@x", rc(550, "no")),)),
        Verdict("sent", error="rejected recipients: b@x: 550 no"),
    ),
    (
        "4xx for one recipient: only it stays queued",
        Accepted(OK, (("b@x", rc(452, "full")),)),
        Verdict("queued", error="b@x: 452 full", rcpts=("b@x",)),
    ),
    (
        "4xx and 5xx recipients: the 4xx one queued, the 5xx one noted",
        Accepted(OK, (("b@x", rc(550, "gone")), ("a@x", rc(451, "later")))),
        Verdict("queued", error="a@x: 451 later; b@x: 550 gone", rcpts=("a@x",)),
    ),
    (
        "every recipient refused with 5xx",
        NoRecipients((("a@x", rc(550, "no")), ("b@x", rc(550, "no")))),
        Verdict("dead", error="a@x: 550 no; b@x: 550 no", same_as="rcpt 550"),
    ),
    (
        "every recipient refused for its address: the message's, no streak",
        NoRecipients((("a@x", rc(550, "5.1.1 no such user")),)),
        Verdict("dead", error="a@x: 550 5.1.1 no such user"),
    ),
    (
        "relaying denied for every recipient: counts towards the same-refusal streak",
        NoRecipients((("a@x", rc(554, "5.7.1 <a@x>: Relay access denied")),)),
        Verdict(
            "dead", error="a@x: 554 5.7.1 <a@x>: Relay access denied", same_as="rcpt 554 5.7.1"
        ),
    ),
    (
        "every recipient refused, one with 4xx",
        NoRecipients((("a@x", rc(450, "busy")), ("b@x", rc(553, "bad")))),
        Verdict("queued", error="a@x: 450 busy; b@x: 553 bad", rcpts=("a@x",)),
    ),
    ("4xx to end of DATA", Refused(rc(451, "4.3.0 later")), Verdict("queued", "451 4.3.0 later")),
    (
        "421: the server closes the session",
        Refused(rc(421, "4.3.2 bye")),
        Verdict("queued", "421 4.3.2 bye", reconnect=True, pause="throttle"),
    ),
    (
        "5xx to MAIL FROM: the sender, the same for every message",
        Refused(rc(553, "5.1.8 bad sender domain"), at="mail"),
        Verdict("queued", "553 5.1.8 bad sender domain", pause="account"),
    ),
    (
        "size refused at MAIL FROM (SIZE=): about the message",
        Refused(rc(552, "5.3.4 message too big"), at="mail"),
        Verdict("dead", "552 5.3.4 message too big"),
    ),
    (
        "5xx to end of DATA",
        Refused(rc(554, "5.7.1 no")),
        Verdict("dead", "554 5.7.1 no", same_as="554 5.7.1"),
    ),
    (
        "5xx about the message's address",
        Refused(rc(550, "5.1.1 unknown user")),
        Verdict("dead", "550 5.1.1 unknown user"),
    ),
    ("a code above 5xx", Refused(rc(600, "what")), Verdict("dead", "600 what", same_as="600")),
    (
        "a 250 where 354 was due: not an acceptance",
        Refused(rc(250, "ok")),
        Verdict("queued", "unexpected reply 250 ok", reconnect=True),
    ),
    (
        "3xx ending the transaction",
        Refused(rc(354, "go on")),
        Verdict("queued", "unexpected reply 354 go on", reconnect=True),
    ),
    (
        "a session dropped mid-DATA",
        Broken("Connection lost"),
        Verdict(
            "queued",
            "session failed during delivery: Connection lost",
            reconnect=True,
            broke=True,
        ),
    ),
    (
        "a session stalled past smtp.timeout",
        Broken("Timed out waiting for server response", timed_out=True),
        Verdict(
            "queued",
            "session failed during delivery: Timed out waiting for server response",
            reconnect=True,
            broke=True,
        ),
    ),
    (
        "anything else",
        Unexpected("address has a line break"),
        Verdict("queued", "unexpected error: address has a line break", reconnect=True),
    ),
    (
        "an Accepted without a 2xx is judged by its reply",
        Accepted(rc(554, "no"), ()),
        Verdict("dead", "554 no", same_as="554"),
    ),
]

# Account-level replies seen at real smarthosts: each pauses the relay, none is dead.
ACCOUNT_REPLIES = [
    ("RFC 4954", 530, "5.7.0 Authentication required", "mail", "auth"),
    ("RFC 4954, at RCPT", 530, "5.7.0 Authentication required", "rcpt", "auth"),
    ("Microsoft 365", 530, "5.7.57 Client not authenticated to send mail", "mail", "auth"),
    (
        "Microsoft 365",
        550,
        "5.7.60 SMTP; Client does not have permissions to send as this sender",
        "mail",
        "account",
    ),
    (
        "Microsoft 365, at DATA",
        550,
        "5.7.60 Client does not have permissions to send as this sender",
        "",
        "account",
    ),
    (
        "Postfix",
        553,
        "5.7.1 <x@y>: Sender address rejected: not owned by user gw",
        "rcpt",
        "account",
    ),
    (
        "Gmail",
        550,
        "5.4.5 Daily user sending limit exceeded. For more information, go to",
        "",
        "quota",
    ),
    ("Gmail", 550, "5.4.5 Daily user sending quota exceeded.", "mail", "quota"),
    (
        "Microsoft 365",
        554,
        "5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to process",
        "",
        "quota",
    ),
    ("SES", 454, "Throttling failure: Daily message quota exceeded.", "", "quota"),
]


# "Slow down": the whole relay pauses (30 s, doubling), no message is charged.
THROTTLE_REPLIES = [
    ("RFC 5321 §3.8", 421, "4.3.2 Service shutting down", ""),
    ("Microsoft 365", 421, "4.7.0 Too many connections from this IP", "mail"),
    ("Gmail", 421, "4.7.28 Our system has detected an unusual rate of mail", ""),
    ("Microsoft 365", 451, "4.7.500 Server busy. Please try again later", ""),
    ("any", 451, "4.7.0 Temporary policy failure", ""),
    ("Postfix", 450, "4.7.1 Error: too many messages, slow down", "mail"),
    ("SES", 454, "Throttling failure: Maximum sending rate exceeded.", ""),
    ("any", 452, "4.3.1 Rate limit exceeded", "rcpt"),
    ("any", 451, "Try again later", ""),
]

# A 4xx about one message stays that message's: deferred, charged, no pause.
PER_MESSAGE_4XX = [
    rc(451, "4.3.0 Temporary local problem"),
    rc(450, "4.7.1 Greylisted, try again later"),
    rc(451, "4.7.1 Greylisting in action, please come back later"),
    rc(452, "4.5.3 Too many recipients"),
    rc(450, "4.7.1 <a@x>: Recipient address rejected: Access denied"),
    rc(452, "4.2.2 Mailbox full"),
    rc(450, "4.1.1 Recipient unknown, try again later"),
]


@pytest.mark.parametrize(
    ("who", "code", "text", "at"),
    THROTTLE_REPLIES,
    ids=[f"{r[0]} {r[1]}" for r in THROTTLE_REPLIES],
)
def test_slow_down_replies_throttle_the_relay(who: str, code: int, text: str, at: str) -> None:
    reply = rc(code, text)
    rcpt = NoRecipients(tuple((r, reply) for r in R))
    result: Result = rcpt if at == "rcpt" else Refused(reply, at=at)
    v = judge(result, R)
    assert v.state == "queued" and v.pause == "throttle" and v.rcpts is None
    assert v.reconnect == (code == 421 and at != "rcpt")


@pytest.mark.parametrize("reply", PER_MESSAGE_4XX, ids=str)
def test_a_4xx_about_one_message_stays_per_message(reply: Reply) -> None:
    v = judge(Refused(reply), R)
    assert v.state == "queued" and v.pause is None


@given(st.integers(400, 499), st.text(max_size=40), st.sampled_from(["", "mail"]))
def test_a_4xx_never_dead_letters_and_only_pauses_as_throttle_or_quota(
    code: int, text: str, at: str
) -> None:
    v = judge(Refused(Reply(code, text), at=at), R)
    assert v.state == "queued"
    assert v.pause in (None, "throttle", "quota", "auth")
    if code == 421 and "grey" not in text.lower() and "gray" not in text.lower():
        assert v.pause in ("throttle", "quota", "auth") and v.reconnect


@pytest.mark.parametrize(
    ("who", "code", "text", "at", "kind"), ACCOUNT_REPLIES, ids=[r[0] for r in ACCOUNT_REPLIES]
)
def test_account_level_replies_pause_and_keep_the_message(
    who: str, code: int, text: str, at: str, kind: str
) -> None:
    reply = rc(code, text)
    rcpt = NoRecipients(tuple((r, reply) for r in R))
    result: Result = rcpt if at == "rcpt" else Refused(reply, at=at)
    v = judge(result, R)
    assert v.state == "queued" and v.pause == kind and v.rcpts is None


@pytest.mark.parametrize(
    "reply",
    [
        rc(550, "5.1.1 The email account that you tried to reach does not exist"),
        rc(552, "5.2.3 Your message exceeded Google's message size limits"),
        rc(552, "5.2.2 The recipient's inbox is out of storage space (quota exceeded)"),
        rc(554, "5.6.0 Message content rejected"),
    ],
)
def test_replies_about_the_message_dead_letter_it(reply: Reply) -> None:
    v = judge(Refused(reply), R)
    assert v.state == "dead" and v.pause is None and v.same_as is None


@pytest.mark.parametrize(("case", "result", "verdict"), CASES, ids=[c[0] for c in CASES])
def test_classification(case: str, result: Result, verdict: Verdict) -> None:
    assert judge(result, R) == verdict


def test_explain_reads_as_a_sentence() -> None:
    assert explain(Refused(rc(451, "4.3.0 later"))) == "451 4.3.0 later"
    assert explain(Accepted(OK, (("b@x", rc(550, "no")),))) == (
        "250 2.0.0 queued as 1234; refused: b@x: 550 no"
    )
    assert explain(NoRecipients((("a@x", rc(550, "no")),))) == (
        "every recipient refused: a@x: 550 no"
    )
    assert explain(Broken("Connection lost")) == "Connection lost"


# --- properties over any reply data ----------------------------------------------------

ADDRESSES = ["a@x", "b@x", "c@x", "d@x"]
texts = st.text(max_size=40)
recipients = st.lists(st.sampled_from(ADDRESSES), min_size=1, max_size=4, unique=True).map(tuple)


def replies(codes: st.SearchStrategy[int]) -> st.SearchStrategy[Reply]:
    return st.builds(Reply, codes, texts)


def rcpt_replies(codes: st.SearchStrategy[int]) -> st.SearchStrategy[tuple[tuple[str, Reply], ...]]:
    return st.dictionaries(st.sampled_from(ADDRESSES), replies(codes), max_size=4).map(
        lambda d: tuple(d.items())
    )


def results(codes: st.SearchStrategy[int]) -> st.SearchStrategy[Result]:
    return st.one_of(
        st.builds(Accepted, replies(codes), rcpt_replies(codes)),
        st.builds(Refused, replies(codes), st.sampled_from(["", "mail"])),
        st.builds(NoRecipients, rcpt_replies(codes)),
        st.builds(Broken, texts, st.booleans()),
        st.builds(Unexpected, texts),
    )


any_code = st.integers(min_value=-1, max_value=1000)
positive = st.integers(min_value=200, max_value=299)
permanent = st.integers(min_value=500, max_value=599)


@given(results(any_code), recipients)
def test_any_reply_data_classifies(result: Result, rcpts: tuple[str, ...]) -> None:
    v = judge(result, rcpts)
    assert v.state in {"sent", "queued", "dead"}
    assert v.broke == isinstance(result, Broken)
    if v.rcpts is not None:
        assert v.state == "queued" and v.rcpts and set(v.rcpts) <= set(rcpts)
    if v.state == "sent":  # only ever from a 2xx to the end of DATA (invariant 2)
        assert isinstance(result, Accepted) and 200 <= result.reply.code < 300
    if v.pause is not None:  # the account's fault: the message is kept whole
        assert v.state == "queued" and v.rcpts is None and not v.broke
    explain(result)


@given(st.builds(Accepted, replies(positive), rcpt_replies(positive)), recipients)
def test_2xx_only_is_sent(result: Accepted, rcpts: tuple[str, ...]) -> None:
    """The server accepted the message and said nothing but 2xx: never queued nor dead."""
    assert judge(result, rcpts).state == "sent"


@given(
    st.one_of(
        st.builds(Accepted, replies(permanent), rcpt_replies(permanent)),
        st.builds(Refused, replies(permanent)),
        st.builds(NoRecipients, rcpt_replies(permanent)),
    ),
    recipients,
)
def test_5xx_only_is_never_sent(result: Result, rcpts: tuple[str, ...]) -> None:
    assert judge(result, rcpts).state != "sent"


@given(st.one_of(st.builds(Broken, texts, st.booleans()), st.builds(Unexpected, texts)), recipients)
def test_a_failed_session_never_condemns_the_message(
    result: Result, rcpts: tuple[str, ...]
) -> None:
    v = judge(result, rcpts)
    assert v.state == "queued" and v.reconnect and v.rcpts is None
