"""Alert-storm control per route: dedupe, rate limit, digest. Pure and clock-injected.

A flapping sensor must not bury the on-call engineer in mail, and a critical alert
must not wait behind the flood. Every alert is still stored and acknowledged; this
module only decides how it is mailed:

    mail     a mail of its own (and the lead of its dedupe key for `dedupe_window`)
    repeat   the same key's lead mail is still queued: counted on that mail
    digest   gathered into the route's digest, one mail per `digest_every` that lists
             each distinct alert with its count, first and last seen

Nothing is dropped: a repeat whose lead has already gone out goes to the digest.
Critical alerts skip the rate limit and the digest (`critical_bypass`, the default).

Times here are wall-clock seconds, because the state must survive restarts (it is kept
in the outbox). A device without an RTC may jump; a jump back is clamped (no negative
refill), a jump forward only ends windows early: more mail, never less.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gateway.alert import Severity

# Policy is a config value (gateway.config builds it from a route's keys).
from gateway.config import Policy


@dataclass(frozen=True, slots=True)
class Bucket:
    """A token bucket: `tokens` as of wall time `at`; full at `rate[0]`."""

    tokens: float
    at: float


@dataclass(frozen=True, slots=True)
class Lead:
    """The last mailed alert of a dedupe key: its seq, whether it is still queued (so a
    repeat can be counted on it), and the end of its window."""

    seq: int
    queued: bool
    until: float


Kind = Literal["mail", "repeat", "digest"]


@dataclass(frozen=True, slots=True)
class Decision:
    kind: Kind
    bucket: Bucket | None = None  # the bucket to store, when it changed
    lead_until: float | None = None  # mail: this alert leads its key until then


def refill(bucket: Bucket | None, rate: tuple[int, float], now: float) -> Bucket:
    cap, per = rate
    if bucket is None:
        return Bucket(float(cap), now)
    elapsed = max(0.0, now - bucket.at)  # a clock jumping back refills nothing
    return Bucket(min(float(cap), bucket.tokens + elapsed * cap / per), max(now, bucket.at))


def decide(
    policy: Policy, severity: Severity, now: float, lead: Lead | None, bucket: Bucket | None
) -> Decision:
    """How to mail one alert on one route."""
    bypass = policy.critical_bypass and severity >= Severity.CRITICAL
    until = now + policy.dedupe_window if policy.dedupe_window else None
    if policy.dedupe_window and lead is not None and now < lead.until:
        if lead.queued:
            return Decision("repeat")
        if not bypass:
            return Decision("digest")
        # A critical repeat whose lead went out: mailed again, and leads from now.
    if policy.rate is None or bypass:
        return Decision("mail", lead_until=until)
    filled = refill(bucket, policy.rate, now)
    if filled.tokens >= 1.0:
        return Decision("mail", Bucket(filled.tokens - 1.0, filled.at), lead_until=until)
    return Decision("digest", filled)


def describe(policy: Policy, severity: Severity) -> str:
    """What the policy does to an alert of this severity, for `mailgw route-test`."""
    parts = []
    if policy.dedupe_window:
        parts.append(f"a repeat within {policy.dedupe_window:g} s is counted, not mailed again")
    bypass = policy.critical_bypass and severity >= Severity.CRITICAL
    if policy.rate and not bypass:
        count, per = policy.rate
        parts.append(
            f"at most {count} mails per {per:g} s, the rest in one digest every "
            f"{policy.digest_every:g} s"
        )
    elif policy.rate:
        parts.append("critical: skips the rate limit and the digest")
    return "; ".join(parts)
