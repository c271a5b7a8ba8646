"""Local mail's limits at pickup (sans-IO): a rate per local user, and log episodes.

Local mail is a guest (DESIGN.md, invariant 14): one user's flood must neither take
the device's account nor delay anyone else's mail. Each uid has a token bucket of
`burst` tokens refilled at `count/period` per second; a complete maildrop file whose
owner has no token waits in the spool and is taken when one comes back. Waiting, not
refusing: local mail is what cron, smartd and apt say about the device, and a file in
the spool costs the sender's disk, not the outbox's room.

`Episodes` keeps a log to one line per (uid, reason) while a refusal keeps happening,
and one more when it has stopped: a flood is told in two sentences, not thousands.

Property (tests/test_maildrop_limits.py): over any window of T seconds a uid is
granted at most burst + count*T/period files, and every uid's bucket is independent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

QUIET = 60.0  # an episode ends after this long without the same refusal
MAX_USERS = 10_000  # buckets kept; full ones are dropped first (they hold no state)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class UserRate:
    """Token buckets per uid. `take(uid, now)` is True if the uid may send one now."""

    def __init__(self, count: int, period: float, burst: int) -> None:
        self.per_second = count / period
        self.burst = float(burst)
        self._buckets: dict[int, _Bucket] = {}

    def _refilled(self, uid: int, now: float) -> _Bucket:
        b = self._buckets.get(uid)
        if b is None:
            if len(self._buckets) >= MAX_USERS:
                self._forget_full(now)
            b = self._buckets[uid] = _Bucket(self.burst, now)
        # A clock that steps back mints no tokens, then or when it comes forward again.
        elapsed = max(0.0, now - b.at)
        b.tokens = min(self.burst, b.tokens + elapsed * self.per_second)
        b.at = max(b.at, now)
        return b

    def ready(self, uid: int, now: float) -> bool:
        """Whether a take would succeed, without taking."""
        return self._refilled(uid, now).tokens >= 1.0

    def available(self, uid: int, now: float) -> int:
        """How many a uid may send now, without taking them."""
        return int(self._refilled(uid, now).tokens)

    def take(self, uid: int, now: float) -> bool:
        b = self._refilled(uid, now)
        if b.tokens < 1.0:
            return False
        b.tokens -= 1.0
        return True

    def _forget_full(self, now: float) -> None:
        for uid in list(self._buckets):
            b = self._buckets[uid]
            if b.tokens + (now - b.at) * self.per_second >= self.burst:
                del self._buckets[uid]


@dataclass(slots=True)
class _Episode:
    first: float
    last: float
    count: int = 1


@dataclass(slots=True)
class Episodes:
    """Which refusals to log: the first of an episode, and its end with a count."""

    quiet: float = QUIET
    _open: dict[tuple[int, str], _Episode] = field(default_factory=dict)

    def happened(self, uid: int, reason: str, now: float) -> bool:
        """Record one refusal; True if it starts an episode (log it)."""
        key = (uid, reason)
        ep = self._open.get(key)
        if ep is None:
            self._open[key] = _Episode(now, now)
            return True
        ep.count += 1
        ep.last = now
        return False

    def ended(self, now: float) -> list[tuple[int, str, int, float]]:
        """Episodes quiet for `quiet` seconds: (uid, reason, how many, seconds long),
        each reported once and then forgotten."""
        done = [(k, ep) for k, ep in self._open.items() if now - ep.last >= self.quiet]
        for k, _ in done:
            del self._open[k]
        return [(uid, reason, ep.count, ep.last - ep.first) for (uid, reason), ep in done]

    def end(self, uid: int, reason: str) -> int:
        """Close an episode at once (the condition is known to be over); its count."""
        ep = self._open.pop((uid, reason), None)
        return 0 if ep is None else ep.count

    def keep_only(self, uids: set[int]) -> None:
        """Forget the episodes of every other uid (their cause is gone)."""
        for key in [k for k in self._open if k[0] not in uids]:
            del self._open[key]
