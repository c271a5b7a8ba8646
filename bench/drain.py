"""Drain benchmark: how long until every alert of a 20,000-alert backlog (1 % critical)
is in an inbox at 30 mails/min, with and without the drain plan (smtp.drain_within).

Eleven hours cannot be run for real, so time is scaled, and the output says how:
- model: the real outbox (20,000 alerts stored, the real fold), drained by the real
  claim/finish queue paced by the real token bucket (gateway.pace) on a fake clock;
  a mail's own transaction time is taken as nil (at 30/min it is 2 s of every token's
  gap). Minutes are the fake clock's.
- real: the drain plan's case through the real relay (STARTTLS + AUTH) to aiosmtpd,
  with the rate scaled 60 times ("30/s" standing for "30/min"), so one real second is
  one scaled minute. Its ceiling is the model's time: the ratio says what the session,
  the composition of 40 digests and the machine cost on top of the bucket's gaps.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

from bench.common import row
from gateway.alert import Draft, Severity, normalize
from gateway.config import parse
from gateway.lab import SmtpServer, make_pki
from gateway.outbox import Outbox, Outcome, Routed, State
from gateway.outbox.drain_fold import fold
from gateway.outbox.writer import Writer
from gateway.pace import Bucket
from gateway.relay import Relay
from gateway.routing import Router
from gateway.runtime import Runtime

N = 20_000
CRITICAL_EVERY = 100
RATE = (30, 60.0)
WITHIN = 1800.0


def _fill(path: Path) -> Outbox:
    ob = Outbox(path, max_messages=10**6, allow_volatile=True)
    batch = []
    for i in range(N):
        sev = Severity.CRITICAL if i % CRITICAL_EVERY == 0 else Severity.WARNING
        sensor = f"cold{i % 40}"
        a = normalize(
            f"room {i % 40} at {i % 9} C".encode(), Draft(f"alerts/{sensor}", "mqtt", sensor, sev)
        )
        batch.append(Routed(a, (("ops", int(sev)),)))
    for i in range(0, N, 2000):
        ob.add(batch[i : i + 2000])
    return ob


def _fold(ob: Outbox, rate: tuple[int, float], within: float) -> tuple[float, int]:
    t0 = time.perf_counter()
    done = fold(ob, rate=rate, within=within, routes={"ops"}, device_id="bench", rate_text="30/min")
    assert done is not None
    return time.perf_counter() - t0, sum(done.plan.digests.values())


def model(tmp: Path, plan: bool) -> dict[str, float]:
    """Drain the real queue on a fake clock at 30/min: minutes until the last critical
    and the last alert are in an inbox, mails sent, the fold's wall time."""
    ob = _fill(tmp / f"model-{plan}.db")
    fold_s = 0.0
    if plan:
        fold_s, _ = _fold(ob, RATE, WITHIN)
    clock = 0.0
    bucket = Bucket(*RATE, clock)
    mails = alerts = 0
    last_critical = 0.0
    while True:
        clock += bucket.wait(clock)
        got = ob.claim(1, now=1e12)
        if not got:
            break
        bucket.take(clock)
        [c] = got
        mails += 1
        alerts += 1 + len(c.members) - (c.kind == "digest" and c.alert.source == "gateway")
        if c.alert.severity == Severity.CRITICAL and c.kind == "mail":
            last_critical = clock
        ob.finish([Outcome(c.key, State.SENT)], relaxed=True)
    ob.close()
    assert alerts == N, alerts
    return {"minutes": clock / 60, "critical": last_critical / 60, "mails": mails, "fold": fold_s}


def real(tmp: Path) -> tuple[float, int]:
    """The drain plan through the real relay at "30/s" (30/min × 60): real seconds
    until every mail is at the smarthost, and the mails."""
    pki = make_pki(tmp / "pki")
    pw = tmp / "pw"
    pw.write_text("s3cret\n")
    pw.chmod(0o600)
    with SmtpServer(pki, "starttls") as server:
        count = [0]

        def counted(item: Any) -> None:  # count, keep nothing: memory stays flat
            count[0] += 1

        server.record = counted  # type: ignore[method-assign]
        cfg = parse(
            f'[gateway]\ndevice_id = "bench"\nstate_dir = "{tmp}/state"\n'
            f'runtime_dir = "{tmp}/run"\n[outbox]\nallow_volatile = true\n'
            f'[smtp]\nhost = "127.0.0.1"\nport = {server.port}\nfrom = "gw@example.com"\n'
            f'username = "gw@example.com"\npassword_file = "{pw}"\n'
            f'ca_file = "{pki.ca_file}"\nrate_limit = "30/s"\nreturn_jitter = "0s"\n'
            '[[route]]\nname = "ops"\nmatch = "#"\nto = ["ops@example.com"]\n'
        )
        ob = _fill(cfg.outbox_path)
        _, digests = _fold(ob, (30, 1.0), WITHIN / 60)
        mails = N // CRITICAL_EVERY + digests
        writer = Writer(ob)
        writer.start()
        relay = Relay(cfg, writer, Router(cfg.routes), Runtime())

        async def go() -> float:
            task = asyncio.create_task(relay.run())
            t0 = time.perf_counter()
            while count[0] < mails:
                await asyncio.sleep(0.01)
            elapsed = time.perf_counter() - t0
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
            return elapsed

        seconds = asyncio.run(go())
        writer.stop()
        ob.close()
    return seconds, mails


def run() -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        without = model(tmp, plan=False)
        with_plan = model(tmp, plan=True)
        seconds, mails = real(tmp)
    goal = "the whole picture within minutes"
    return [
        row("drain 20k @30/min, no plan (model)", without["minutes"], "min", goal="11 h today"),
        row("  criticals all in, no plan (model)", without["critical"], "min"),
        row("drain 20k @30/min, drain plan (model)", with_plan["minutes"], "min", goal=goal),
        row("  criticals all in, drain plan (model)", with_plan["critical"], "min"),
        row("  mails sent, no plan", without["mails"], "mails"),
        row("  mails sent with the plan", with_plan["mails"], "mails"),
        row(
            "drain 20k, plan, real relay 30/s (x60)",
            seconds,
            "scaled min",
            ceiling=with_plan["minutes"],
            ceiling_name="the bucket's time (model)",
            goal=f"ratio ~1 ({mails} mails)",
        ),
        row("the fold of 20k rows (writer held)", with_plan["fold"] * 1000, "ms", goal="< 1 s"),
    ]


if __name__ == "__main__":
    from bench.common import table

    print(table(run()))
