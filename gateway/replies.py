"""What the smarthost answered, as data, and what that means for the message.

No I/O and no SMTP library here: `gateway.smtp` turns a transaction into one of the
values below, and `judge` classifies it (RFC 5321 §4.2.1 reply classes, invariants 2, 3
and 12). Every value classifies without raising, so a reply no RFC foresees still
yields a verdict, never a lost message:

- 2xx to the end of DATA, and only that, is `sent` (invariant 2). Recipients refused at
  RCPT are noted on it; a 4xx for any of them keeps the message queued for those alone.
- 4xx is temporary (§4.2.1: "transient negative completion"): queued, backed off.
  421 also closes the session (§3.8), so it is not reused.
- 5xx (and any code above) is permanent: dead-lettered with the server's reply kept.
- Any other code where a reply ended the transaction is nothing we can act on: queued,
  and the session, in an unknown state, dropped. A 2xx there is not an acceptance: a
  250 to DATA, where 354 was due, means no message was sent.
- A session that dropped or stalled during the message says nothing about the message:
  `broke`, and the relay decides whom to blame (`gateway.uplink`).
- A refusal of the account, not of the message (`account_refusal`: authentication
  required, send-as denied, a sending quota, any 5xx to MAIL FROM, whose sender is the
  same for every message) pauses the relay and keeps the message queued, uncharged:
  dead-lettering it would dead-letter the whole queue, one message after the other
  (invariant 12). Only replies about the message itself (an address, its size, its
  content) dead-letter it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: its code and its text (the lines after the code, joined)."""

    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.text}".strip()


# (recipient, the reply to its RCPT), in the order they were given.
RcptReplies = tuple[tuple[str, Reply], ...]


@dataclass(frozen=True, slots=True)
class Accepted:
    """The end of DATA got a 2xx: the message is the server's. `refused` holds the
    recipients refused at RCPT (the others received it)."""

    reply: Reply
    refused: RcptReplies = ()


@dataclass(frozen=True, slots=True)
class Refused:
    """A reply ended the transaction before the message was accepted: to MAIL FROM, to
    DATA, to the end of DATA, or a 421 at any point. `at` is "mail" for a reply to
    MAIL FROM, "" for the others."""

    reply: Reply
    at: str = ""


@dataclass(frozen=True, slots=True)
class NoRecipients:
    """Every recipient was refused at RCPT, so no DATA was sent."""

    refused: RcptReplies


@dataclass(frozen=True, slots=True)
class Broken:
    """The session failed during the message: the connection dropped, or the server
    stalled past smtp.timeout (`timed_out`). Whether the server kept the message is
    unknown, so it is resent with the same Message-ID (duplicates are identifiable)."""

    reason: str
    timed_out: bool = False


@dataclass(frozen=True, slots=True)
class Unexpected:
    """Anything else went wrong while sending (a library surprise, an address it would
    not send to): not the server's verdict on the message."""

    reason: str


Failed = Refused | NoRecipients | Broken | Unexpected
Result = Accepted | Failed


def explain(result: Result) -> str:
    """A result as an operator reads it."""
    match result:
        case Accepted(reply=reply, refused=refused):
            if refused:
                return f"{reply}; refused: {_rcpt_notes(refused)}"
            return str(reply)
        case Refused(reply=reply):
            return str(reply)
        case NoRecipients(refused=refused):
            return f"every recipient refused: {_rcpt_notes(refused)}"
        case Broken(reason=reason) | Unexpected(reason=reason):
            return reason


def _rcpt_notes(refused: RcptReplies) -> str:
    return "; ".join(f"{rcpt}: {reply}" for rcpt, reply in refused)


# --- classification --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verdict:
    state: str  # sent | queued | dead
    error: str | None = None
    rcpts: tuple[str, ...] | None = None  # queued: only these are left
    reconnect: bool = False  # the session is unusable after this
    broke: bool = False  # the session itself failed during this message
    pause: str | None = None  # queued: the account was refused (ACCOUNT_KINDS); pause the relay
    # dead: a permanent refusal that names nothing of the message; the relay pauses when
    # several messages in a row get the same one (gateway.uplink.Streak)
    same_as: str | None = None


def _temporary(code: int) -> bool:
    return 400 <= code < 500


# What an account-level refusal is about: the relay's status and pause length follow it.
AUTH = "auth"  # not authenticated: configure or fix the login
ACCOUNT = "account"  # authenticated, but this account may not send (as this sender)
QUOTA = "quota"  # a sending quota: paused until its window (smtp.quota_retry)
THROTTLE = "throttle"  # "slow down": paused 30 s, doubling up to smtp.throttle_max
ACCOUNT_KINDS = (AUTH, ACCOUNT, QUOTA, THROTTLE)

# RFC 3463 enhanced status code at the start of the text: class.subject.detail.
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?!\S)")
# Quota texts of the common smarthosts: Gmail "Daily user sending limit exceeded" (or
# "quota"), Microsoft 365 "SubmissionQuotaExceededException", SES "Daily message quota
# exceeded". A recipient's full mailbox is not among them (x.2.2: about the recipient).
_QUOTA_TEXT = re.compile(
    r"submission ?quota|sending (?:limit|quota)|daily (?:user |message )?(?:sending )?"
    r"(?:limit|quota)",
    re.IGNORECASE,
)
# Send-as refusals: Microsoft 365 (5.7.60 SendAsDenied), Postfix's
# reject_sender_login_mismatch ("Sender address rejected: not owned by user").
# "Slow down" texts: Microsoft 365 "451 4.7.500 Server busy. Please try again later",
# "421 4.7.0 ... too many connections", Gmail "421 4.7.28 ... unusual rate", SES
# "454 Throttling failure: Maximum sending rate exceeded", Postfix "421 4.7.0 Error: too
# many errors", "try again later" from most. "Too many recipients" (x.5.3) is about the
# message; greylisting ("451 4.7.1 Greylisted", x.7.1) is per message by design.
_THROTTLE_TEXT = re.compile(
    r"too many (?!recipients)|\brate\b|rate[- ]?limit|throttl|slow(?:ing)? down|"
    r"try again later|server busy",
    re.IGNORECASE,
)
_PER_MESSAGE_TEXT = re.compile(r"grey ?list|gray ?list|too many recipients", re.IGNORECASE)
_SEND_AS_TEXT = re.compile(r"sendasdenied|send as|not owned by user", re.IGNORECASE)


def enhanced(reply: Reply) -> tuple[int, int, int] | None:
    m = _ENHANCED.match(reply.text.lstrip())
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def about_the_message(reply: Reply) -> bool:
    """A refusal of this message alone: an address (x.1.x), a full mailbox (x.2.2), its
    size (552, x.2.3, x.3.4) or its content (x.6.x)."""
    status = enhanced(reply)
    if reply.code == 552:
        return True
    if status is None:
        return False
    _, subject, detail = status
    return subject in (1, 6) or (subject, detail) in ((2, 2), (2, 3), (3, 4))


def account_refusal(reply: Reply, at: str = "") -> str | None:
    """AUTH, ACCOUNT or QUOTA when `reply` refuses the account rather than the message;
    None otherwise. `at` "mail": the reply was to MAIL FROM."""
    status = enhanced(reply)
    detail = status[1:] if status else None
    if at == "mail":
        # At MAIL FROM an address (x.1.x) is the sender's, the same for every message;
        # only a size refused there (SIZE=, RFC 1870) is about the message.
        if reply.code == 552 or detail in ((2, 3), (3, 4)):
            return None
    elif about_the_message(reply):
        return None
    if reply.code < 400:
        return None
    if reply.code == 530 or detail == (7, 57):
        return AUTH  # RFC 4954 §6 "Authentication required"; M365 "not authenticated"
    if (detail == (4, 5) and reply.code >= 500) or _QUOTA_TEXT.search(reply.text):
        return QUOTA  # Gmail's 550 5.4.5; 4xx quotas too: retrying each message is no use
    if reply.code < 500:
        # A temporary refusal: deferred as usual, unless it asks the gateway to slow down.
        return THROTTLE if _throttle(reply, detail) else None
    if detail in ((7, 60), (7, 705), (7, 708)) or _SEND_AS_TEXT.search(reply.text):
        return ACCOUNT  # send-as denied, tenant blocked
    if at == "mail":
        return ACCOUNT  # MAIL FROM names the same sender for every message
    return None


def _throttle(reply: Reply, detail: tuple[int, int] | None) -> bool:
    """A 4xx that asks the whole gateway to slow down (`THROTTLE`): any 421 (RFC 5321
    §3.8: the service is closing the channel), a 451 4.7.x (a policy: Microsoft 365's
    4.7.500 "server busy") or a rate-ish text; never greylisting or too many recipients,
    which are about one message. A 450 4.7.1 is often one recipient's access rule, so
    4.7.x alone counts only with 451."""
    if _PER_MESSAGE_TEXT.search(reply.text):
        return False
    return (
        reply.code == 421
        or (reply.code == 451 and detail is not None and detail[0] == 7)
        or _THROTTLE_TEXT.search(reply.text) is not None
    )


def judge_refusals(refused: RcptReplies, recipients: tuple[str, ...], accepted: bool) -> Verdict:
    """Per-recipient outcomes (RFC 5321 §3.3, §4.2.5). A recipient refused with 4xx is
    retried alone (the others have the message: resending to them would duplicate it);
    one refused with anything else is dropped from the message, noted, never retried."""
    by_rcpt = dict(refused)
    temp = tuple(r for r in recipients if r in by_rcpt and _temporary(by_rcpt[r].code))
    perm = [f"{r}: {x.code} {x.text}" for r, x in by_rcpt.items() if not _temporary(x.code)]
    notes = "; ".join([f"{r}: {by_rcpt[r].code} {by_rcpt[r].text}" for r in temp] + perm) or None
    if temp:
        return Verdict("queued", error=notes, rcpts=temp)
    if accepted:
        return Verdict("sent", error=f"rejected recipients: {notes}" if notes else None)
    return Verdict("dead", error=notes)


def judge(result: Result, recipients: tuple[str, ...]) -> Verdict:
    """What to do with the message the transaction carried (see the module's opening)."""
    match result:
        case Accepted(reply=reply, refused=refused) if 200 <= reply.code < 300:
            return judge_refusals(refused, recipients, accepted=True)
        case NoRecipients(refused=refused):
            kinds = {account_refusal(reply) for _, reply in refused}
            if len(kinds) == 1 and (kind := kinds.pop()) is not None:
                # Every recipient refused for the account's sake (530 at RCPT).
                return Verdict("queued", error=explain(result), pause=kind)
            v = judge_refusals(refused, recipients, accepted=False)
            if v.state == "dead" and not any(about_the_message(r) for _, r in refused):
                # Every recipient refused with nothing said about an address ("554 5.7.1
                # Relay access denied"): as likely the account's as the message's, so it
                # counts towards the same-refusal streak like any such 5xx (invariant 12).
                codes = "|".join(sorted({_same(r) for _, r in refused}))
                return Verdict("dead", error=v.error, same_as=f"rcpt {codes}")
            return v
        case Refused(reply=reply, at=at) if (kind := account_refusal(reply, at)) is not None:
            return Verdict("queued", error=str(reply), pause=kind, reconnect=reply.code == 421)
        # An Accepted without a 2xx is judged by its reply: `sent` follows from the 2xx
        # alone (invariant 2), not from which value carried it.
        case Refused(reply=reply) | Accepted(reply=reply):
            if _temporary(reply.code):
                return Verdict("queued", error=str(reply), reconnect=reply.code == 421)
            if reply.code >= 500:
                same = None if about_the_message(reply) else _same(reply)
                return Verdict("dead", error=str(reply), same_as=same)
            return Verdict("queued", error=f"unexpected reply {reply}", reconnect=True)
        case Broken(reason=reason):
            return Verdict(
                "queued",
                error=f"session failed during delivery: {reason}",
                reconnect=True,
                broke=True,
            )
        case Unexpected(reason=reason):
            return Verdict("queued", error=f"unexpected error: {reason}", reconnect=True)


def _same(reply: Reply) -> str:
    """What makes two refusals "the same" for the streak: the code and enhanced status
    (their texts often carry a queue id or the recipient)."""
    status = enhanced(reply)
    return f"{reply.code} {'.'.join(map(str, status))}" if status else str(reply.code)
