"""The relay's waits, as the journal, status and metrics tell them (invariants 4 and 12).

`gateway.uplink` decides when to try the smarthost again; this room carries that out and
says it: a smarthost that cannot be reached (`down`: TCP probes, then a session), a
refused login (`auth_failed`: one login per smtp.auth_retry, never more, so that a wrong
password cannot lock the account), an account refused while sending (`paused`: auth
required, send-as denied, a quota, the same 5xx again and again), a smarthost that asked
to slow down (`throttled`: 30 s, doubling to smtp.throttle_max while it goes on). In
every case the queue is kept whole and no message is charged; `mailgw flush` or a reload
tries at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from gateway.config import SmtpSection
from gateway.replies import AUTH, QUOTA, THROTTLE
from gateway.runtime import Runtime
from gateway.smtp import AuthRefused, UplinkDown, reachable
from gateway.uplink import SAME_REFUSALS, Uplink, throttle_delay

log = logging.getLogger(__name__)

# What the relay says when the account, not a message, was refused.
_PAUSED = {
    AUTH: "the smarthost requires authentication for this account (set smtp.username and "
    "the password, or [smtp.oauth])",
    "account": "the smarthost refused this account or its sender (may it send as smtp.from?)",
    QUOTA: "the account's sending quota is used up (one message tries again every "
    "smtp.quota_retry)",
    THROTTLE: "the smarthost asked the gateway to slow down (smtp.rate_limit may keep it "
    "under the account's limit)",
    "repeated": f"the smarthost refused {SAME_REFUSALS} different messages in a row with the "
    "same reply (an account or server problem, not theirs)",
}


class AccountRefused(UplinkDown):
    """The smarthost refused the account, not a message: the relay pauses for `delay`."""

    def __init__(self, text: str, delay: float, state: str = "paused") -> None:
        super().__init__(text)
        self.delay = delay
        self.state = state  # paused | throttled, as status shows it
        self.again = False  # the pause in force already covers it: no new hold


class Waits:
    def __init__(
        self,
        uplink: Uplink,
        runtime: Runtime,
        smtp: SmtpSection,
        status: dict[str, Any] | None = None,
        publish: Callable[[], None] | None = None,
    ) -> None:
        self.uplink = uplink
        self.runtime = runtime
        self.smtp = smtp
        self.throttles = 0  # "slow down" pauses since a mail was last accepted
        # When the current "slow down" pause ends: replies to the mails that were in
        # flight on other sessions when it began are the same episode, not a new one.
        self.throttle_end = 0.0
        self.clock: Callable[[], float] = time.monotonic
        # This smarthost's line in status (gateway.smarthost), and how the relay's
        # overall state is made from every smarthost's (Runtime.sum_hosts).
        self.status: dict[str, Any] = status if status is not None else {}
        self._publish = publish or self._alone
        self.many = publish is not None  # one of several smarthosts

    def _alone(self) -> None:
        self.runtime.uplink = self.status.get("state", "unknown")
        self.runtime.relay_hold = self.status.get("hold")
        self.runtime.next_probe_at = self.status.get("next_probe_at")

    def _set(self, error: str | None = None, **values: Any) -> None:
        self.status.update(values)
        if error is not None:
            self.runtime.error(error)
            self.status["last_error"] = error
        self._publish()

    def refusal(self, kind: str, error: str | None) -> AccountRefused:
        """What to raise once the message's outcome is recorded: pause the relay."""
        if kind == THROTTLE:
            now = self.clock()
            if now < self.throttle_end:
                # Another session's mail, in flight when the pause began: the same
                # episode, so the pause neither grows nor starts again.
                refused = AccountRefused(
                    f"{_PAUSED[kind]}: {error}", self.throttle_end - now, "throttled"
                )
                refused.again = True
                return refused
            self.throttles += 1
            delay = throttle_delay(self.throttles, self.smtp.throttle_max)
            self.throttle_end = now + delay
            return AccountRefused(f"{_PAUSED[kind]}: {error}", delay, "throttled")
        delay = self.smtp.quota_retry if kind == QUOTA else self.smtp.auth_retry
        return AccountRefused(f"{_PAUSED[kind]}: {error}", delay)

    def accepted(self) -> None:
        """A mail went through: the next "slow down" starts the backoff afresh."""
        self.throttles = 0

    def opened(self, where: str) -> None:
        """A session opened (and logged in): whatever the relay waited for is over."""
        outage = self.uplink.up(time.monotonic())
        state = self.status.get("state")
        if state == "auth_failed":
            log.warning("%s accepted the login again; draining the queue", where)
        elif state in ("paused", "throttled"):
            log.info("the relay's pause is over; trying %s again", where)
        elif outage is not None:
            log.warning(
                "the smarthost %s is reachable again after %.0f s; draining the queue",
                where,
                outage,
            )
        self._set(state="up", hold=None, next_probe_at=None)

    async def tcp_probe(self) -> None:
        timeout = self.uplink.tcp_probe_timeout()
        connected = await reachable(self.smtp.host, self.smtp.port, timeout)
        self.uplink.tcp_probed(connected, time.monotonic())
        if connected:
            wait = max(0.0, self.uplink.probe_at - time.monotonic())
            if wait < 1:
                log.info(
                    "the smarthost %s:%d accepts connections again; opening a session",
                    self.smtp.host,
                    self.smtp.port,
                )
                return
            log.info(
                "the smarthost %s:%d accepts connections again; opening a session in %.0f s "
                "(smtp.return_jitter spreads a fleet's return; `mailgw flush` sends now)",
                self.smtp.host,
                self.smtp.port,
                wait,
            )
            self._set(next_probe_at=time.time() + wait)
            return
        self._set(next_probe_at=time.time() + max(0.0, self.uplink.next_probe - time.monotonic()))

    def failed(self, exc: UplinkDown, waiting: int) -> None:
        """No session could be opened, or the account was refused during one."""
        if isinstance(exc, AuthRefused):
            # One refused login per smtp.auth_retry, never a probe a minute: a wrong
            # password must not walk the account into a lockout.
            self._hold("auth_failed", str(exc), self.smtp.auth_retry, waiting)
            return
        if isinstance(exc, AccountRefused):
            if exc.again and self.uplink.holding(time.monotonic()):
                log.debug("%s: %s (the pause in force covers it)", self.smtp.where, exc)
                return
            self._hold(exc.state, str(exc), exc.delay, waiting)
            return
        first = self.uplink.down_since is None
        delay = self.uplink.down(exc.unreachable, time.monotonic())
        self._set(state="down", next_probe_at=time.time() + delay, error=str(exc))
        self.runtime.attempts["uplink_down"] += 1
        if first and self.many:
            # One of several smarthosts: the relay says whether another takes over.
            log.warning(
                "smarthost %s cannot be used: %s; none of the %d waiting messages is "
                "charged; probing it again in %.0f s",
                self.smtp.where,
                exc,
                waiting,
                delay,
            )
        elif first:
            log.error(
                "cannot deliver: %s; %d messages wait, none is charged an attempt; "
                "probing again in %.0f s (`mailgw flush` probes now)",
                exc,
                waiting,
                delay,
            )
        else:
            log.debug("probe %d failed: %s; next in %.0f s", self.uplink.failures, exc, delay)

    def _hold(self, state: str, reason: str, delay: float, waiting: int) -> None:
        """`state` auth_failed, paused or throttled: no session for `delay` (jittered
        longer). A throttle is the smarthost's normal flow control: a warning, not an error."""
        first = self.status.get("state") != state and state != "throttled"
        delay = self.uplink.hold(delay, time.monotonic())
        self._set(state=state, hold=reason, next_probe_at=time.time() + delay, error=reason)
        self.runtime.attempts[state] += 1
        log.log(
            logging.ERROR if first else logging.WARNING,
            "relay %s: %s; %d messages wait, none is charged an attempt; next try in %.0f s "
            "(`mailgw flush` or `systemctl reload mailgw` tries now)",
            {"paused": "paused", "throttled": "throttled"}.get(state, "stopped"),
            reason,
            waiting,
            delay,
        )
