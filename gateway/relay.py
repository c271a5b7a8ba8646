"""The relay worker: outbox rows → mail at the smarthost (invariants 2, 3, 4, 11, 12).

One task, one SMTP session reused while there is work. The decisions live in rooms of
their own, and this loop only carries them out:
- `gateway.ledger` claims batches and records each outcome as the server answers it;
- `gateway.smtp` is the session, which gives back the server's answer as data;
- `gateway.replies` says what that answer means for the message: sent, queued, dead;
- `gateway.uplink` says when to try the smarthost again, how long a deferred message
  waits, and whether a broken session is the uplink's fault or the message's.

Queue discipline after Postfix's qmgr:
- A message that fails temporarily (4xx) is deferred with exponential backoff and
  jitter between smtp.min_backoff and smtp.max_backoff; a 5xx is permanent and
  dead-letters it with the reply kept; outbox.max_age dead-letters it as expired.
  Nothing is silently dropped.
- A failure to reach or use the smarthost at all (DNS, connect, TLS, AUTH) is the
  uplink's fault, not the messages': the relay backs off *as a whole*, and the waiting
  messages are neither charged an attempt nor delayed. When a probe succeeds the
  backlog drains at full speed in priority order over one reused session.
- A refused login, or a reply that refuses the account rather than the message (auth
  required, send-as denied, a quota, the same 5xx for several messages in a row), stops
  or pauses the relay as a whole (`gateway.waits`): the queue is kept, never
  dead-lettered message after message (invariant 12).
- The smarthost's sending limits are the whole gateway's: smtp.rate_limit spaces the
  transactions (`gateway.pace`, one row claimed per token, so priority order holds), a
  "slow down" reply pauses the relay without charging the message, and after an outage
  the first session waits a random smtp.return_jitter (`Uplink.jitter`).
- A row becomes `sent` only after the 2xx reply to the end of DATA (invariant 2).
Scheduling uses time.monotonic(): a wall-clock jump at NTP sync changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
from pathlib import Path

from gateway.clock import Stamp
from gateway.compose import compose, compose_digest
from gateway.config import Config
from gateway.ledger import DISK_RETRY, Ledger
from gateway.oauth import TokenSource
from gateway.outbox import Claimed, Outcome, State
from gateway.outbox.writer import Writer
from gateway.pace import Bucket, describe
from gateway.replies import THROTTLE, Verdict, judge
from gateway.routing import Router
from gateway.runtime import Runtime
from gateway.sendmail_compose import compose_raw
from gateway.smtp import SmtpSession, UplinkDown
from gateway.uplink import SAME_REFUSALS, Blame, Breaks, Streak, Uplink, retry_delay
from gateway.waits import Waits

log = logging.getLogger(__name__)

_FREEZE = os.environ.get("MAILGW_TEST_FREEZE_RELAY")
IDLE_POLL = 2.0  # also picks up rows another process (`mailgw send`) added
IDLE_QUIT = 5.0  # close an idle session after this long


def _raise_if_cancelling() -> None:
    """aiosmtplib can turn a cancellation into an SMTP error when the two race (the
    connection closes as we are cancelled); a swallowed cancel would hang SIGTERM."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class Relay:
    name = "relay"

    def __init__(
        self,
        config: Config,
        writer: Writer,
        router: Router,
        runtime: Runtime,
        rng: random.Random | None = None,
    ) -> None:
        assert config.smtp is not None
        self.config = config
        self.smtp = config.smtp
        self.writer = writer
        self.router = router
        self.runtime = runtime
        self.rng = rng or random.Random()
        self.session: SmtpSession | None = None
        self.heartbeat = time.monotonic()
        # One message is at most ~6 SMTP commands, each bounded by smtp.timeout; a relay
        # that has not come round its loop for longer than that is stuck.
        self.stall_limit = self.smtp.timeout * 6 + 10
        self.uplink = Uplink(self.smtp.probe_max, self.rng, self.smtp.return_jitter)
        self.waits = Waits(self.uplink, runtime, self.smtp)
        # One token source for every session: a token outlives the session it came for.
        self.tokens = (
            TokenSource(
                self.smtp.oauth,
                self.smtp.timeout,
                cache=config.gateway.state_dir / "oauth-token.json",
            )
            if self.smtp.oauth
            else None
        )
        self.breaks = Breaks()
        # The same message throttled again and again while others went through is the
        # message's problem (a per-message 4xx that reads like a rate): it is charged.
        self.throttles = Breaks()
        self.streak = Streak()
        self._trouble: UplinkDown | None = None  # a broken session blamed on the uplink
        self.last_used = 0.0
        self.sent = 0
        self.ledger = Ledger(writer, runtime)
        # smtp.rate_limit: one token per transaction, for every route (gateway.pace).
        rate = self.smtp.rate_limit
        self.pace = Bucket(*rate, time.monotonic()) if rate else None
        if rate:
            runtime.pace = {"rate_limit": describe(*rate), "waits": 0, "next_send_at": None}
        self._backlog = False  # the last claim found work: a wait for a token is pacing
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.helo = socket.getfqdn()

    # --- control (from the loop or other threads) --------------------------------

    def wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def wake_threadsafe(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.wake)

    def flush(self) -> None:
        self.uplink.flush()
        self.wake()

    def nudge(self) -> None:
        """Something says the network may be back: probe now (see Uplink.nudge)."""
        if self.uplink.nudge():
            self.wake()

    def nudge_threadsafe(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.nudge)

    def reload(self, config: Config, router: Router) -> None:
        self.config = config
        self.router = router
        if self.uplink.held:
            # The operator may have fixed the password (read at each login) or the
            # account: try now rather than at the end of the hold.
            log.info("reloaded: trying the smarthost now instead of at the end of the hold")
            self.flush()

    def close(self) -> None:
        pass  # the session is closed by run()'s finally, inside the loop

    # --- the loop --------------------------------------------------------------

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        try:
            while True:
                await self._cycle()
        finally:
            if self.session is not None:
                await asyncio.shield(self._close_session())

    async def _sleep(self, seconds: float) -> None:
        assert self._wake is not None
        self._wake.clear()
        self.heartbeat = time.monotonic()
        deadline = time.monotonic() + max(0.0, seconds)
        # Wake at least every 5 s so the watchdog sees a live relay while idle.
        while (left := deadline - time.monotonic()) > 0:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
            # cancellation that races with the event, and SIGTERM would be lost.
            try:
                async with asyncio.timeout(min(left, 5.0)):
                    await self._wake.wait()
                return
            except TimeoutError:
                self.heartbeat = time.monotonic()

    async def _cycle(self) -> None:
        _raise_if_cancelling()
        if _FREEZE and Path(_FREEZE).exists():
            await asyncio.Event().wait()  # test hook: a relay stuck forever, loop alive
        now = time.monotonic()
        self.heartbeat = now
        if self.ledger.unrecorded and not await self.ledger.retry_unrecorded():
            await self._sleep(DISK_RETRY)
            return
        if self.uplink.holding(now):
            if self.uplink.tcp_probe_due(now):
                self.heartbeat = time.monotonic()
                await self.waits.tcp_probe()
            else:
                await self._sleep(self.uplink.next_probe - now)
            return
        limit = self.smtp.batch
        if self.pace is not None:
            if (wait := self.pace.wait(now)) > 0:
                await self._pace_wait(wait)
                return
            # No more rows than tokens: what waits stays in the outbox, in priority
            # order, so a critical alert that comes in meanwhile is sent next.
            limit = max(1, min(limit, int(self.pace.tokens(now))))
        batch = await self.ledger.claim(limit)
        self._backlog = bool(batch)
        if batch is None:
            await self._sleep(DISK_RETRY)
            return
        if not batch:
            if self.session is not None and now - self.last_used > IDLE_QUIT:
                await self._close_session()
            await self._sleep(IDLE_POLL if self.session is None else IDLE_QUIT)
            return
        await self._deliver_batch(batch)

    async def _deliver_batch(self, batch: list[Claimed]) -> None:
        # Each outcome goes to the ledger as the server answers (invariant 11).
        pending = list(batch)
        cancelled = False
        try:
            now_stamp = Stamp.now()
            while pending:
                item = pending[0]
                self.heartbeat = time.monotonic()
                expired = self.ledger.expired(item, now_stamp, self.config.outbox.max_age)
                if expired is not None:
                    self.ledger.record([expired])
                    pending.pop(0)
                    continue
                if self.session is None or not self.session.usable:
                    await self._open_session()
                if self.pace is not None:
                    self.pace.take(time.monotonic())
                self.ledger.record([await self._deliver(item, now_stamp)])
                pending.pop(0)
                if self._trouble is not None:
                    trouble, self._trouble = self._trouble, None
                    await self._close_session()
                    raise trouble
                _raise_if_cancelling()
        except UplinkDown as exc:
            self._uplink_down(exc, len(pending))
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            # Not sent yet: back to the queue, uncharged and due now.
            self.ledger.record(
                [Outcome(c.key, State.QUEUED, due=0.0, count_attempt=False) for c in pending]
            )
            if cancelled:
                self.ledger.settle_at_shutdown()
            else:
                await self.ledger.settle()

    async def _pace_wait(self, wait: float) -> None:
        """No token yet (smtp.rate_limit): wait for one, or for new work to claim."""
        assert self.pace is not None
        if self._backlog:
            self._backlog = False
            self.runtime.pace["waits"] += 1
            log.debug("pacing: next mail in %.1f s (smtp.rate_limit)", wait)
        if self.session is not None and wait > IDLE_QUIT:
            await self._close_session()  # not held open idle between slow sends
        self.runtime.pace["next_send_at"] = time.time() + wait
        await self._sleep(wait)
        self.runtime.pace["next_send_at"] = None

    async def _open_session(self) -> None:
        session = SmtpSession(self.smtp, self.helo, self.tokens)
        await session.open()  # raises UplinkDown
        self.session = session
        self.waits.opened(session.where)

    async def _close_session(self, polite: bool = True) -> None:
        session, self.session = self.session, None
        if session is not None:
            await session.close(polite)

    def _uplink_down(self, exc: UplinkDown, waiting: int) -> None:
        self.session = None
        self.waits.failed(exc, waiting)

    async def _deliver(self, item: Claimed, now: Stamp) -> Outcome:
        assert self.session is not None
        raw = (
            await compose_raw(item, self.config, self.router, self.writer)
            if item.kind == "raw"  # stored whole by `sendmail` (gateway/sendmail_compose.py)
            else None
        )
        if isinstance(raw, Outcome):
            return raw
        route = self.router.by_name.get(item.route)
        if raw is not None:
            composed = raw
        elif route is None:
            return Outcome(
                item.key,
                State.DEAD,
                count_attempt=False,
                error=(
                    f"route {item.route!r} is no longer in the configuration; restore it and run "
                    "`mailgw queue retry ID`"
                ),
            )
        elif item.kind == "digest":
            composed = compose_digest(
                (item.alert, *item.members),
                route,
                device_id=self.config.gateway.device_id,
                sender=self.smtp.sender,
                now=now,
                recipients=item.rcpts,
            )
        else:
            composed = compose(
                item.alert,
                route,
                device_id=self.config.gateway.device_id,
                sender=self.smtp.sender,
                now=now,
                recipients=item.rcpts,
                repeats=item.members,
            )
        result = await self.session.deliver(composed.data, composed.sender, composed.recipients)
        verdict = judge(result, composed.recipients)
        self.last_used = time.monotonic()
        if verdict.reconnect:
            await self._close_session(polite=False)
        return self._outcome(item, verdict)

    def _broken(self, item: Claimed, v: Verdict) -> Outcome | None:
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
        if blame is Blame.UPLINK_DOWN:
            self._trouble = UplinkDown(
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
        return Outcome(
            item.key, State.QUEUED, due=time.monotonic(), error=v.error, count_attempt=False
        )

    def _paused(self, item: Claimed, kind: str, error: str | None) -> Outcome:
        """The account was refused while sending `item`: it goes back due now and
        uncharged, and the relay pauses (raised by _deliver_batch once recorded)."""
        self._trouble = self.waits.refusal(kind, error)
        if kind != "repeated":
            # Kept after a "repeated" pause: the same reply once more pauses again at once,
            # instead of dead-lettering SAME_REFUSALS - 1 more messages every pause.
            self.streak.broken()
        # A throttled message goes behind the others of its priority: should the reply
        # be about it after all, the others still go through (see self.throttles).
        due = time.monotonic() if kind == THROTTLE else 0.0
        return Outcome(item.key, State.QUEUED, due=due, error=error, count_attempt=False)

    def _throttled(self, item: Claimed, v: Verdict) -> Outcome | None:
        """A "slow down" reply: pause the relay, uncharged (None: it is the message's)."""
        blame, count = self.throttles.broke(item.key, self.sent)
        if blame is not Blame.MESSAGE:
            return self._paused(item, THROTTLE, v.error)
        log.warning(
            "alert %s: throttled %d times while other mails went through; deferred like "
            "any failing message",
            item.alert.id,
            count,
        )
        return None

    def _outcome(self, item: Claimed, v: Verdict) -> Outcome:
        if v.broke and (uncharged := self._broken(item, v)) is not None:
            return uncharged
        self.breaks.settled(item.key)
        if v.pause == THROTTLE:
            if (uncharged := self._throttled(item, v)) is not None:
                return uncharged
        elif v.pause is not None:
            return self._paused(item, v.pause, v.error)
        else:
            self.throttles.settled(item.key)
        if v.state != "dead" or v.same_as is None:
            self.streak.broken()
        elif self.streak.refused(v.same_as, item.key) >= SAME_REFUSALS:
            return self._paused(item, "repeated", v.error)
        self.runtime.attempts[v.state if v.state != "queued" else "deferred"] += 1
        if v.state == "sent":
            self.sent += 1
            self.waits.accepted()
            self.runtime.last_success = time.time()
            if v.error:
                log.warning("alert %s delivered, but %s", item.alert.id, v.error)
            return Outcome(item.key, State.SENT, error=v.error)
        if v.state == "dead":
            self.runtime.error(f"dead-lettered {item.alert.id}: {v.error}")
            log.error(
                "alert %s dead-lettered: the smarthost refused it permanently: %s",
                item.alert.id,
                v.error,
            )
            return Outcome(item.key, State.DEAD, error=v.error)
        delay = retry_delay(
            item.attempts + 1, self.smtp.min_backoff, self.smtp.max_backoff, self.rng
        )
        self.runtime.error(f"deferred {item.alert.id}: {v.error}")
        log.warning("alert %s deferred for %.0f s: %s", item.alert.id, delay, v.error)
        return Outcome(
            item.key, State.QUEUED, due=time.monotonic() + delay, error=v.error, rcpts=v.rcpts
        )
