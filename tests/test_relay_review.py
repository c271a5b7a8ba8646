"""Regression tests for the review of parallel sessions and failover: the relay's
bookkeeping, tested without sockets where the defect allows it."""

from __future__ import annotations

import asyncio
import random
import time
import types
from typing import Any

import aiosmtplib

from gateway.config import SmtpSection
from gateway.ledger import Ledger, Shutdown
from gateway.outbox import Outcome, State
from gateway.relay import Relay
from gateway.relay_worker import Crowded, Worker
from gateway.replies import THROTTLE
from gateway.runtime import Runtime
from gateway.smtp import AuthRefused, SmtpSession, UplinkDown
from gateway.uplink import Uplink
from gateway.waits import Waits


class _Held:
    def holding(self, now: float) -> bool:
        return True

    def tcp_probe_due(self, now: float) -> bool:
        return True


class _Probe:
    async def tcp_probe(self) -> None:
        await asyncio.sleep(0.01)


def test_the_leads_tcp_probe_does_not_vouch_for_a_hung_helper() -> None:
    async def main() -> tuple[float, float]:
        relay = Relay.__new__(Relay)
        primary = types.SimpleNamespace(uplink=_Held(), waits=_Probe())
        relay.hosts = [primary, types.SimpleNamespace()]  # type: ignore[list-item]
        lead = types.SimpleNamespace(heartbeat=time.monotonic() - 3)
        hung = types.SimpleNamespace(heartbeat=time.monotonic() - 1000)
        relay.workers = [lead, hung]  # type: ignore[list-item]
        assert await relay.probe(time.monotonic(), relay.hosts[1])
        return time.monotonic() - relay.heartbeat, time.monotonic() - lead.heartbeat

    relay_age, lead_age = asyncio.run(main())
    assert relay_age >= 999  # the oldest worker's heartbeat still counts
    assert lead_age < 1  # the prober's own round is fresh


def _smtp_section(**kw: Any) -> SmtpSection:
    return SmtpSection(
        host="127.0.0.1", port=2525, tls="starttls", sender="gw@example.com", username="gw", **kw
    )


def test_a_4xx_to_auth_is_temporary_not_a_refused_login() -> None:
    """ "454 4.7.0 Too many login attempts": backed off like a smarthost that answers
    but fails, never held for smtp.auth_retry (15 min) as a wrong password is."""
    cfg = _smtp_section()
    session = SmtpSession(cfg)
    temp = session._down(
        aiosmtplib.SMTPAuthenticationError(454, "4.7.0 Too many login attempts"), True
    )
    assert not isinstance(temp, AuthRefused) and not temp.unreachable
    wrong = session._down(aiosmtplib.SMTPAuthenticationError(535, "5.7.8 bad credentials"), True)
    assert isinstance(wrong, AuthRefused)
    waits = Waits(Uplink(60.0, random.Random(1)), Runtime(), cfg)
    waits.failed(temp, 5)
    assert not waits.uplink.held and waits.status["state"] == "down"
    assert waits.uplink.probe_at - time.monotonic() < 10  # FIRST_PROBE, not auth_retry


def test_one_slow_down_seen_by_every_session_in_flight_pauses_once() -> None:
    """Four sessions each get the 421 for the mail they had in flight: one episode, one
    30 s pause, not 30 -> 60 -> 120 -> 240 s."""
    uplink = Uplink(60.0, random.Random(1))
    waits = Waits(uplink, Runtime(), _smtp_section(throttle_max=3600.0), {})
    refusals = [waits.refusal(THROTTLE, "421 4.7.0 slow down") for _ in range(4)]
    assert all(r.delay <= 30.0 for r in refusals)
    for r in refusals:
        waits.failed(r, 10)
    assert uplink.probe_at - time.monotonic() <= 30.0 * 1.05
    assert waits.runtime.attempts["throttled"] == 1
    # After the pause, a new "slow down" is a new episode: it doubles.
    waits.clock = lambda: time.monotonic() + 40
    assert waits.refusal(THROTTLE, "421 4.7.0 slow down").delay == 60.0


def test_a_socket_that_connects_but_greets_421_or_nothing_is_reached() -> None:
    """Not `unreachable`: a TCP probe would always succeed, and sessions would be tried
    every 9-39 s for ever instead of backing off to probe_max."""

    async def main() -> list[bool]:
        async def refuse(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(b"421 4.7.0 too many connections\r\n")
            await w.drain()
            w.close()

        async def mute(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await r.read()  # until the client gives up
            w.close()

        out = []
        for handler in (refuse, mute):
            server = await asyncio.start_server(handler, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            cfg = SmtpSection(host="127.0.0.1", port=port, tls="none", sender="a@b.c", timeout=0.5)
            try:
                await SmtpSession(cfg, "x").open()
            except UplinkDown as exc:
                out.append(exc.unreachable)
            server.close()
        return out

    assert asyncio.run(main()) == [False, False]


def _worker(lead: bool = False) -> Worker:
    host = types.SimpleNamespace(open=1, pace=None, allowed=lambda now: 4)
    relay = types.SimpleNamespace(
        writer=None,
        runtime=Runtime(),
        backlog=True,
        shutdown=Shutdown(),
        smtp=types.SimpleNamespace(batch=10),
        pick=lambda now: host,
        claimed=lambda count, limit: None,
        failed=lambda host, exc, waiting: None,
    )
    return Worker(relay, 0 if lead else 1)  # type: ignore[arg-type]


def test_a_wake_during_the_cycle_ends_the_sleep_after_it() -> None:
    """A critical alert stored while a worker claimed: its wake is not lost."""

    async def main() -> float:
        w = _worker()
        w.event.set()  # came in during the cycle
        t0 = time.monotonic()
        await w.sleep(10)
        return time.monotonic() - t0

    assert asyncio.run(main()) < 1


def test_a_helper_turned_away_claims_nothing() -> None:
    """A helper logs in before it claims: turned away, it holds no rows."""
    claims: list[int] = []

    async def main() -> None:
        w = _worker()

        async def crowded(host: object) -> None:
            raise Crowded("421 too many connections")

        async def claim(limit: int) -> list[object]:
            claims.append(limit)
            return []

        w.open_session = crowded  # type: ignore[method-assign]
        w.ledger.claim = claim  # type: ignore[method-assign]
        await w.cycle()

    asyncio.run(main())
    assert claims == []


def test_cancelled_sessions_share_one_shutdown_deadline() -> None:
    """Four sessions cancelled at SIGTERM with outcomes the writer never confirms: they
    wait SHUTDOWN_WAIT in all, not SHUTDOWN_WAIT each."""
    import concurrent.futures

    shutdown = Shutdown(wait=0.5)
    ledgers = []
    for _ in range(4):
        writer = types.SimpleNamespace(record=lambda o: concurrent.futures.Future())
        ledger = Ledger(writer, Runtime(), shutdown)  # type: ignore[arg-type]
        ledger.record([Outcome(1, State.QUEUED, due=0.0, count_attempt=False)])
        ledgers.append(ledger)
    t0 = time.monotonic()
    for ledger in ledgers:
        ledger.settle_at_shutdown()
    assert time.monotonic() - t0 < 1.0  # 2 s with a wait each
