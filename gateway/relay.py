"""The relay: outbox rows → mail at the smarthost, under invariants 2, 3 and 4.

Queue discipline after Postfix's qmgr:
- A message that fails temporarily (4xx, a dropped or stalled session) is
  deferred with exponential backoff and jitter between smtp.min_backoff and
  smtp.max_backoff; a 5xx is permanent and dead-letters it with the reply kept;
  outbox.max_age dead-letters it as expired. Nothing is silently dropped.
- A failure to reach or use the smarthost at all (DNS, connect, TLS, AUTH) is
  the uplink's fault, not the messages': the relay backs off *as a whole*,
  probing with capped exponential backoff, and the waiting messages are neither
  charged an attempt nor delayed. When a probe succeeds the backlog drains at
  full speed in priority order over one reused session.
- A row becomes `sent` only after the 2xx reply to the end of DATA (invariant 2).
Scheduling uses time.monotonic(): a wall-clock jump at NTP sync changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import sqlite3
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import aiosmtplib

from gateway.clock import Stamp
from gateway.compose import compose, compose_digest
from gateway.config import Config
from gateway.outbox import Claimed, Outbox, Outcome
from gateway.routing import Router
from gateway.smtp import CONNECTION_ERRORS, SmtpSession, UplinkDown, describe
from gateway.status import Runtime
from gateway.writer import Writer

log = logging.getLogger(__name__)

_FREEZE = os.environ.get("MAILGW_TEST_FREEZE_RELAY")
IDLE_POLL = 2.0  # also picks up rows another process (`mailgw send`) added
IDLE_QUIT = 5.0  # close an idle session after this long
FIRST_PROBE = 2.0


# --- pure policy -------------------------------------------------------------------


def retry_delay(attempts: int, lo: float, hi: float, rng: random.Random) -> float:
    """Delay before attempt `attempts + 1`: lo·2^(attempts-1), capped at hi, minus ≤20% jitter.

    Jitter spreads retries of messages that failed together (a 4xx burst) so they
    do not come back as one burst.
    """
    base = min(hi, lo * 2.0 ** max(0, attempts - 1))
    return base * rng.uniform(0.8, 1.0)


def probe_delay(failures: int, cap: float, rng: random.Random) -> float:
    base = min(cap, FIRST_PROBE * 2.0 ** max(0, failures - 1))
    return base * rng.uniform(0.9, 1.0)


@dataclass(frozen=True, slots=True)
class Verdict:
    state: str  # sent | queued | dead
    error: str | None = None
    rcpts: tuple[str, ...] | None = None  # queued: only these are left
    reconnect: bool = False  # the session is unusable after this


def _code_class(code: int) -> str:
    return "temporary" if 400 <= code < 500 else "permanent"


def judge_refusals(
    refused: dict[str, tuple[int, str]], recipients: tuple[str, ...], data_accepted: bool
) -> Verdict:
    """Classify per-recipient outcomes (RFC 5321 §4.2.5, §3.3 RCPT replies)."""
    temp = tuple(r for r in recipients if r in refused and 400 <= refused[r][0] < 500)
    perm = [f"{r}: {c} {m}" for r, (c, m) in refused.items() if not 400 <= c < 500]
    notes = "; ".join([f"{r}: {refused[r][0]} {refused[r][1]}" for r in temp] + perm) or None
    if temp:
        return Verdict("queued", error=notes, rcpts=temp)
    if data_accepted:
        return Verdict("sent", error=f"rejected recipients: {notes}" if notes else None)
    return Verdict("dead", error=notes)


def judge_exception(exc: BaseException, recipients: tuple[str, ...]) -> Verdict:
    """A failed send_message → what to do with the message."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        refused = {e.recipient: (e.code, e.message) for e in exc.recipients}
        return judge_refusals(refused, recipients, data_accepted=False)
    if isinstance(exc, aiosmtplib.SMTPResponseException) and not isinstance(
        exc, aiosmtplib.SMTPServerDisconnected
    ):
        text = f"{exc.code} {exc.message}".strip()
        if 400 <= exc.code < 500:
            # 421 means the server is closing the session too.
            return Verdict("queued", error=text, reconnect=exc.code == 421)
        if exc.code >= 500:
            return Verdict("dead", error=text)
        return Verdict("queued", error=f"unexpected reply {text}", reconnect=True)
    if isinstance(exc, CONNECTION_ERRORS):
        # The session broke during this message (dropped mid-DATA, or stalled past the
        # timeout). Whether the server kept the message is unknown: retry with the same
        # Message-ID, so a duplicate is identifiable. It counts as an attempt, so a
        # message that itself crashes the server cannot monopolise the relay.
        return Verdict(
            "queued", error=f"session failed during delivery: {describe(exc)}", reconnect=True
        )
    return Verdict("queued", error=f"unexpected error: {describe(exc)}", reconnect=True)


# --- the worker ------------------------------------------------------------------------


def _raise_if_cancelling() -> None:
    """aiosmtplib can turn a cancellation into an SMTP error when the two race (the
    connection closes as we are cancelled); a swallowed cancel would hang SIGTERM."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


DISK_RETRY = 5.0


def _disk_full(exc: sqlite3.OperationalError) -> bool:
    return "full" in str(exc).lower()


def _claim(limit: int, ob: Outbox) -> list[Claimed]:
    return ob.claim(limit)


def _finish(outcomes: list[Outcome], ob: Outbox) -> None:
    ob.finish(outcomes)


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
        self.uplink_failures = 0
        self.down_since: float | None = None
        self.probe_at = 0.0
        self.last_used = 0.0
        self.sent = 0
        # Outcomes the outbox could not record (its disk was full): recorded first thing
        # once it can. Until then those rows stay `sending`, so nothing claims them twice.
        self._unrecorded: list[Outcome] = []
        self._disk_trouble = False
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
        self.probe_at = 0.0
        self.wake()

    def reload(self, config: Config, router: Router) -> None:
        self.config = config
        self.router = router

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
        if self._unrecorded:
            if not await self._record(self._unrecorded):
                await self._sleep(DISK_RETRY)
                return
            self._unrecorded = []
        if self.probe_at > now:
            await self._sleep(self.probe_at - now)
            return
        try:
            batch = await self.writer.run(partial(_claim, self.smtp.batch))
        except sqlite3.OperationalError as exc:
            if not _disk_full(exc):
                raise
            self._outbox_trouble(exc)
            await self._sleep(DISK_RETRY)
            return
        self._outbox_recovered()
        if not batch:
            if self.session is not None and now - self.last_used > IDLE_QUIT:
                await self._close_session()
            await self._sleep(IDLE_POLL if self.session is None else IDLE_QUIT)
            return
        await self._deliver_batch(batch)

    async def _deliver_batch(self, batch: list[Claimed]) -> None:
        outcomes: list[Outcome] = []
        pending = list(batch)
        cancelled = False
        try:
            now_stamp = Stamp.now()
            while pending:
                item = pending[0]
                self.heartbeat = time.monotonic()
                expired = self._expired(item, now_stamp)
                if expired is not None:
                    outcomes.append(expired)
                    pending.pop(0)
                    continue
                if self.session is None or not self.session.usable:
                    await self._open_session()
                outcomes.append(await self._deliver(item, now_stamp))
                pending.pop(0)
                _raise_if_cancelling()
        except UplinkDown as exc:
            self._uplink_down(exc, len(pending))
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            # Not sent yet: back to the queue, uncharged and due now.
            outcomes += [Outcome(c.key, "queued", due=0.0, count_attempt=False) for c in pending]
            if cancelled:
                # Shutting down: record what was sent before we go. If that fails, those
                # rows are `sending` and go out again, same Message-ID, after the restart.
                try:
                    self.writer.call(partial(_finish, outcomes)).result(10)
                except Exception as exc:
                    log.error("could not record %d delivery outcomes: %s", len(outcomes), exc)
            elif not await self._record(outcomes):
                self._unrecorded = outcomes

    async def _record(self, outcomes: list[Outcome]) -> bool:
        """Write outcomes to the outbox; False (and logged) when its disk is full."""
        try:
            await self.writer.run(partial(_finish, outcomes))
        except sqlite3.OperationalError as exc:
            if not _disk_full(exc):
                raise
            self._outbox_trouble(exc)
            return False
        self._outbox_recovered()
        return True

    def _outbox_trouble(self, exc: Exception) -> None:
        self.runtime.error(f"outbox: {exc}")
        if not self._disk_trouble:
            self._disk_trouble = True
            log.error(
                "the relay cannot write to the outbox (%s): free space on the disk holding "
                "it; retrying every %.0f s, mails already sent may be sent again",
                exc,
                DISK_RETRY,
            )

    def _outbox_recovered(self) -> None:
        if self._disk_trouble:
            self._disk_trouble = False
            log.warning("the relay can write to the outbox again")

    def _expired(self, item: Claimed, now: Stamp) -> Outcome | None:
        received, _ = item.alert.received.corrected(now)
        age = now.wall - received
        if age <= self.config.outbox.max_age:
            return None
        self.runtime.attempts["expired"] += 1
        log.warning(
            "alert %s expired undelivered after %.1f days; dead-lettered (see `mailgw queue dead`)",
            item.alert.id,
            age / 86400,
        )
        return Outcome(
            item.key,
            "dead",
            error=f"expired: undelivered after {age / 86400:.1f} days (outbox.max_age)",
            count_attempt=False,
        )

    async def _open_session(self) -> None:
        session = SmtpSession(self.smtp, self.helo)
        await session.open()  # raises UplinkDown
        self.session = session
        if self.down_since is not None:
            log.warning(
                "the smarthost %s is reachable again after %.0f s; draining the queue",
                session.where,
                time.monotonic() - self.down_since,
            )
        self.down_since = None
        self.uplink_failures = 0
        self.runtime.uplink = "up"
        self.runtime.next_probe_at = None

    async def _close_session(self, polite: bool = True) -> None:
        session, self.session = self.session, None
        if session is not None:
            await session.close(polite)

    def _uplink_down(self, exc: UplinkDown, waiting: int) -> None:
        self.session = None
        self.uplink_failures += 1
        delay = probe_delay(self.uplink_failures, self.smtp.probe_max, self.rng)
        self.probe_at = time.monotonic() + delay
        self.runtime.uplink = "down"
        self.runtime.next_probe_at = time.time() + delay
        self.runtime.error(str(exc))
        self.runtime.attempts["uplink_down"] += 1
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.error(
                "cannot deliver: %s; %d messages wait, none is charged an attempt; "
                "probing again in %.0f s (`mailgw flush` probes now)",
                exc,
                waiting,
                delay,
            )
        else:
            log.debug("probe %d failed: %s; next in %.0f s", self.uplink_failures, exc, delay)

    async def _deliver(self, item: Claimed, now: Stamp) -> Outcome:
        assert self.session is not None
        route = self.router.by_name.get(item.route)
        if route is None:
            return Outcome(
                item.key,
                "dead",
                count_attempt=False,
                error=(
                    f"route {item.route!r} is no longer in the configuration; restore it and run "
                    "`mailgw queue retry ID`"
                ),
            )
        if item.kind == "digest":
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
        try:
            refused_raw, _reply = await self.session.send(
                composed.data, composed.sender, composed.recipients
            )
        except Exception as exc:
            verdict = judge_exception(exc, composed.recipients)
        else:
            refused = {r: (resp.code, resp.message) for r, resp in refused_raw.items()}
            verdict = judge_refusals(refused, composed.recipients, data_accepted=True)
        self.last_used = time.monotonic()
        if verdict.reconnect:
            await self._close_session(polite=False)
        return self._outcome(item, verdict)

    def _outcome(self, item: Claimed, v: Verdict) -> Outcome:
        self.runtime.attempts[v.state if v.state != "queued" else "deferred"] += 1
        if v.state == "sent":
            self.sent += 1
            self.runtime.last_success = time.time()
            if v.error:
                log.warning("alert %s delivered, but %s", item.alert.id, v.error)
            return Outcome(item.key, "sent", error=v.error)
        if v.state == "dead":
            self.runtime.error(f"dead-lettered {item.alert.id}: {v.error}")
            log.error(
                "alert %s dead-lettered: the smarthost refused it permanently: %s",
                item.alert.id,
                v.error,
            )
            return Outcome(item.key, "dead", error=v.error)
        delay = retry_delay(
            item.attempts + 1, self.smtp.min_backoff, self.smtp.max_backoff, self.rng
        )
        self.runtime.error(f"deferred {item.alert.id}: {v.error}")
        log.warning("alert %s deferred for %.0f s: %s", item.alert.id, delay, v.error)
        return Outcome(
            item.key, "queued", due=time.monotonic() + delay, error=v.error, rcpts=v.rcpts
        )
