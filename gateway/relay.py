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
import concurrent.futures
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
from gateway.smtp import CONNECTION_ERRORS, SmtpSession, UplinkDown, describe, reachable
from gateway.status import Runtime
from gateway.writer import Writer

log = logging.getLogger(__name__)

_FREEZE = os.environ.get("MAILGW_TEST_FREEZE_RELAY")
IDLE_POLL = 2.0  # also picks up rows another process (`mailgw send`) added
IDLE_QUIT = 5.0  # close an idle session after this long
FIRST_PROBE = 2.0
# While the smarthost cannot be reached at all, a TCP connect every TCP_PROBE_EVERY
# (jittered down by up to 10 %) notices its return: ~120 bytes a probe when packets are
# dropped, ~100 when refused: under 50 KB an hour, and the uplink's return is seen
# within seconds whatever the outage's length. A full session (TLS, AUTH) is opened
# only once a probe connects, or every smtp.probe_max at the latest.
TCP_PROBE_EVERY = 9.0
TCP_PROBE_TIMEOUT = 3.0
# A message during which sessions broke this often, while other messages went through
# between those breaks, is taken for the cause (a poison message): it is charged and
# backed off like any temporary failure. Until then a broken session is the uplink's
# fault, and the message goes back due now, uncharged.
POISON_BREAKS = 3


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
    broke: bool = False  # the session itself failed during this message


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
        # Message-ID, so a duplicate is identifiable. The relay decides whether the
        # uplink or the message is to blame (Relay._broken).
        return Verdict(
            "queued",
            error=f"session failed during delivery: {describe(exc)}",
            reconnect=True,
            broke=True,
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
        self.probe_at = 0.0  # next full session attempt while down (monotonic)
        self.tcp_probe_at = float("inf")  # next TCP connect probe while unreachable
        self.tcp_probes = 0
        # Per message: self.sent at each session that broke during it (see POISON_BREAKS).
        self._breaks: dict[tuple[int, str], list[int]] = {}
        self._trouble: UplinkDown | None = None  # a broken session blamed on the uplink
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

    def nudge(self) -> None:
        """Something says the network may be back (a link or route change, the MQTT
        broker reconnected): probe now rather than at the next scheduled probe."""
        if self.down_since is not None:
            self.tcp_probe_at = 0.0
            self.wake()

    def nudge_threadsafe(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.nudge)

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
            if self.tcp_probe_at <= now:
                await self._tcp_probe()
            else:
                await self._sleep(min(self.probe_at, self.tcp_probe_at) - now)
            return
        try:
            batch = await self.writer.run(partial(_claim, self.smtp.batch))
        except sqlite3.Error as exc:
            # Full, locked, an I/O error: waited out, never the end of the relay.
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
        # Each outcome is handed to the writer as the server answers (it rides the next
        # group commit), not after the batch: a crash resends the mail in flight, not
        # the batch's mails already accepted.
        recorded: list[tuple[list[Outcome], concurrent.futures.Future[None]]] = []

        def record(outcomes: list[Outcome]) -> None:
            if outcomes:
                recorded.append((outcomes, self.writer.record(outcomes)))

        pending = list(batch)
        cancelled = False
        try:
            now_stamp = Stamp.now()
            while pending:
                item = pending[0]
                self.heartbeat = time.monotonic()
                expired = self._expired(item, now_stamp)
                if expired is not None:
                    record([expired])
                    pending.pop(0)
                    continue
                if self.session is None or not self.session.usable:
                    await self._open_session()
                record([await self._deliver(item, now_stamp)])
                pending.pop(0)
                if self._trouble is not None:
                    trouble, self._trouble = self._trouble, None
                    raise trouble
                _raise_if_cancelling()
        except UplinkDown as exc:
            self._uplink_down(exc, len(pending))
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            # Not sent yet: back to the queue, uncharged and due now.
            record([Outcome(c.key, "queued", due=0.0, count_attempt=False) for c in pending])
            if cancelled:
                # Shutting down: wait for what was sent to be recorded. If that fails,
                # those rows are `sending` and go out again, same Message-ID, after the
                # restart.
                futures = [f for _, f in recorded]
                concurrent.futures.wait(futures, timeout=10)
                for outcomes, f in recorded:
                    if not f.done() or f.exception() is not None:
                        log.error("could not record %d delivery outcomes", len(outcomes))
            else:
                unrecorded = await self._settle(recorded)
                if unrecorded:
                    self._unrecorded = unrecorded

    async def _settle(
        self, recorded: list[tuple[list[Outcome], concurrent.futures.Future[None]]]
    ) -> list[Outcome]:
        """Wait for recorded outcomes; those the outbox could not write (disk full)."""
        failed: list[Outcome] = []
        for outcomes, fut in recorded:
            try:
                await asyncio.wrap_future(fut)
            except sqlite3.Error as exc:
                self._outbox_trouble(exc)
                failed += outcomes
        if not failed:
            self._outbox_recovered()
        return failed

    async def _record(self, outcomes: list[Outcome]) -> bool:
        """Write outcomes to the outbox; False (and logged) when its disk is full."""
        try:
            await self.writer.run(partial(_finish, outcomes))
        except sqlite3.Error as exc:
            self._outbox_trouble(exc)
            return False
        self._outbox_recovered()
        return True

    def _outbox_trouble(self, exc: Exception) -> None:
        self.runtime.error(f"outbox: {exc}")
        if not self._disk_trouble:
            self._disk_trouble = True
            log.error(
                "the relay cannot use the outbox (%s): a full disk, a lock held by another "
                "process or failing storage; retrying every %.0f s, mails already sent may "
                "be sent again (with their Message-ID)",
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
        self.tcp_probe_at = float("inf")
        self.runtime.uplink = "up"
        self.runtime.next_probe_at = None

    async def _close_session(self, polite: bool = True) -> None:
        session, self.session = self.session, None
        if session is not None:
            await session.close(polite)

    async def _tcp_probe(self) -> None:
        self.tcp_probes += 1
        self.heartbeat = time.monotonic()
        if await reachable(self.smtp.host, self.smtp.port, TCP_PROBE_TIMEOUT):
            log.info(
                "the smarthost %s:%d accepts connections again; opening a session",
                self.smtp.host,
                self.smtp.port,
            )
            self.probe_at = 0.0
            self.tcp_probe_at = float("inf")
            return
        self.tcp_probe_at = time.monotonic() + TCP_PROBE_EVERY * self.rng.uniform(0.9, 1.0)
        self._show_next_probe()

    def _show_next_probe(self) -> None:
        at = min(self.probe_at, self.tcp_probe_at)
        self.runtime.next_probe_at = time.time() + max(0.0, at - time.monotonic())

    def _uplink_down(self, exc: UplinkDown, waiting: int) -> None:
        self.session = None
        self.uplink_failures += 1
        delay = probe_delay(self.uplink_failures, self.smtp.probe_max, self.rng)
        now = time.monotonic()
        if exc.unreachable:
            # The path is down: cheap TCP probes tell when it is back; a full session
            # is still tried every probe_max, in case only the probe is blocked.
            self.probe_at = now + self.smtp.probe_max
            self.tcp_probe_at = now + (FIRST_PROBE if self.down_since is None else delay)
            self.tcp_probe_at = min(self.tcp_probe_at, now + TCP_PROBE_EVERY)
        else:
            # The smarthost answered and refused (TLS, AUTH, a reply): only a session
            # tells when that changes, so sessions back off as before.
            self.probe_at = now + delay
            self.tcp_probe_at = float("inf")
        delay = min(self.probe_at, self.tcp_probe_at) - now
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

    def _broken(self, item: Claimed, v: Verdict) -> Outcome | None:
        """A session broke during `item`: the uplink's fault (the message goes back due
        now, uncharged; None if it is the message's). See POISON_BREAKS."""
        if len(self._breaks) > 10_000:
            self._breaks.clear()  # bounded: at worst a poison message is found later
        breaks = self._breaks.setdefault(item.key, [])
        breaks.append(self.sent)
        others_went = breaks[-1] > breaks[0]
        if len(breaks) >= POISON_BREAKS and others_went:
            log.warning(
                "alert %s: %d sessions broke while it was being sent, and other mails went "
                "through meanwhile; it is deferred like any failing message",
                item.alert.id,
                len(breaks),
            )
            return None
        self.runtime.attempts["session_broke"] += 1
        self.runtime.error(f"session broke during {item.alert.id}: {v.error}")
        if len(breaks) >= POISON_BREAKS:
            # The same message, again and again, nothing else sent: the uplink (or the
            # smarthost) is in trouble, not this message. Back off as a whole.
            self._trouble = UplinkDown(
                f"sessions keep breaking ({v.error}); {len(breaks)} times on alert "
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
        return Outcome(item.key, "queued", due=time.monotonic(), error=v.error, count_attempt=False)

    def _outcome(self, item: Claimed, v: Verdict) -> Outcome:
        if v.broke and (uncharged := self._broken(item, v)) is not None:
            return uncharged
        self._breaks.pop(item.key, None)
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
