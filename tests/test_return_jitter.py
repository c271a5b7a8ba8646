"""smtp.return_jitter: after an outage the first session waits a random [0, jitter],
so a fleet that lost the same uplink does not return in one burst; `mailgw flush` skips
it. The schedule as values (an injected Random), then once against a real smarthost."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from hypothesis import given
from hypothesis import strategies as st

from gateway.uplink import FIRST_PROBE, Uplink
from tests.parts import Gateway, Pki, SmtpServer, alert, smtp_conf, wait_for


class Extreme(random.Random):
    """Every jitter at its upper bound; the other draws as a seeded Random makes them."""

    def uniform(self, a: float, b: float) -> float:
        return b if a == 0.0 else super().uniform(a, b)


def test_the_session_after_a_tcp_probe_connects_waits_the_jitter() -> None:
    up = Uplink(60.0, Extreme(1), return_jitter=30.0)
    up.down(unreachable=True, now=0.0)
    up.tcp_probed(True, now=FIRST_PROBE)
    assert up.probe_at == FIRST_PROBE + 30.0
    assert up.holding(FIRST_PROBE + 29.9) and not up.holding(FIRST_PROBE + 30.0)


def test_flush_skips_the_jitter() -> None:
    up = Uplink(60.0, Extreme(1), return_jitter=30.0)
    up.down(unreachable=True, now=0.0)
    up.tcp_probed(True, now=2.0)
    up.flush()
    assert not up.holding(2.0)


def test_session_probes_are_jittered_too() -> None:
    up = Uplink(60.0, Extreme(1), return_jitter=30.0)
    delay = up.down(unreachable=False, now=0.0)  # it answered and refused: sessions
    assert FIRST_PROBE * 0.9 + 30.0 <= delay <= FIRST_PROBE + 30.0


def test_zero_disables_it_and_draws_nothing() -> None:
    a, b = random.Random(5), random.Random(5)
    up = Uplink(60.0, a, return_jitter=0.0)
    up.down(unreachable=True, now=0.0)
    up.tcp_probed(True, now=2.0)
    assert up.probe_at == 2.0 and not up.holding(2.0)
    b.uniform(0, 1)  # down()'s probe_delay
    assert a.random() == b.random()  # the same sequence: no draw for the jitter


@given(st.floats(0.0, 3600.0), st.integers(0, 2**32), st.floats(0.0, 1e6))
def test_the_jitter_stays_within_its_bounds(jitter: float, seed: int, now: float) -> None:
    up = Uplink(60.0, random.Random(seed), return_jitter=jitter)
    up.down(unreachable=True, now=now)
    up.tcp_probed(True, now=now)
    assert now <= up.probe_at <= now + jitter


def test_a_real_return_is_delayed_within_bounds(
    pki: Pki, make_gateway: Callable[..., Gateway]
) -> None:
    server = SmtpServer(pki, "starttls")  # not started: the smarthost is down
    gw = make_gateway(smtp_conf(server, pki, extra='return_jitter = "3s"\n'))
    gw.relay.uplink.rng = Extreme(1)  # the jitter at its bound: exactly 3 s
    gw.add(alert("back after the outage"))
    wait_for(lambda: gw.runtime.uplink == "down", what="uplink down")
    server.start()
    started = server.connections  # aiosmtpd's controller connects once to check it runs
    try:
        wait_for(lambda: server.connections > started, timeout=15, what="a TCP probe")
        probed = time.monotonic()
        (got,) = server.wait_for(1, timeout=15)
        assert 2.5 <= got.at - probed <= 3.0 + 1.5  # the probe was seen a little late
    finally:
        server.stop()


def test_flush_returns_at_once_whatever_the_jitter(
    pki: Pki, make_gateway: Callable[..., Gateway]
) -> None:
    server = SmtpServer(pki, "starttls")
    gw = make_gateway(smtp_conf(server, pki, extra='return_jitter = "1h"\n'))
    gw.relay.uplink.rng = Extreme(1)
    gw.add(alert("back after the outage"))
    wait_for(lambda: gw.runtime.uplink == "down", what="uplink down")
    server.start()
    started = server.connections  # aiosmtpd's controller connects once to check it runs
    try:
        wait_for(lambda: server.connections > started, timeout=15, what="a TCP probe")
        t0 = time.monotonic()
        gw.flush()  # the operator asked now
        (got,) = server.wait_for(1, timeout=10)
        assert got.at - t0 < 3.0
    finally:
        server.stop()
