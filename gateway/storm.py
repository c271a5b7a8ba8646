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

import re
from dataclasses import dataclass
from typing import Literal

from gateway.alert import Severity

DEFAULT_KEY = "{topic}|{sensor}|{severity}|{message}"

_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*([smhd])\s*$")
_UNIT = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
MAX_RATE_COUNT = 1_000_000
MAX_RATE_PERIOD = 365 * 86400.0


def parse_rate(text: str) -> tuple[int, float]:
    """ "20/h" → (20, 3600.0); "5/10m" → (5, 600.0). Raises ValueError with the fix.

    The bucket refills at count/period per second (`refill`) and starts full at `count`
    tokens: a zero period would divide by zero on every store on the route, and numbers
    past these bounds would overflow a float.
    """
    m = _RATE.match(text)
    if not m:
        raise ValueError(
            f'{text!r} is not a rate: write mails per period, like "20/h", "5/10m" or "1/s"'
        )
    digits, period_digits, unit = m.groups()
    # Compared as text lengths and integers first: int() refuses very long digit strings,
    # and float() of a long one is inf.
    count = int(digits) if len(digits) <= 9 else MAX_RATE_COUNT + 1
    seconds = int(period_digits or 1) * _UNIT[unit] if len(period_digits) <= 9 else -1
    if not 1 <= count <= MAX_RATE_COUNT:
        raise ValueError(
            f'{text!r}: write 1 to {MAX_RATE_COUNT} mails per period, like "20/h" or "5/10m"'
        )
    if not 1 <= seconds <= MAX_RATE_PERIOD:
        raise ValueError(
            f'{text!r}: write mails per period of 1 s to 365 d, like "20/h" or "100/d" '
            "(a zero period would divide by zero)"
        )
    return count, float(seconds)


@dataclass(frozen=True, slots=True)
class Policy:
    dedupe_window: float = 0.0  # seconds; 0 = off
    rate: tuple[int, float] | None = None  # (mails, per seconds)
    digest_every: float = 3600.0
    critical_bypass: bool = True
    key: str = DEFAULT_KEY

    @property
    def active(self) -> bool:
        return bool(self.dedupe_window or self.rate)


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
