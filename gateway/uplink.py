"""When to try the smarthost, and whom to blame when it fails (invariants 3, 4 and 12).

Pure: every method takes the monotonic time `now` as a value and draws jitter from an
injected `random.Random`, so schedules are tested without sockets or sleeps, and a
wall-clock jump at NTP sync changes nothing.

- A message that fails temporarily backs off on its own (`retry_delay`), as Postfix's
  qmgr does between minimal_backoff_time and maximal_backoff_time.
- A failure to reach or use the smarthost at all is the uplink's fault, not the
  messages': the relay backs off *as a whole* (`Uplink`), and no message is charged.
- A session that breaks during a message is the uplink's fault too, until that message
  has broken sessions while others went through between the breaks (`Breaks`).
- After an outage, a fleet that lost the same uplink would come back in step: each
  device waits a random [0, smtp.return_jitter] before its session (`Uplink.jitter`).
- A "slow down" reply pauses the relay for `throttle_delay`, growing while they go on.
"""

from __future__ import annotations

import random
from collections.abc import Hashable
from enum import Enum

FIRST_PROBE = 2.0
# While the smarthost cannot be reached at all, a TCP connect every TCP_PROBE_EVERY
# (jittered down by up to 10 %) notices its return within seconds whatever the outage's
# length. A full session (TLS, AUTH) is opened only once a probe connects. A probe waits
# TCP_PROBE_TIMEOUT, less than the kernel's first SYN retransmission (1 s): one SYN,
# 60 bytes, where packets are dropped; a SYN and a RST, 100 bytes, where refused: under
# 50 KB an hour either way. Every TCP_PROBE_SLOW_EVERY-th probe waits longer (a SYN and
# one retransmission) so that a link whose round trip is over a second still gets in.
TCP_PROBE_EVERY = 9.0
TCP_PROBE_TIMEOUT = 0.9
TCP_PROBE_SLOW_TIMEOUT = 3.0
TCP_PROBE_SLOW_EVERY = 6
# A message during which sessions broke this often, while other messages went through
# between those breaks, is taken for the cause (a poison message): it is charged and
# backed off like any temporary failure. Until then a broken session is the uplink's
# fault, and the message goes back due now, uncharged.
POISON_BREAKS = 3
# Bounds the memory of breaks: at worst a poison message is recognised later.
MAX_REMEMBERED = 10_000
# The same permanent refusal (code and enhanced status) for this many different messages
# in a row, nothing accepted between them, is the account's or the smarthost's problem,
# not theirs: the relay pauses instead of dead-lettering the queue one by one. Replies
# about the message itself (an address, its size, its content) never count.
SAME_REFUSALS = 3
# After a "slow down" reply (421, 451 4.7.x, a rate text) the relay pauses this long,
# doubling while the replies go on, up to smtp.throttle_max: a per-minute window (the
# usual unit of a smarthost's rate limit) passes within the first two pauses.
THROTTLE_FIRST = 30.0


def retry_delay(attempts: int, lo: float, hi: float, rng: random.Random) -> float:
    """Delay before attempt `attempts + 1`: lo·2^(attempts-1), capped at hi, minus ≤20% jitter.

    Jitter spreads retries of messages that failed together (a 4xx burst) so they
    do not come back as one burst.
    """
    base = min(hi, lo * 2.0 ** max(0, attempts - 1))
    return base * rng.uniform(0.8, 1.0)


def probe_delay(failures: int, cap: float, rng: random.Random) -> float:
    """Delay before the next session attempt after `failures` in a row: doubling from
    FIRST_PROBE, capped at `cap`, minus ≤10% jitter (a fleet that lost the same uplink
    does not come back in step)."""
    base = min(cap, FIRST_PROBE * 2.0 ** max(0, failures - 1))
    return base * rng.uniform(0.9, 1.0)


def throttle_delay(times: int, cap: float) -> float:
    """The pause after the `times`-th "slow down" in a row: THROTTLE_FIRST doubling,
    never more than `cap` (nor the first pause more than `cap`)."""
    return min(cap, THROTTLE_FIRST * 2.0 ** max(0, min(times, 64) - 1))


class Uplink:
    """Whether the smarthost is usable, and when to try it next.

    `probe_at`: no session is opened before it (0: now). `tcp_probe_at`: the next TCP
    connect probe while the path is down (inf: none). Times are monotonic.
    """

    def __init__(self, probe_max: float, rng: random.Random, return_jitter: float = 0.0) -> None:
        self.probe_max = probe_max
        self.rng = rng
        # smtp.return_jitter: devices that lost the same uplink see it return at the same
        # moment; each waits a random [0, return_jitter] before its session, so that a
        # shared smarthost sees them spread out rather than as one burst of logins.
        self.return_jitter = return_jitter
        self.failures = 0  # session attempts failed in a row
        self.down_since: float | None = None
        self.probe_at = 0.0
        self.tcp_probe_at = float("inf")
        self.tcp_probes = 0
        self.held = False  # the account was refused: only time or `flush` ends the wait

    @property
    def next_probe(self) -> float:
        return min(self.probe_at, self.tcp_probe_at)

    def holding(self, now: float) -> bool:
        """No session may be tried yet: wait, or TCP-probe when `tcp_probe_due`."""
        return self.probe_at > now

    def tcp_probe_due(self, now: float) -> bool:
        return self.tcp_probe_at <= now

    def flush(self) -> None:
        """An operator asked for a retry now (`mailgw flush`): no jitter, no TCP probe."""
        self.probe_at = 0.0

    def jitter(self) -> float:
        """The random wait before a session after an outage, in [0, return_jitter]."""
        return self.rng.uniform(0.0, self.return_jitter) if self.return_jitter > 0 else 0.0

    def nudge(self) -> bool:
        """The network may be back (a link or route change, the broker reconnected):
        probe now rather than when scheduled. False when the uplink is not down, or
        when the account was refused (a new route does not fix a password)."""
        if self.down_since is None or self.held:
            return False
        self.tcp_probe_at = 0.0
        return True

    def up(self, now: float) -> float | None:
        """A session opened. How long the uplink was down, or None if it was not."""
        outage = None if self.down_since is None else now - self.down_since
        self.down_since = None
        self.failures = 0
        self.held = False
        self.tcp_probe_at = float("inf")
        return outage

    def down(self, unreachable: bool, now: float) -> float:
        """A session could not be opened (or was given up); seconds to the next probe."""
        self.failures += 1
        self.held = False
        delay = probe_delay(self.failures, self.probe_max, self.rng)
        if unreachable:
            # The path is down: cheap TCP probes tell when it is back (a session's first
            # step is the same connect, so a session could tell no more).
            self.probe_at = float("inf")
            self.tcp_probe_at = now + (FIRST_PROBE if self.down_since is None else delay)
            self.tcp_probe_at = min(self.tcp_probe_at, now + TCP_PROBE_EVERY)
        else:
            # The smarthost answered and refused (TLS, AUTH, a reply): only a session
            # tells when that changes, so sessions back off.
            self.probe_at = now + delay + self.jitter()
            self.tcp_probe_at = float("inf")
        if self.down_since is None:
            self.down_since = now
        return self.next_probe - now

    def hold(self, delay: float, now: float) -> float:
        """The smarthost refused the account, not the path (a refused login, an account
        or quota reply): no session before `delay` has passed, whatever the failures so
        far. Jitter only lengthens it: a login retried sooner than smtp.auth_retry could
        take the account over its lockout threshold. `flush` ends the hold at once."""
        self.failures += 1
        self.held = True
        self.probe_at = now + delay * self.rng.uniform(1.0, 1.05)
        self.tcp_probe_at = float("inf")
        if self.down_since is None:
            self.down_since = now
        return self.probe_at - now

    def tcp_probe_timeout(self) -> float:
        """How long the next TCP probe may take to connect."""
        if (self.tcp_probes + 1) % TCP_PROBE_SLOW_EVERY == 0:
            return TCP_PROBE_SLOW_TIMEOUT
        return TCP_PROBE_TIMEOUT

    def tcp_probed(self, connected: bool, now: float) -> None:
        """A TCP probe connected (open a session now) or did not (probe again later)."""
        self.tcp_probes += 1
        if connected:
            self.probe_at = now + self.jitter()
            self.tcp_probe_at = float("inf")
        else:
            self.tcp_probe_at = now + TCP_PROBE_EVERY * self.rng.uniform(0.9, 1.0)


class Blame(Enum):
    UPLINK = "uplink"  # queue it again, due now and uncharged; carry on
    UPLINK_DOWN = "uplink down"  # the same, and back off as a whole
    MESSAGE = "message"  # a poison message: charge it and back it off


class Breaks:
    """Per message, the relay's count of sent mails at each session that broke during it."""

    def __init__(self) -> None:
        self._at: dict[Hashable, list[int]] = {}

    def broke(self, key: Hashable, sent: int) -> tuple[Blame, int]:
        """A session broke during message `key` after `sent` mails in all: whose fault,
        and how many breaks that message has seen."""
        if len(self._at) > MAX_REMEMBERED:
            self._at.clear()
        breaks = self._at.setdefault(key, [])
        breaks.append(sent)
        count = len(breaks)
        if count < POISON_BREAKS:
            return Blame.UPLINK, count
        if breaks[-1] > breaks[0]:  # others went through between its breaks
            del self._at[key]
            return Blame.MESSAGE, count
        # The same message, again and again, nothing else sent: the uplink (or the
        # smarthost) is in trouble, not this message.
        return Blame.UPLINK_DOWN, count

    def settled(self, key: Hashable) -> None:
        """The message got an answer (or was charged): forget its breaks."""
        self._at.pop(key, None)


class Streak:
    """Different messages in a row refused with the same permanent reply."""

    def __init__(self) -> None:
        self.reply: str | None = None
        self.messages: set[Hashable] = set()

    def refused(self, reply: str, key: Hashable) -> int:
        """Message `key` was refused with `reply`: how many different messages in a row."""
        if reply != self.reply:
            self.reply, self.messages = reply, set()
        self.messages.add(key)
        return len(self.messages)

    def broken(self) -> None:
        """Anything else happened (a message accepted, another reply): start again."""
        self.reply, self.messages = None, set()
