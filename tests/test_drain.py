"""The drain plan (#20): the pure planner's properties, the fold in a real outbox (one
transaction, criticals kept, nothing lost), the digest's wording, and smtp.drain_within's
parsing and refusals. The daemon against a rate-limited smarthost: test_drain_daemon.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.alert import Alert, Draft, Severity, new_alert_id, normalize
from gateway.clock import Stamp
from gateway.compose import compose_digest
from gateway.config import ConfigError, Policy, RouteSection, SmtpSection, parse
from gateway.drain import DIGEST_CAP, RouteBacklog, chunks, needed, plan, summary
from gateway.outbox import Claimed, Outbox, Outcome, Routed, raw
from gateway.outbox.drain_fold import Folded, fold, queued_count

W, C, INFO = Severity.WARNING, Severity.CRITICAL, Severity.INFO
RATE = (30, 60.0)  # 30/min
HALF_HOUR = 1800.0

# --- the planner, without I/O ------------------------------------------------------------

backlogs = st.dictionaries(
    st.sampled_from(["ops", "facilities", "fleet", "x"]),
    st.tuples(st.integers(0, 3000), st.integers(0, 30000), st.integers(0, 5)).map(
        # (kept, foldable mails, extra alerts they carry: repeats, storm digest lines)
        lambda t: RouteBacklog(t[0], t[1], t[1] * (1 + t[2] % 2) + (t[2] if t[1] else 0))
    ),
    max_size=4,
)


@settings(max_examples=300, deadline=None)
@given(backlogs, st.sampled_from([(30, 60.0), (1, 1.0), (100, 1.0), (1, 86400.0)]))
def test_a_plan_never_adds_mails_keeps_every_kept_mail_and_folds_every_alert_once(
    backlog: dict[str, RouteBacklog], rate: tuple[int, float]
) -> None:
    p = plan(backlog, rate, HALF_HOUR)
    mails = sum(b.kept + b.foldable for b in backlog.values())
    if p is None:
        return
    assert p.mails == mails and p.seconds > HALF_HOUR
    assert p.mails_after < mails  # never more mails than without a plan; fewer, or no plan
    assert p.kept == sum(b.kept for b in backlog.values())  # criticals are never folded
    for route, n in p.digests.items():
        b = backlog[route]
        assert 0 < n < b.foldable
        assert b.alerts <= n * DIGEST_CAP  # every foldable alert fits a digest
        assert b.alerts > (n - 1) * DIGEST_CAP  # as few digests as the cap allows
    assert p.folded == sum(backlog[r].alerts for r in p.digests)
    unfolded = sum(b.foldable for r, b in backlog.items() if r not in p.digests)
    assert p.mails_after == p.kept + unfolded + sum(p.digests.values())


@given(st.integers(0, 5000), st.integers(1, 50))
def test_chunks_cover_every_alert_once_in_order_near_equal(n: int, parts: int) -> None:
    seqs = list(range(100, 100 + n))
    got = chunks(seqs, parts)
    assert len(got) == parts
    assert [s for c in got for s in c] == seqs
    sizes = [len(c) for c in got]
    assert max(sizes) - min(sizes) <= 1


def test_a_backlog_that_drains_within_the_bound_is_left_alone() -> None:
    # 30/min for 30 min is 900 mails.
    assert not needed(900, RATE, HALF_HOUR) and needed(901, RATE, HALF_HOUR)
    assert plan({"ops": RouteBacklog(0, 900, 900)}, RATE, HALF_HOUR) is None
    # Only criticals: nothing may be folded, so there is no plan.
    assert plan({"ops": RouteBacklog(5000, 0, 0)}, RATE, HALF_HOUR) is None


def test_the_weekend_backlog_of_the_issue() -> None:
    p = plan({"ops": RouteBacklog(212, 18400, 18400)}, RATE, HALF_HOUR)
    assert p is not None
    assert p.digests == {"ops": 37} and p.mails_after == 249
    assert round(p.seconds / 3600) == 10 and p.seconds_after < 9 * 60
    line = summary(p, "30/min", HALF_HOUR)
    assert line.startswith("drain plan: 18,612 queued mails would take 10 h at 30/min")
    assert "18,400 alerts of route ops folded into 37 digests, 212 mails" in line


# --- the fold, in a real outbox -------------------------------------------------------------


def routed(msg: str, sev: Severity = W, route: str = "ops", sensor: str = "temp") -> Routed:
    a = normalize(msg.encode(), Draft(f"alerts/{sensor}", "mqtt", sensor, sev))
    return Routed(a, ((route, int(sev)),))


def states(ob: Outbox) -> dict[str, int]:
    return dict(ob.conn.execute("SELECT state, count(*) FROM delivery GROUP BY state").fetchall())


def do_fold(
    ob: Outbox, routes: tuple[str, ...] = ("ops", "fac"), cap: int = DIGEST_CAP
) -> Folded | None:
    return fold(
        ob,
        rate=RATE,
        within=60.0,  # 30 mails
        routes=routes,
        device_id="gw",
        rate_text="30/min",
        cap=cap,
    )


def claim_all(ob: Outbox) -> list[Claimed]:
    return ob.claim(100_000, now=1e12)


def test_a_short_backlog_is_not_folded(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db")
    ob.add([routed(f"t {i}") for i in range(30)])
    assert do_fold(ob) is None
    assert states(ob) == {"queued": 30}


def test_the_fold_keeps_criticals_and_folds_the_rest_per_route(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db")
    batch = [routed(f"temp {i}", C if i % 10 == 0 else W) for i in range(1200)]
    batch += [routed(f"door {i}", INFO, route="fac", sensor="door") for i in range(300)]
    ob.add(batch)
    live = ob.live
    done = do_fold(ob)
    assert done is not None
    assert done.plan.digests == {"ops": 3, "fac": 1}  # 1,080 → 3 × 360; 300 → 1
    assert done.plan.kept == 120 and done.plan.folded == 1380
    assert ob.live == live + 4  # the digests are new mails; folded rows stay live
    assert queued_count(ob.conn) == 124
    got = claim_all(ob)
    # The criticals first (their own mails, oldest first), then the digests.
    assert [c.alert.severity for c in got[:120]] == [C] * 120
    assert all(c.kind == "mail" and len(c.members) == 0 for c in got[:120])
    digests = got[120:]
    assert [c.kind for c in digests] == ["digest"] * 4
    assert [len(c.members) for c in digests] == [300, 360, 360, 360]  # routes by name
    assert all(c.alert.source == "gateway" and c.alert.sensor == "drain" for c in digests)
    # As old as the newest alert it folds: outbox.max_age expires none of them early.
    assert all(c.alert.received == c.members[-1].received for c in digests)
    assert [c.route for c in digests] == ["fac", "ops", "ops", "ops"]
    # Every alert is in exactly one mail.
    ids = [c.alert.id for c in got[:120]] + [m.id for c in digests for m in c.members]
    assert sorted(ids) == sorted(r.alert.id for r in batch)
    # Sent, a digest takes every alert it folds with it.
    ob.finish([Outcome(c.key, "sent") for c in got])
    assert states(ob) == {"sent": 1500 + 4} and ob.live == 0


def test_claimed_mails_are_not_folded(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db")
    ob.add([routed(f"t {i}") for i in range(100)])
    flying = ob.claim(5, now=1e12)
    done = do_fold(ob)
    assert done is not None and done.plan.folded == 95
    assert states(ob) == {"sending": 5, "queued": 1, "suppressed": 95}
    ob.finish([Outcome(c.key, "sent") for c in flying])
    [digest] = claim_all(ob)
    assert {m.id for m in digest.members}.isdisjoint(c.alert.id for c in flying)


def test_a_sendmail_message_keeps_its_own_mail(tmp_path: Path) -> None:
    """A `raw` delivery is its stored bytes: folded, a digest line would be all of the
    cron mail that ever went out (found by review)."""
    ob = Outbox(tmp_path / "o.db")
    ob.add([routed(f"t {i}") for i in range(100)])
    mail = Alert(
        id=new_alert_id(),
        topic="sendmail/root",
        source="sendmail",
        sensor="root",
        severity=INFO,
        message="cron: backup report",
        received=Stamp.now(),
        fields={},
    )
    body = b"Subject: backup report\n\n" + b"log line\n" * 1000
    assert raw.store(
        ob, mail, raw.RawMessage("f1", 0, "", ("root",), body), raw.RawPlan(("ops",), (), 5)
    )
    done = do_fold(ob)
    assert done is not None and done.plan.folded == 100
    got = claim_all(ob)
    [own] = [c for c in got if c.kind == "raw"]
    assert own.alert.id == mail.id and len(own.members) == 0
    assert all(mail.id not in {m.id for m in c.members} for c in got)


def test_a_second_fold_leaves_the_first_digests_alone(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db")
    ob.add([routed(f"t {i}") for i in range(100)])
    assert do_fold(ob) is not None
    ob.add([routed(f"u {i}") for i in range(100)])
    second = do_fold(ob)
    assert second is not None and second.plan.folded == 100 and second.plan.kept == 1
    assert [len(c.members) for c in claim_all(ob)] == [100, 100]


def test_storm_digests_and_repeats_move_into_the_drain_digest(tmp_path: Path) -> None:
    policy = Policy(rate=(2, 3600.0), dedupe_window=600.0)
    ob = Outbox(tmp_path / "o.db", policies={"ops": policy})
    # "same" leads with repeats counted on it; the rate sends the rest to a storm digest.
    ob.add([routed("same") for _ in range(10)] + [routed(f"t {i}") for i in range(60)])
    ob.add([routed(f"fire {i}", C) for i in range(40)])
    assert states(ob)["queued"] == 2 + 1 + 40  # two mails, the storm digest, the criticals
    # Three mails into four digests would save nothing: no fold.
    assert do_fold(ob, cap=20) is None
    done = do_fold(ob, cap=50)
    assert done is not None
    assert done.plan.folded == 70 and done.plan.digests == {"ops": 2}
    got = claim_all(ob)
    assert [c.alert.severity for c in got[:40]] == [C] * 40
    held = [m.id for c in got[40:] for m in c.members]
    assert len(held) == len(set(held)) == 70
    # Nothing still points at a folded row.
    assert states(ob) == {"sending": 42, "suppressed": 70}


def test_a_route_no_longer_configured_is_not_folded(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db")
    ob.add([routed(f"t {i}", route="gone") for i in range(100)])
    assert do_fold(ob) is None
    assert states(ob) == {"queued": 100}


def test_the_fold_is_one_transaction(tmp_path: Path) -> None:
    """A failure part way (here: the meta table gone) leaves the backlog as it was."""
    ob = Outbox(tmp_path / "o.db")
    ob.add([routed(f"t {i}") for i in range(100)])
    ob.conn.execute("ALTER TABLE meta RENAME TO meta_gone")
    with pytest.raises(Exception, match="meta"):
        do_fold(ob)
    ob.conn.execute("ALTER TABLE meta_gone RENAME TO meta")
    assert states(ob) == {"queued": 100}
    assert ob.conn.execute("SELECT count(*) FROM delivery WHERE kind = 'digest'").fetchone() == (0,)


# --- what a drain digest says ----------------------------------------------------------------


def test_a_drain_digest_says_why_and_lists_every_alert(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db")
    ob.add([routed(f"temp {i % 3}") for i in range(100)])
    assert do_fold(ob) is not None
    [d] = claim_all(ob)
    route = RouteSection(name="ops", match="#", to=("ops@example.com",))
    first = compose_digest((d.alert, *d.members), route, device_id="gw", sender="gw@x.org")
    again = compose_digest((d.alert, *d.members), route, device_id="gw", sender="gw@x.org")
    assert first.message_id == again.message_id == f"<{d.alert.id}.ops.digest@gw.mailgw>"
    text = first.data.decode()
    assert "[drain digest] gw/ops: 100 alerts of a backlog (3 distinct, part 1/1)" in text
    assert "X-Mailgw-Digest: 100" in text and "X-Mailgw-Drain: 1/1" in text
    body = re.sub(r"=\r\n", "", text)  # quoted-printable soft breaks
    assert "drain plan: 100 queued mails would have taken 3 min at 30/min" in body
    assert "Critical alerts keep their own mails" in body
    assert re.search(r"34 x .*temp 0", body) and re.search(r"33 x .*temp 2", body)
    assert all(m.id in body for m in d.members)


# --- smtp.drain_within -----------------------------------------------------------------------

BASE = """
[gateway]
device_id = "truck-042"
state_dir = "/var/lib/mailgw"

[smtp]
host = "smtp.example.com"
from = "Gateway <gw@example.com>"
{extra}
[[route]]
match = "alerts/#"
to = ["ops@example.com"]
"""


def smtp(extra: str) -> SmtpSection:
    cfg = parse(BASE.format(extra=extra))
    assert cfg.smtp is not None
    return cfg.smtp


def test_drain_within_defaults_to_thirty_minutes_with_a_rate_limit_and_off_without() -> None:
    assert smtp("").drain_within is None
    assert smtp('rate_limit = "30/min"').drain_within == 1800.0
    assert smtp('rate_limit = "30/min"\ndrain_within = "2h"').drain_within == 7200.0


@pytest.mark.parametrize("off", ['"off"', '"0"', '"0s"', '"0m"'])
def test_drain_within_off(off: str) -> None:
    assert smtp(f'rate_limit = "30/min"\ndrain_within = {off}').drain_within is None


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        ('drain_within = "30m"', "needs smtp.rate_limit"),
        ('rate_limit = "30/min"\ndrain_within = "10s"', "at least 60s"),
        ('rate_limit = "30/min"\ndrain_within = "8d"', "at most 7d"),
        ('rate_limit = "30/min"\ndrain_within = "soon"', "not a duration"),
        ('rate_limit = "30/min"\ndrain_within = 30', "must be a duration"),
        ('rate_limit = "30/min"\ndrain_within = "-5m"', "not a duration"),
    ],
)
def test_nonsense_drain_within_is_refused(extra: str, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        smtp(extra)
    assert any("drain_within" in p and why in p for p in info.value.problems), info.value.problems


# --- the drain task, with a real writer ------------------------------------------------------


def test_the_drain_task_folds_once_when_the_uplink_returns_and_counts_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio

    from gateway.drainer import CHECK_EVERY, Drainer
    from gateway.outbox.writer import Writer
    from gateway.runtime import Runtime

    cfg = parse(
        f'[gateway]\ndevice_id = "gw"\nstate_dir = "{tmp_path}/state"\n'
        '[smtp]\nhost = "127.0.0.1"\ntls = "none"\nfrom = "gw@example.com"\n'
        'rate_limit = "30/min"\ndrain_within = "1m"\n'
        '[[route]]\nname = "ops"\nmatch = "#"\nto = ["ops@example.com"]\n'
    )
    ob = Outbox(cfg.outbox_path)
    writer = Writer(ob)
    writer.start()
    runtime = Runtime(uplink="down")
    drainer = Drainer(cfg, writer, runtime, lambda: {"ops"})
    assert runtime.drain["drain_within"] == "60 s" and runtime.drain["folds"] == 0

    async def go() -> None:
        task = asyncio.create_task(drainer.run())
        await asyncio.sleep(0.3)  # the first check: nothing queued
        writer.call(lambda o: o.add([routed(f"t {i}") for i in range(100)])).result(10)
        runtime.uplink = "up"  # the uplink returns: a check at once, not in 10 s
        deadline = asyncio.get_running_loop().time() + CHECK_EVERY / 2
        while runtime.drain["folds"] == 0:
            assert asyncio.get_running_loop().time() < deadline, "no fold on the uplink's return"
            await asyncio.sleep(0.05)
        assert await drainer.check() is None  # folded already: the queue is short now
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        with caplog.at_level("WARNING", logger="gateway.drainer"):
            asyncio.run(go())
    finally:
        writer.stop()
    assert runtime.drain["folds"] == 1
    assert runtime.drain["folded"] == 100 and runtime.drain["digests"] == 1
    assert "drain plan: 100 queued mails would take 3 min at 30/min" in caplog.text
    assert runtime.snapshot()["drain"]["folded"] == 100


# --- the property over a real outbox: every alert in exactly one mail ------------------------

alert_specs = st.lists(
    st.tuples(
        st.sampled_from([Severity.DEBUG, INFO, W, C]),
        st.sampled_from(["ops", "fac", "gone"]),
        st.integers(0, 3),  # which message: few, so storm control's repeats happen
    ),
    min_size=0,
    max_size=120,
)


@settings(max_examples=40, deadline=None)
@given(alert_specs, st.integers(0, 10), st.sampled_from([3, 50, DIGEST_CAP]), st.booleans())
def test_after_a_fold_every_alert_is_in_exactly_one_mail_and_no_critical_is_folded(
    specs: list[tuple[Severity, str, int]], in_flight: int, cap: int, storm: bool
) -> None:
    import tempfile

    policies = {"ops": Policy(rate=(3, 3600.0), dedupe_window=600.0)} if storm else {}
    with tempfile.TemporaryDirectory() as d:
        ob = Outbox(Path(d) / "o.db", policies=policies)
        batch = [routed(f"m {m}", sev, route) for sev, route, m in specs]
        ob.add(batch)
        flying = ob.claim(in_flight, now=1e12)
        mails_before = queued_count(ob.conn)
        done = do_fold(ob, routes=("ops", "fac"), cap=cap)
        got = flying + claim_all(ob)
        ob.close()
    if done is not None:
        assert len(got) < mails_before + len(flying)  # fewer mails than without the fold
    seen: list[str] = []
    for c in got:
        drain = c.kind == "digest" and c.alert.sensor == "drain"
        carried = list(c.members) if drain else [c.alert, *c.members]
        if drain:
            assert all(a.severity < C for a in carried)  # criticals are never folded
            assert len(carried) <= cap
        seen += [a.id for a in carried]
    assert sorted(seen) == sorted(r.alert.id for r in batch)
