"""The relay: outbox rows → mail at the smarthost (invariants 2, 3, 4, 11, 12).

Up to smtp.sessions SMTP sessions (`gateway.relay_worker`), each reused while there is
work, to the first smarthost of the failover list that may be used now
(`gateway.smarthost`). The decisions live in rooms of their own, and the relay only
carries them out:
- `gateway.ledger` claims rows and records each outcome as the server answers it;
- `gateway.smtp` is the session, which gives back the server's answer as data;
- `gateway.replies` says what that answer means for the message: sent, queued, dead;
- `gateway.verdicts` makes it the row's outcome, and tells a reply about the account or
  the uplink (a broken session, a "slow down", the same refusal again) from one about
  the message;
- `gateway.uplink` says when to try a smarthost again and how long a deferred message
  waits; `gateway.waits` carries out and reports the waits.

Queue discipline after Postfix's qmgr:
- A message that fails temporarily (4xx) is deferred with exponential backoff and
  jitter between smtp.min_backoff and smtp.max_backoff; a 5xx is permanent and
  dead-letters it with the reply kept; outbox.max_age dead-letters it as expired.
  Nothing is silently dropped. Neither is a reason to change smarthost.
- A failure to reach or use a smarthost at all (DNS, connect, TLS, AUTH), or a reply
  that refuses the account rather than the message (auth required, send-as denied, a
  quota, "slow down", the same 5xx for several messages in a row), is not the
  messages' fault: that smarthost is held on its own backoff or pause, and the next one
  of [[smtp.fallback]] is used at once; the messages are neither charged nor delayed.
  The relay tries the held ones again on their schedules and returns to the first that
  answers. When every smarthost is held, the relay backs off as a whole.
- A smarthost's sending limit is its account's: its rate_limit spaces the transactions
  of all its sessions (`gateway.pace`: claims bounded by the tokens there, each token
  taken right before its send, so priority order holds), and after an outage the
  first session waits a random smtp.return_jitter.
- A row becomes `sent` only after the 2xx reply to the end of DATA (invariant 2).
Scheduling uses time.monotonic(): a wall-clock jump at NTP sync changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import threading
import time

from gateway.clock import Stamp
from gateway.compose import compose, compose_digest
from gateway.config import Config
from gateway.ledger import Shutdown
from gateway.outbox import Claimed, Outcome, State
from gateway.outbox.writer import Writer
from gateway.relay_worker import Worker, raise_if_cancelling
from gateway.replies import Broken, judge
from gateway.routing import Router
from gateway.runtime import Runtime
from gateway.sendmail_compose import compose_raw
from gateway.smarthost import Host
from gateway.smtp import AuthRefused, SmtpSession, UplinkDown, reachable
from gateway.uplink import TCP_PROBE_TIMEOUT, Uplink
from gateway.verdicts import Judge

log = logging.getLogger(__name__)


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
        state_dir = config.gateway.state_dir
        self.hosts = [
            Host(i, cfg, runtime, self.rng, state_dir) for i, cfg in enumerate(self.smtp.hosts)
        ]
        runtime.hosts = [h.status for h in self.hosts]
        if self.hosts[0].pace_info:
            runtime.pace = self.hosts[0].pace_info  # the primary's, as before fallbacks
        # One message is at most ~6 SMTP commands, each bounded by smtp.timeout; a relay
        # that has not come round its loop for longer than that is stuck.
        self.stall_limit = self.smtp.timeout * 6 + 10
        self.judge = Judge(self.smtp, runtime, self.rng)
        self.backlog = False  # the last claim was full: helpers may join
        self.workers: list[Worker] = []
        self.shutdown = Shutdown()  # one deadline at SIGTERM for every session's records
        self._loop: asyncio.AbstractEventLoop | None = None
        self._active: Host | None = None
        # The host name only, for now: getfqdn asks DNS, which may never answer, and
        # this runs on the event loop. run() looks the full name up off the loop.
        self.helo = socket.gethostname()

    # --- what tests, status and the service read ------------------------------------

    @property
    def uplink(self) -> Uplink:
        """The primary smarthost's schedule."""
        return self.hosts[0].uplink

    @property
    def session(self) -> SmtpSession | None:
        """The lead worker's session (None before run())."""
        return self.workers[0].session if self.workers else None

    @property
    def sent(self) -> int:
        return self.judge.sent

    @property
    def heartbeat(self) -> float:
        """When the slowest worker last came round its loop."""
        return min((w.heartbeat for w in self.workers), default=time.monotonic())

    # --- control (from the loop or other threads) --------------------------------

    def wake(self) -> None:
        for w in self.workers:
            w.event.set()

    def wake_threadsafe(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.wake)

    def flush(self) -> None:
        for h in self.hosts:
            h.uplink.flush()
        self.wake()

    def nudge(self) -> None:
        """Something says the network may be back: probe now (see Uplink.nudge)."""
        if any([h.uplink.nudge() for h in self.hosts]):
            self.wake()

    def nudge_threadsafe(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.nudge)

    def reload(self, config: Config, router: Router) -> None:
        self.config = config
        self.router = router
        if any(h.uplink.held for h in self.hosts):
            # The operator may have fixed the password (read at each login) or the
            # account: try now rather than at the end of the hold.
            log.info("reloaded: trying the smarthost now instead of at the end of the hold")
            self.flush()

    def close(self) -> None:
        pass  # the sessions are closed by the workers' finally, inside the loop

    # --- the loop --------------------------------------------------------------

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        if not all(h.cfg.helo_name for h in self.hosts):
            self.helo = await _fqdn(self.helo)
        count = max(h.cfg.sessions for h in self.hosts)
        self.workers = [Worker(self, i) for i in range(count)]
        tasks = [asyncio.create_task(w.run(), name=f"relay-{w.index}") for w in self.workers]
        try:
            # A worker ends only by an error: let it end the relay, as one loop did.
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                t.result()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def pick(self, now: float) -> Host | None:
        """The smarthost to send through now: the first that is not held."""
        chosen = next((h for h in self.hosts if h.usable(now)), None)
        if chosen is not self._active:
            self._switch(chosen)
        return chosen

    def _switch(self, chosen: Host | None) -> None:
        before, self._active = self._active, chosen
        for h in self.hosts:
            h.status["active"] = h is chosen
        if len(self.hosts) == 1 or before is None:
            return
        if chosen is None:
            wait = max(0.0, self.next_try(time.monotonic()) - time.monotonic())
            log.error(
                "no smarthost can be used now: each of the %d is down or held (see `mailgw "
                "status`); the queue waits, no message is charged; next try in %.0f s",
                len(self.hosts),
                wait,
            )
            return
        if chosen.index < before.index:
            log.info("trying %s (%s) again instead of %s", chosen.name, chosen.role, before.name)
        else:
            # Loud when it stops working, quiet when a probe of it fails again.
            log.log(
                logging.WARNING if before.uplink.failures <= 1 else logging.DEBUG,
                "%s (%s) cannot be used now; sending through %s (%s)",
                before.name,
                before.role,
                chosen.name,
                chosen.role,
            )

    def next_try(self, now: float) -> float:
        """When the first held smarthost may be tried (a session or a TCP probe)."""
        return min(h.uplink.next_probe for h in self.hosts)

    async def probe(self, now: float, using: Host | None) -> bool:
        """TCP-probe a smarthost before `using` in the list (all, when None) whose
        probe is due; True if one was made (the lead comes round again)."""
        for h in self.hosts:
            if h is using:
                return False
            if h.uplink.holding(now) and h.uplink.tcp_probe_due(now):
                # Only the lead probes, and only its own round is vouched for: a helper
                # hung meanwhile must still age the relay's heartbeat (the oldest counts).
                if self.workers:
                    self.workers[0].heartbeat = time.monotonic()
                await h.waits.tcp_probe()
                return True
        return False

    def claimed(self, count: int, limit: int) -> None:
        """A worker's claim found `count` rows of `limit`: a full one is a backlog."""
        backlog = count >= limit
        if backlog and not self.backlog:
            self.backlog = True
            self.wake()  # the helpers join
        elif count == 0:
            self.backlog = False

    def failed(self, host: Host, exc: UplinkDown, waiting: int) -> None:
        """A session to `host` could not be opened, or its account was refused."""
        host.waits.failed(exc, waiting)
        token_failed = host.tokens is not None and host.tokens.failing is not None
        if (isinstance(exc, AuthRefused) or token_failed) and host.account is not None:
            # The same username and secret elsewhere: the same account, whose lockout
            # counts every refused login, wherever it was tried; with OAuth2, the same
            # token endpoint, which would fail those sessions the same way (a whole
            # smtp.timeout each, when it stalls). Held together: the next smarthost
            # with another account takes over at once.
            for other in self.hosts:
                if other is not host and other.account == host.account:
                    kind = AuthRefused if isinstance(exc, AuthRefused) else UplinkDown
                    other.waits.failed(
                        kind(f"held with {host.name} (the same account): {exc}"), waiting
                    )
        self.wake()  # the next smarthost, if any, at once

    def log_pacing(self, host: Host, wait: float) -> None:
        log.debug("pacing: next mail to %s in %.1f s (rate_limit)", host.name, wait)

    async def _deliver(self, item: Claimed, now: Stamp, worker: Worker) -> Outcome:
        """Compose one row and send it over `worker`'s session: the row's outcome (what
        to raise once it is recorded goes to worker.trouble). A message that raises
        while it is composed or sent is dead-lettered with the error, and the rest of
        the batch goes on: raised, it would end the daemon and be claimed again at the
        next start, a crash loop."""
        try:
            return await self._deliver_one(item, now, worker)
        except Exception as exc:
            raise_if_cancelling()  # a cancel aiosmtplib turned into an error: not its fault
            if worker.session is not None:
                # Where the session stands after a failure in the middle is unknown.
                await worker.close_session(polite=False)
            error = f"could not be composed or sent: {type(exc).__name__}: {exc}"
            log.error(
                "alert %s (route %s) %s; it is dead-lettered, the other mails go on "
                "(`mailgw queue retry %s` tries it again)",
                item.alert.id,
                item.route or "-",
                error,
                item.alert.id,
                exc_info=True,
            )
            return Outcome(item.key, State.DEAD, count_attempt=False, error=error)

    async def _deliver_one(self, item: Claimed, now: Stamp, worker: Worker) -> Outcome:
        assert worker.session is not None and worker.host is not None
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
        host = worker.host
        result = await worker.session.deliver(composed.data, composed.sender, composed.recipients)
        verdict = judge(result, composed.recipients)
        worker.last_used = time.monotonic()
        if verdict.reconnect:
            await worker.close_session(polite=False)
        outcome, worker.trouble = self.judge.outcome(item, verdict, host.waits)
        if worker.trouble is None and isinstance(result, Broken) and result.timed_out:
            worker.trouble = await self._went_silent(host, verdict.error or result.reason)
        return outcome

    async def _went_silent(self, host: Host, error: str) -> UplinkDown:
        """A session timed out mid-transaction: the server stopped answering. A new
        session to it would wait out smtp.timeout once more (a connect that is never
        answered, or a greeting that never comes) before the fallback is tried, so the
        host is given up at once, the message going back uncharged. A TCP probe, under a
        second, tells which wait follows: TCP probes while it accepts no connection
        (down, or packets dropped), sessions on their backoff while it accepts and says
        nothing."""
        cfg = host.cfg
        accepts = await reachable(cfg.host, cfg.port, TCP_PROBE_TIMEOUT)
        state = "accepts connections" if accepts else "no longer accepts connections"
        return UplinkDown(
            f"{host.name}: {error} (it stopped answering; it {state})", unreachable=not accepts
        )


FQDN_WITHIN = 5.0  # a DNS lookup of our own name that takes longer is given up


async def _fqdn(fallback: str) -> str:
    """socket.getfqdn() in a thread, given up after FQDN_WITHIN (a resolver that never
    answers would otherwise hold the relay's start): `fallback` then. A daemon thread of
    its own, not the loop's pool: one still stuck in the lookup is no reason to wait at
    exit (service._leave waits for the pool's threads)."""
    loop = asyncio.get_running_loop()
    found: asyncio.Future[str] = loop.create_future()

    def settle(name: str) -> None:
        if not found.done():
            found.set_result(name)

    def look_up() -> None:
        name = socket.getfqdn()
        with contextlib.suppress(RuntimeError):  # the loop has closed meanwhile
            loop.call_soon_threadsafe(settle, name)

    threading.Thread(target=look_up, name="fqdn-lookup", daemon=True).start()
    try:
        async with asyncio.timeout(FQDN_WITHIN):
            return await found
    except TimeoutError:
        log.warning(
            "looking up this host's full name took over %.0f s (DNS is not answering); "
            "greeting smarthosts as %s",
            FQDN_WITHIN,
            fallback,
        )
        return fallback
