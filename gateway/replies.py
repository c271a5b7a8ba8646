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
"""

from __future__ import annotations

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
    DATA, to the end of DATA, or a 421 at any point."""

    reply: Reply


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


def _temporary(code: int) -> bool:
    return 400 <= code < 500


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
            return judge_refusals(refused, recipients, accepted=False)
        # An Accepted without a 2xx is judged by its reply: `sent` follows from the 2xx
        # alone (invariant 2), not from which value carried it.
        case Refused(reply=reply) | Accepted(reply=reply):
            if _temporary(reply.code):
                return Verdict("queued", error=str(reply), reconnect=reply.code == 421)
            if reply.code >= 500:
                return Verdict("dead", error=str(reply))
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
