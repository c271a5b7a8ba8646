"""The smarthost-wide send rate (`smtp.rate_limit`): a token bucket, pure.

A smarthost counts what one account sends, whatever route or priority it came from
(Microsoft 365: 30 messages a minute per mailbox; past it, 4xx replies and then a
blocked account). So the cap is the gateway's, not a route's: storm control
(`gateway.storm`) decides *whether* an alert is mailed, this decides *when* the relay
may start the next transaction. The relay claims no more rows than there are tokens,
and takes each token right before its send, so what waits stays in the outbox in its
priority order: a critical alert that arrives during the
wait is the next one sent.

The bucket holds at most `burst` tokens and gains `count / period` a second. Over any
window of t seconds it lets through at most `burst + t·count/period` sends (the property
tests/test_pace.py checks). The default burst of one token spaces sends evenly,
`period / count` apart: with a larger burst the server would see `burst + count`
within one of its own windows, over the limit it told us. Time is a monotonic value
passed in, never read here, so tests need no sleeps and NTP steps change nothing.
"""

from __future__ import annotations


class Bucket:
    """`count` sends per `period` seconds, `burst` of them back to back."""

    def __init__(self, count: int, period: float, now: float, burst: float = 1.0) -> None:
        if count < 1 or period <= 0 or burst < 1:
            raise ValueError(f"not a rate: {count}/{period}s, burst {burst}")
        self.rate = count / period  # tokens a second
        self.burst = float(burst)
        self._tokens = self.burst  # an idle gateway may send at once
        self._at = now

    def tokens(self, now: float) -> float:
        """Tokens available at `now` (a clock that went back refills nothing)."""
        return min(self.burst, self._tokens + max(0.0, now - self._at) * self.rate)

    def wait(self, now: float) -> float:
        """Seconds until one send is allowed; 0.0 when it is now."""
        missing = 1.0 - self.tokens(now)
        return 0.0 if missing <= 1e-9 else missing / self.rate

    def take(self, now: float, count: int = 1) -> None:
        """`count` sends start at `now`. Taken even when none is available (a flush, a
        retry after a broken session): the debt is paid by the sends after it."""
        self._tokens = self.tokens(now) - count
        self._at = max(self._at, now)

    def try_take(self, now: float) -> bool:
        """One send starts at `now` if a token is there (taken); False if none is.
        Parallel sessions take their token here, right before each send, never ahead
        of it: a token taken early and given back later could be added to a bucket
        that refilled meanwhile, and two sends would go out where one was allowed."""
        if self.wait(now) > 0:
            return False
        self.take(now)
        return True


def describe(count: int, period: float) -> str:
    """(30, 60.0) → "30/min", as an operator wrote it (or near enough)."""
    for unit, seconds in (("d", 86400.0), ("h", 3600.0), ("min", 60.0), ("s", 1.0)):
        if period % seconds == 0:
            n = int(period // seconds)
            return f"{count}/{'' if n == 1 else n}{unit}"
    return f"{count}/{period:g}s"
