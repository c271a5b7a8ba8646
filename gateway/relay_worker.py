"""One SMTP session of the relay: claim rows, send them, record each outcome.

The relay runs as many workers as its smarthosts allow sessions (smtp.sessions). The
lead (worker 0) does what the relay does alone: it probes smarthosts that are down and
waits as a whole when none can be used. The others join only while the lead's claims
find a backlog and a session to the smarthost in use works, so an idle gateway holds
one session, and a smarthost that is down sees one login, not `sessions` of them.

Every worker claims its own rows, highest priority first, a few at a time: a critical
alert that comes in is the next row any of them claims. Each records its outcomes as
the server answers (invariant 11) and a row becomes `sent` only after the 2xx to its
DATA (invariant 2), on whichever session sent it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Protocol

from gateway.clock import Stamp
from gateway.config import Config, SmtpSection
from gateway.ledger import DISK_RETRY, Ledger, Shutdown
from gateway.outbox import Claimed, Outcome, State
from gateway.outbox.queue import HOLD_AFTER
from gateway.outbox.writer import Writer
from gateway.runtime import Runtime
from gateway.smarthost import Host
from gateway.smtp import AuthRefused, SmtpSession, UplinkDown

log = logging.getLogger(__name__)

_FREEZE = os.environ.get("MAILGW_TEST_FREEZE_RELAY")
IDLE_POLL = 2.0  # also picks up rows another process (`mailgw send`) added
IDLE_QUIT = 5.0  # close an idle session after this long
# Rows one of several sessions claims at a time: each claim is one commit, so this many
# mails share its fsync, and another session waits at most this many for a new row.
PARALLEL_CLAIM = 10
CROWDED_PAUSE = 1.0  # after the smarthost turned a session away while ours work


def raise_if_cancelling() -> None:
    """aiosmtplib can turn a cancellation into an SMTP error when the two race (the
    connection closes as we are cancelled); a swallowed cancel would hang SIGTERM."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class Relay(Protocol):
    """What a worker needs of the relay (gateway.relay.Relay, which imports this)."""

    config: Config
    smtp: SmtpSection
    writer: Writer
    runtime: Runtime
    helo: str
    backlog: bool
    shutdown: Shutdown

    def wake(self) -> None: ...
    def pick(self, now: float) -> Host | None: ...
    async def probe(self, now: float, using: Host | None) -> bool: ...
    def next_try(self, now: float) -> float: ...
    def claimed(self, count: int, limit: int) -> None: ...
    def failed(self, host: Host, exc: UplinkDown, waiting: int) -> None: ...
    def log_pacing(self, host: Host, wait: float) -> None: ...
    async def _deliver(self, item: Claimed, now: Stamp, worker: Worker) -> Outcome: ...


class Crowded(Exception):
    """The smarthost refused one more session while ours to it work: not down."""


class Worker:
    def __init__(self, relay: Relay, index: int) -> None:
        self.relay = relay
        self.index = index
        self.lead = index == 0
        self.session: SmtpSession | None = None
        self.host: Host | None = None  # the smarthost `session` is open to
        self.ledger = Ledger(relay.writer, relay.runtime, relay.shutdown)
        self.heartbeat = time.monotonic()
        self.last_used = 0.0
        self.trouble: UplinkDown | None = None  # a broken session blamed on the uplink
        self._backlog = False  # the last claim found work: a wait for a token is pacing
        self.event = asyncio.Event()

    async def run(self) -> None:
        try:
            while True:
                await self.cycle()
        finally:
            if self.session is not None:
                await asyncio.shield(self.close_session())

    async def sleep(self, seconds: float) -> None:
        # The event is cleared at the start of each cycle, not here: a wake that came
        # during the cycle (a critical alert stored meanwhile) ends this sleep at once.
        self.heartbeat = time.monotonic()
        deadline = time.monotonic() + max(0.0, seconds)
        # Wake at least every 5 s so the watchdog sees a live relay while idle.
        while (left := deadline - time.monotonic()) > 0:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
            # cancellation that races with the event, and SIGTERM would be lost.
            try:
                async with asyncio.timeout(min(left, 5.0)):
                    await self.event.wait()
                return
            except TimeoutError:
                self.heartbeat = time.monotonic()

    async def cycle(self) -> None:
        raise_if_cancelling()
        self.event.clear()  # before the claim: what wakes us after it is not lost
        if _FREEZE and Path(_FREEZE).exists():
            await asyncio.Event().wait()  # test hook: a relay stuck forever, loop alive
        relay = self.relay
        now = time.monotonic()
        self.heartbeat = now
        if self.ledger.unrecorded and not await self.ledger.retry_unrecorded():
            await self.sleep(DISK_RETRY)
            return
        host = relay.pick(now)
        if self.lead:
            if await relay.probe(now, host):
                return
            if host is None:  # every smarthost is held: the relay waits as a whole
                if self.session is not None:
                    await self.close_session()
                await self.sleep(relay.next_try(now) - now)
                return
        elif host is None or not self._may_help(host, now):
            # A session to another smarthost (the fallback, while the primary is tried
            # again) is kept until one of ours to `host` works: a retry of the primary
            # that fails must not close the sessions that send meanwhile.
            if self.session is not None and (
                host is None
                or now - self.last_used > IDLE_QUIT
                or (host is not self.host and host.open > 0)
            ):
                await self.close_session()
            await self.sleep(IDLE_POLL if self.session is None else IDLE_QUIT)
            return
        if self.session is None and 0 < host.allowed(now) <= host.open:
            # Ours to it take every session it allows now: knocking would be turned away.
            await self.sleep(IDLE_POLL)
            return
        # A helper logs in before it claims: rows it claimed and could not send (the
        # smarthost turned it away) would wait while other sessions are free.
        helper_out = not self.lead and (self.session is None or self.host is not host)
        if helper_out and not await self._open_first(host):
            return
        await self._claim_and_send(host, now)

    async def _open_first(self, host: Host) -> bool:
        try:
            await self.open_session(host)
        except Crowded:
            await asyncio.sleep(CROWDED_PAUSE)  # logged by the host
            return False
        except UplinkDown as exc:
            self.relay.failed(host, exc, 0)
            return False
        return True

    def _may_help(self, host: Host, now: float) -> bool:
        """A helper sends while the claims find a backlog, a session of ours to `host`
        works (it is up), and the host allows this many sessions."""
        return self.relay.backlog and host.open > 0 and self.index < host.allowed(now)

    async def _claim_and_send(self, host: Host, now: float) -> None:
        relay = self.relay
        allowed = host.allowed(now)
        limit = relay.smtp.batch
        if allowed > 1:
            # Small claims, so that the sessions share even a short queue and a critical
            # alert that comes in is claimed within a few mails by whichever is free.
            limit = max(1, min(limit // allowed, PARALLEL_CLAIM))
        if host.pace is not None:
            if (wait := host.pace.wait(now)) > 0:
                await self._pace_wait(host, wait)
                return
            # No more rows than tokens: what waits stays in the outbox, in priority
            # order, so a critical alert that comes in meanwhile is sent next. Each
            # token is taken right before its send (deliver_batch), after the login.
            limit = max(1, min(limit, int(host.pace.tokens(now))))
        batch = await self.ledger.claim(limit)
        self._backlog = bool(batch)
        relay.claimed(len(batch or ()), limit)
        if batch is None:
            await self.sleep(DISK_RETRY)
            return
        if not batch:
            if self.session is not None and now - self.last_used > IDLE_QUIT:
                await self.close_session()
            await self.sleep(IDLE_POLL if self.session is None else IDLE_QUIT)
            return
        await self.deliver_batch(batch, host)

    async def deliver_batch(self, batch: list[Claimed], host: Host) -> None:
        # Each outcome goes to the ledger as the server answers (invariant 11).
        relay = self.relay
        pending = list(batch)
        cancelled = crowded = False
        in_flight: Claimed | None = None
        failure: Exception | None = None
        try:
            now_stamp = Stamp.now()
            while pending:
                item = pending[0]
                self.heartbeat = time.monotonic()
                expired = self.ledger.expired(item, now_stamp, relay.config.outbox.max_age)
                if expired is not None:
                    self.ledger.record([expired])
                    pending.pop(0)
                    continue
                if relay.pick(time.monotonic()) is not host:
                    break  # held meanwhile, or the primary is back: the rest waits
                if self.session is None or not self.session.usable or self.host is not host:
                    await self.open_session(host)
                if host.pace is not None and not host.pace.try_take(time.monotonic()):
                    break  # another session spent the token: the rest waits, in order
                in_flight = item
                self.ledger.record([await relay._deliver(item, now_stamp, self)])
                in_flight = None
                pending.pop(0)
                if self.trouble is not None:
                    trouble, self.trouble = self.trouble, None
                    await self.close_session()
                    raise trouble
                raise_if_cancelling()
        except Crowded:
            # Logged by the host; the rows wait for a session that works. A pause, so
            # that a worker the smarthost turns away does not knock again at once.
            crowded = True
        except UplinkDown as exc:
            relay.failed(host, exc, len(pending))
        except asyncio.CancelledError:
            cancelled = True
            raise
        except Exception as exc:
            failure = exc  # the relay ends with it (and the daemon, restarted by systemd)
            raise
        finally:
            # Not sent yet: back to the queue, uncharged and due now. The one in flight
            # when the relay failed unexpectedly gets a crash counted, as a start counts
            # it after a kill: a message that fails the relay every time is held aside
            # (gateway/outbox/queue.py), never claimed into a loop.
            crashed = in_flight if failure is not None else None
            if crashed is not None:
                log.error(
                    "the relay failed while alert %s (route %s) was in flight (%s: %s); "
                    "counted against it: one that does so %d times in a row is held aside",
                    crashed.alert.id,
                    crashed.route or "-",
                    type(failure).__name__,
                    failure,
                    HOLD_AFTER,
                )
            self.ledger.record(
                [
                    Outcome(
                        c.key,
                        State.QUEUED,
                        due=0.0,
                        count_attempt=False,
                        crashed=c is crashed,
                        error=f"the relay failed with it in flight: {failure!r}"
                        if c is crashed
                        else None,
                    )
                    for c in pending
                ]
            )
            if cancelled:
                self.ledger.settle_at_shutdown()
            else:
                await self.ledger.settle()
        if crowded:
            await asyncio.sleep(CROWDED_PAUSE)

    async def _pace_wait(self, host: Host, wait: float) -> None:
        """No token yet (smtp.rate_limit): wait for one, or for new work to claim."""
        info = host.pace_info
        if self._backlog:
            self._backlog = False
            info["waits"] += 1
            self.relay.log_pacing(host, wait)
        if self.session is not None and wait > IDLE_QUIT:
            await self.close_session()  # not held open idle between slow sends
        info["next_send_at"] = time.time() + wait
        await self.sleep(wait)
        info["next_send_at"] = None

    async def open_session(self, host: Host) -> None:
        """Open a session to `host`. One of ours to another smarthost that still works
        is closed only once this one is open: should `host` (the primary, tried again)
        fail, it goes on sending."""
        if self.session is not None and (self.host is host or not self.session.usable):
            await self.close_session(polite=False)
        session = SmtpSession(host.cfg, self.relay.helo, host.tokens)
        if host.tokens is not None:
            host.tokens.failing = None  # set again if this session's token request fails
        try:
            await session.open()  # raises UplinkDown
        except UplinkDown as exc:
            if host.open > 0 and not isinstance(exc, AuthRefused):
                # Ours to it work: it allows no more sessions (a 421 "too many
                # connections", a refused connect), it is not down.
                host.crowded(time.monotonic(), str(exc))
                raise Crowded(str(exc)) from exc
            raise
        if self.session is not None:
            await self.close_session()  # to another smarthost: back to this one
        self.session, self.host = session, host
        host.opened()
        host.waits.opened(session.where)
        if self.relay.backlog:
            self.relay.wake()  # a session to it works: the helpers may join now

    async def close_session(self, polite: bool = True) -> None:
        session, self.session = self.session, None
        host, self.host = self.host, None
        if session is not None:
            if host is not None:
                host.closed()
            await session.close(polite)
