"""Regression tests for the review of parallel sessions and failover: the relay's
bookkeeping, tested without sockets where the defect allows it."""

from __future__ import annotations

import asyncio
import time
import types

from gateway.relay import Relay


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
