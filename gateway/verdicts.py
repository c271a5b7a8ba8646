"""What the relay does with a message once its smarthost answered (invariants 2, 3, 12).

`gateway.replies` says what a reply means for the message (sent, queued, dead, or a
pause); this room turns that into the row's outcome, and says when the reply is the
account's or the uplink's rather than the message's: a broken session (`Breaks`), a
"slow down" (`throttles`), the same refusal for several messages (`Streak`). Those give
back the message uncharged, with the UplinkDown that pauses the smarthost it came from.
Shared by every session of the relay: a poison message is one whichever session sent it.
"""

from __future__ import annotations

import logging
import random
import time

from gateway.config import SmtpSection
from gateway.outbox import Claimed, Outcome, State
from gateway.replies import THROTTLE, Verdict
from gateway.runtime import Runtime
from gateway.smtp import UplinkDown
from gateway.uplink import SAME_REFUSALS, Blame, Breaks, Streak, retry_delay
from gateway.waits import Waits

log = logging.getLogger(__name__)

Judged = tuple[Outcome, UplinkDown | None]


class Judge:
    def __init__(self, smtp: SmtpSection, runtime: Runtime, rng: random.Random) -> None:
        self.smtp = smtp
        self.runtime = runtime
        self.rng = rng
        self.breaks = Breaks()
        # The same message throttled again and again while others went through is the
        # message's problem (a per-message 4xx that reads like a rate): it is charged.
        self.throttles = Breaks()
        self.streak = Streak()
        self.sent = 0

    def outcome(self, item: Claimed, v: Verdict, waits: Waits) -> Judged:
        """The row's outcome, and what to raise once it is recorded (None: carry on)."""
        if v.broke and (uncharged := self._broken(item, v)) is not None:
            return uncharged
        self.breaks.settled(item.key)
        if v.pause == THROTTLE:
            if (uncharged := self._throttled(item, v, waits)) is not None:
                return uncharged
        elif v.pause is not None:
            return self._paused(item, v.pause, v.error, waits)
        else:
            self.throttles.settled(item.key)
        if v.state != "dead" or v.same_as is None:
            self.streak.broken()
        elif self.streak.refused(v.same_as, item.key) >= SAME_REFUSALS:
            return self._paused(item, "repeated", v.error, waits)
        self.runtime.attempts[v.state if v.state != "queued" else "deferred"] += 1
        if v.state == "sent":
            self.sent += 1
            waits.accepted()
            waits.status["sent"] = waits.status.get("sent", 0) + 1
            self.runtime.last_success = time.time()
            if v.error:
                log.warning("alert %s delivered, but %s", item.alert.id, v.error)
            return Outcome(item.key, State.SENT, error=v.error), None
        if v.state == "dead":
            self.runtime.error(f"dead-lettered {item.alert.id}: {v.error}")
            log.error(
                "alert %s dead-lettered: the smarthost refused it permanently: %s",
                item.alert.id,
                v.error,
            )
            return Outcome(item.key, State.DEAD, error=v.error), None
        delay = retry_delay(
            item.attempts + 1, self.smtp.min_backoff, self.smtp.max_backoff, self.rng
        )
        self.runtime.error(f"deferred {item.alert.id}: {v.error}")
        log.warning("alert %s deferred for %.0f s: %s", item.alert.id, delay, v.error)
        due = time.monotonic() + delay
        return Outcome(item.key, State.QUEUED, due=due, error=v.error, rcpts=v.rcpts), None

    def _broken(self, item: Claimed, v: Verdict) -> Judged | None:
        """A session broke during `item`: the uplink's fault (the message goes back due
        now, uncharged; None if it is the message's). See gateway.uplink.Breaks."""
        blame, count = self.breaks.broke(item.key, self.sent)
        if blame is Blame.MESSAGE:
            log.warning(
                "alert %s: %d sessions broke while it was being sent, and other mails went "
                "through meanwhile; it is deferred like any failing message",
                item.alert.id,
                count,
            )
            return None
        self.runtime.attempts["session_broke"] += 1
        self.runtime.error(f"session broke during {item.alert.id}: {v.error}")
        trouble = None
        if blame is Blame.UPLINK_DOWN:
            trouble = UplinkDown(
                f"sessions keep breaking ({v.error}); {count} times on alert "
                f"{item.alert.id} with nothing else sent in between"
            )
        else:
            log.warning(
                "alert %s: %s; queued again at once, not charged (the uplink's fault until "
                "shown otherwise)",
                item.alert.id,
                v.error,
            )
        # Due now, yet behind what was due before it: were it the cause, it must not
        # stand at the head of the queue breaking session after session.
        due = time.monotonic()
        return Outcome(item.key, State.QUEUED, due=due, error=v.error, count_attempt=False), trouble

    def _paused(self, item: Claimed, kind: str, error: str | None, waits: Waits) -> Judged:
        """The account was refused while sending `item`: it goes back due now and
        uncharged, and its smarthost pauses (raised once the outcome is recorded)."""
        trouble = waits.refusal(kind, error)
        if kind != "repeated":
            # Kept after a "repeated" pause: the same reply once more pauses again at once,
            # instead of dead-lettering SAME_REFUSALS - 1 more messages every pause.
            self.streak.broken()
        # A throttled message goes behind the others of its priority: should the reply
        # be about it after all, the others still go through (see self.throttles).
        due = time.monotonic() if kind == THROTTLE else 0.0
        return Outcome(item.key, State.QUEUED, due=due, error=error, count_attempt=False), trouble

    def _throttled(self, item: Claimed, v: Verdict, waits: Waits) -> Judged | None:
        """A "slow down" reply: pause, uncharged (None: it is the message's)."""
        blame, count = self.throttles.broke(item.key, self.sent)
        if blame is not Blame.MESSAGE:
            return self._paused(item, THROTTLE, v.error, waits)
        log.warning(
            "alert %s: throttled %d times while other mails went through; deferred like "
            "any failing message",
            item.alert.id,
            count,
        )
        return None
