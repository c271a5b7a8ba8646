"""Storm control: the pure rules with a fake clock, then the outbox that applies them,
then a property: whatever the alerts and the relay's timing, no alert is lost."""

from __future__ import annotations

import json
import re
import signal
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.alert import Draft, Severity, normalize
from gateway.compose import compose, compose_digest, digest_lines
from gateway.config import Policy, RouteSection
from gateway.ingest import storm_keys
from gateway.outbox import Outbox, Outcome, Routed
from gateway.storm import Bucket, Lead, decide, refill
from tests.conftest import run_cli
from tests.parts import (
    DaemonProcess,
    Mosquitto,
    Publisher,
    Received,
    SmtpServer,
    make_pki,
    wait_for,
)

W, C, INFO = Severity.WARNING, Severity.CRITICAL, Severity.INFO

# --- the rules ---------------------------------------------------------------------------


def test_no_policy_mails_everything() -> None:
    assert decide(Policy(), W, 0.0, None, None).kind == "mail"


def test_dedupe_counts_on_a_queued_lead_then_digests_then_expires() -> None:
    p = Policy(dedupe_window=60.0)
    first = decide(p, W, 100.0, None, None)
    assert first.kind == "mail" and first.lead_until == 160.0
    assert decide(p, W, 110.0, Lead(1, True, 160.0), None).kind == "repeat"
    # The lead went out: a repeat inside the window goes to the digest, not to a mail.
    assert decide(p, W, 120.0, Lead(1, False, 160.0), None).kind == "digest"
    # After the window it is news again.
    assert decide(p, W, 161.0, Lead(1, False, 160.0), None).kind == "mail"


def test_rate_limit_is_a_token_bucket() -> None:
    p = Policy(rate=(3, 60.0))
    bucket = None
    kinds = []
    for t in (0.0, 1.0, 2.0, 3.0, 4.0):
        d = decide(p, W, t, None, bucket)
        bucket = d.bucket or bucket
        kinds.append(d.kind)
    assert kinds == ["mail", "mail", "mail", "digest", "digest"]
    assert bucket is not None
    # One token per 20 s comes back.
    assert decide(p, W, 23.0, None, bucket).kind == "mail"
    assert decide(p, W, 10.0, None, bucket).kind == "digest"


def test_a_clock_jumping_back_refills_nothing() -> None:
    b = refill(Bucket(0.0, 1000.0), (3, 60.0), 10.0)
    assert b.tokens == 0.0 and b.at == 1000.0
    assert refill(Bucket(0.0, 1000.0), (3, 60.0), 1040.0).tokens == pytest.approx(2.0)
    assert refill(Bucket(0.0, 0.0), (3, 60.0), 1e9).tokens == 3.0  # capped


def test_critical_bypasses_rate_and_digest_unless_told_not_to() -> None:
    empty = Bucket(0.0, 0.0)
    p = Policy(rate=(1, 3600.0), dedupe_window=60.0)
    assert decide(p, C, 1.0, None, empty).kind == "mail"
    assert decide(p, C, 1.0, None, empty).bucket is None  # takes no token
    # A critical repeat is still counted on its lead while that is queued...
    assert decide(p, C, 2.0, Lead(1, True, 61.0), empty).kind == "repeat"
    # ...and mailed again, not digested, once the lead went out.
    again = decide(p, C, 2.0, Lead(1, False, 61.0), empty)
    assert again.kind == "mail" and again.lead_until == 62.0
    strict = Policy(rate=(1, 3600.0), critical_bypass=False)
    assert decide(strict, C, 1.0, None, empty).kind == "digest"


# --- applied by the outbox ------------------------------------------------------------------


def alert(msg: str, sev: Severity = W, sensor: str = "door") -> Routed:
    a = normalize(msg, Draft("alerts/site/" + sensor, "mqtt", sensor, sev), parse_json=False)
    deliveries = (("ops", int(sev)),)
    # The dedupe key as Ingest computes it, with the default key template.
    keys = storm_keys(a, deliveries, {"ops": Policy(dedupe_window=1.0)})
    return Routed(a, deliveries, storm_keys=keys)


def states(ob: Outbox) -> dict[str, int]:
    return dict(ob.conn.execute("SELECT state, count(*) FROM delivery GROUP BY state").fetchall())


def test_repeats_are_counted_on_the_queued_lead(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db", policies={"ops": Policy(dedupe_window=60.0)})
    ob.add([alert("door open") for _ in range(5)], now=1000.0, mono=10.0)
    ob.add([alert("door open")], now=1001.0, mono=11.0)
    assert states(ob) == {"queued": 1, "suppressed": 5}
    assert ob.live == 6
    [lead] = ob.claim(10, now=11.0)
    assert lead.kind == "mail" and len(lead.members) == 5
    # While the lead is out, a repeat cannot join it: it opens a digest instead.
    ob.add([alert("door open")], now=1002.0, mono=12.0)
    ob.finish([Outcome(lead.key, "sent")])
    assert states(ob) == {"sent": 6, "queued": 1}
    assert ob.live == 1


def test_over_the_rate_goes_to_one_digest_due_at_the_period_end(tmp_path: Path) -> None:
    policy = Policy(rate=(2, 60.0), digest_every=30.0)
    ob = Outbox(tmp_path / "o.db", policies={"ops": policy})
    ob.add([alert(f"temp {i}") for i in range(10)] + [alert("fire", C)], now=1000.0, mono=5.0)
    assert states(ob) == {"queued": 4, "suppressed": 7}  # 2 mails, the critical, 1 digest
    now = ob.claim(100, now=5.0)
    assert [c.alert.severity for c in now] == [C, W, W]  # critical first
    assert all(c.kind == "mail" for c in now)
    ob.finish([Outcome(c.key, "sent") for c in now])
    assert ob.claim(100, now=34.0) == []
    [digest] = ob.claim(100, now=35.0)
    assert digest.kind == "digest" and len(digest.members) == 7
    assert [a.message for a in (digest.alert, *digest.members)] == [
        f"temp {i}" for i in range(2, 10)
    ]
    ob.finish([Outcome(digest.key, "sent")])
    assert states(ob) == {"sent": 11} and ob.live == 0


def test_storm_state_survives_a_restart(tmp_path: Path) -> None:
    policies = {"ops": Policy(rate=(1, 3600.0), dedupe_window=600.0)}
    ob = Outbox(tmp_path / "o.db", policies=policies)
    ob.add([alert("a")], now=1000.0, mono=1.0)
    ob.close()
    ob = Outbox(tmp_path / "o.db", policies=policies)
    ob.add([alert("a"), alert("b")], now=1010.0, mono=1.0)
    # "a" is a repeat of the queued lead; "b" finds the bucket still empty.
    assert states(ob) == {"queued": 2, "suppressed": 1}
    kinds = sorted(c.kind for c in ob.claim(10, now=1e9))
    assert kinds == ["digest", "mail"]


def test_digest_and_repeat_mails_list_what_they_hold() -> None:
    route = RouteSection(
        name="ops",
        match="#",
        to=("ops@example.com",),
        storm=Policy(rate=(2, 60.0), dedupe_window=60.0),
    )
    held = tuple(alert(m).alert for m in ["temp 40", "temp 41", "temp 40", "temp 40"])
    mail = compose_digest(held, route, device_id="gw", sender="gw@example.com")
    text = mail.data.decode()
    assert mail.message_id == f"<{held[0].id}.ops.digest@gw.mailgw>"
    assert "4 alerts held back (2 distinct)" in text
    assert "X-Mailgw-Digest: 4" in text
    assert [(n, f.message) for n, f, _ in digest_lines(held, route.storm.key)] == [
        (3, "temp 40"),
        (1, "temp 41"),
    ]
    lead = compose(held[0], route, device_id="gw", sender="gw@example.com", repeats=held[1:])
    assert "X-Mailgw-Repeats: 3" in lead.data.decode()
    assert "Repeated 3 more times" in lead.data.decode()


# --- the property: nothing is lost ------------------------------------------------------------

events = st.lists(
    st.one_of(
        st.tuples(
            st.just("alert"),
            st.integers(0, 1),  # which message: few, so repeats happen
            st.sampled_from([INFO, W, C]),
            st.floats(0, 30),  # seconds since the previous event
        ),
        st.tuples(st.just("drain"), st.floats(0, 120)),
        st.tuples(st.just("fail"), st.floats(0, 5)),
    ),
    max_size=40,
)
policies = st.builds(
    Policy,
    dedupe_window=st.sampled_from([0.0, 10.0, 100.0]),
    rate=st.sampled_from([None, (1, 30.0), (3, 60.0)]),
    digest_every=st.sampled_from([5.0, 60.0]),
    critical_bypass=st.booleans(),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=events, policy=policies)
def test_every_alert_is_mailed_counted_or_digested(
    events: list[tuple[object, ...]], policy: Policy
) -> None:
    with tempfile.TemporaryDirectory() as d:
        ob = Outbox(Path(d) / "o.db", policies={"ops": policy})
        t = 0.0
        added: set[str] = set()
        covered: list[str] = []

        def drain(outcome: str) -> None:
            claimed = ob.claim(1000, now=t)
            if outcome == "sent":
                for c in claimed:
                    covered.extend(a.id for a in (c.alert, *c.members))
            ob.finish([Outcome(c.key, outcome, due=t) for c in claimed])

        for ev in events:
            if ev[0] == "alert":
                _, which, sev, dt = ev
                t += float(dt)  # type: ignore[arg-type]
                r = alert(f"reading {which}", sev)  # type: ignore[arg-type]
                added.add(r.alert.id)
                ob.add([r], now=1_000_000.0 + t, mono=t)
            else:
                t += float(ev[1])  # type: ignore[arg-type]
                drain("sent" if ev[0] == "drain" else "queued")  # "fail": a 4xx, retried
        t += 1e6  # the end: every period is over, the relay drains everything
        while states(ob).get("queued"):
            drain("sent")
        assert set(covered) == added  # each mailed, counted on a lead or in a digest
        assert len(covered) == len(added)  # and exactly once when nothing fails mid-send
        assert set(states(ob)) <= {"sent"} and ob.live == 0
        ob.close()


# --- end to end: a flapping sensor against the real daemon ----------------------------------


def _counted(mails: list[Received]) -> tuple[int, list[str]]:
    """Warnings accounted for by the mails (own mail + repeats + digest lines), and the
    order in which the mails' severities arrived."""
    total, order = 0, []
    for r in mails:
        m = r.message
        order.append(str(m["X-Mailgw-Severity"]))
        if m["X-Mailgw-Digest"]:
            body = m.get_content()
            lines = re.findall(r"^\s*(\d+) x  .*\[(\w+)\]", body, re.M)
            total += sum(int(n) for n, sev in lines if sev == "warning")
        elif str(m["X-Mailgw-Severity"]) == "warning":
            total += 1 + int(m["X-Mailgw-Repeats"] or 0)
    return total, order


def acked(pub: Publisher) -> int:
    """PUBACKs received (the payloads repeat, so count messages, not texts)."""
    return sum(info.is_published() for _, info in list(pub._sent))


def test_a_flapping_sensor_is_throttled_and_critical_goes_first(tmp_path: Path) -> None:
    # Ten minutes of a storm, compressed: periods in seconds instead of minutes.
    pki = make_pki(tmp_path / "pki")
    broker = Mosquitto(tmp_path / "mosquitto").start()
    smtp = SmtpServer(pki, "starttls")  # not started: the uplink is down at first
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    pw.chmod(0o600)
    cfg = tmp_path / "gw.toml"
    cfg.write_text(
        f'[gateway]\ndevice_id = "storm"\nstate_dir = "{tmp_path}/state"\n'
        f'runtime_dir = "{tmp_path}/run"\n'
        f'[smtp]\nhost = "127.0.0.1"\nport = {smtp.port}\nfrom = "gw@example.com"\n'
        f'username = "gw@example.com"\npassword_file = "{pw}"\nca_file = "{pki.ca_file}"\n'
        'timeout = "2s"\nmin_backoff = "1s"\nprobe_max = "1s"\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\n'
        '[[route]]\nname = "ops"\nmatch = "#"\nto = ["ops@example.com"]\n'
        'rate_limit = "3/2s"\ndedupe_window = "4s"\ndigest_every = "2s"\n'
    )
    gw = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    try:
        gw.wait_ready(("mqtt",))
        flood = [f"temperature {20 + i % 40} C" for i in range(3000)]
        pub = Publisher(broker.port)
        t_flood = time.monotonic()
        for i, text in enumerate(flood):
            pub.publish("alerts/cold-room/temp", text)
            if i % 600 == 300:  # five criticals inside the flood
                pub.publish(
                    "alerts/cold-room/compressor",
                    json.dumps({"severity": "critical", "message": f"compressor stopped {i}"}),
                )
        wait_for(lambda: acked(pub) == 3005, 60, "every PUBACK")
        pub.close()

        def stored() -> int:
            st = json.loads(run_cli("status", "-c", str(cfg), "--json").stdout)
            return int(st["queued"] + st["sending"] + st["suppressed"])

        wait_for(lambda: stored() == 3005, 30, "all 3,005 alerts stored")
        window = time.monotonic() - t_flood
        smtp.start()  # the uplink returns with the whole storm queued
        gw.proc.send_signal(signal.SIGUSR1)  # type: ignore[union-attr]
        wait_for(lambda: stored() == 0, 60, "the queue drained")
        mails = list(smtp.received)
        total, order = _counted(mails)
        # Every critical individually, and before any warning mail or digest.
        assert order[:5] == ["critical"] * 5, order
        assert order.count("critical") == 5
        # The rate limit let a full bucket (3) through, plus what it refilled (3 per 2 s)
        # while the flood was being stored; everything else is in digests: one, plus
        # one more each time a relay probe held the open one (at most one per second).
        singles = [r for r in mails if not r.message["X-Mailgw-Digest"]]
        digests = [r for r in mails if r.message["X-Mailgw-Digest"]]
        assert len(singles) <= 5 + 3 + 1.5 * window, (len(singles), window)
        assert len(digests) <= 1 + window, (len(digests), window)
        assert total == 3000  # each warning mailed, counted as a repeat, or in a digest

        # A second wave while the uplink is up: the rate holds in real time.
        before = len(smtp.received)
        pub = Publisher(broker.port)
        t0 = time.monotonic()
        for i in range(1000):
            pub.publish("alerts/cold-room/temp", f"humidity {i % 25} %")
            if i % 100 == 99:
                time.sleep(0.4)
        wait_for(lambda: acked(pub) == 1000, 60, "every PUBACK")
        pub.close()
        wait_for(lambda: stored() == 0, 60, "the second wave delivered")
        elapsed = time.monotonic() - t0
        wave = smtp.received[before:]
        total, _ = _counted(wave)
        assert total == 1000
        singles = [r for r in wave if not r.message["X-Mailgw-Digest"]]
        digests = [r for r in wave if r.message["X-Mailgw-Digest"]]
        # Token bucket: a full bucket (3) plus 3 per 2 s; a digest per 2 s period.
        assert len(singles) <= 3 + 3 * (elapsed / 2 + 1), (len(singles), elapsed)
        assert len(digests) <= elapsed / 2 + 2, (len(digests), elapsed)
        print(
            f"\nstorm: 3,005 alerts in {window:.1f} s -> {len(mails)} mails; "
            f"then 1,000 in {elapsed:.1f} s -> "
            f"{len(singles)} mails + {len(digests)} digests"
        )
        assert gw.terminate() == 0
    finally:
        if gw.alive:
            gw.kill9()
        smtp.stop()
        broker.stop()
