"""The drain plan in the real daemon (`mailgw run` as a process) against a real,
rate-limited smarthost (aiosmtpd), with a kill -9 in the middle of the drain.

Time is scaled by 60: smtp.rate_limit "30/s" stands for Microsoft 365's 30/min, and
drain_within "1m" for an hour. A 5,000-alert backlog (200 critical) is in the outbox
while the smarthost is down; the daemon folds it before the smarthost is back, then
the critical alerts arrive first, each in its own mail, then the route's digests.

At-least-once: a kill -9 while a mail is in the smarthost's hands (accepted, the
outcome not yet recorded) sends that mail again after the restart, with the same
Message-ID (invariant 2). So "exactly once" is counted over distinct Message-IDs, and a
Message-ID seen twice must carry the same alerts both times.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable
from pathlib import Path

from gateway.alert import Draft, Severity, normalize
from gateway.outbox import Outbox, Routed
from tests.parts import DaemonProcess, Pki, Received, SmtpServer, daemon_config, wait_for

N, CRITICAL_EVERY = 5000, 25  # 200 critical alerts


def backlog(db: Path) -> tuple[set[str], set[str]]:
    """5,000 alerts queued for route "ops" (as a weekend offline leaves them); the ids
    of the critical ones and of the rest."""
    ob = Outbox(db)
    crit: set[str] = set()
    rest: set[str] = set()
    batch = []
    for i in range(N):
        sev = Severity.CRITICAL if i % CRITICAL_EVERY == 0 else Severity.WARNING
        sensor = f"cold{i % 7}"
        a = normalize(
            f"room {i % 7} at {i % 13} C".encode(), Draft(f"alerts/{sensor}", "mqtt", sensor, sev)
        )
        (crit if sev == Severity.CRITICAL else rest).add(a.id)
        batch.append(Routed(a, (("ops", int(sev)),)))
    for i in range(0, N, 1000):
        ob.add(batch[i : i + 1000])
    ob.close()
    return crit, rest


def folded_ids(r: Received) -> list[str]:
    """The alert ids a drain digest lists after its "folded here:" line."""
    payload = r.message.get_payload(decode=True)
    assert isinstance(payload, bytes)
    text = payload.decode()
    return text.split("alert ids folded here:", 1)[1].split()


def test_a_5000_alert_backlog_drains_criticals_first_then_digests_across_a_kill_9(
    pki: Pki, tmp_path: Path, launch_daemon: Callable[..., DaemonProcess]
) -> None:
    server = SmtpServer(pki, "starttls")  # its port is chosen; nothing listens yet
    cfg = daemon_config(tmp_path, pki, server.port)
    text = cfg.read_text().replace("[smtp]\n", '[smtp]\nrate_limit = "30/s"\ndrain_within = "1m"\n')
    cfg.write_text(text)
    crit, rest = backlog(tmp_path / "state" / "outbox.db")

    first = launch_daemon(cfg, ready=())
    wait_for(lambda: "drain plan:" in first.log_text(), timeout=30, what="the fold")
    log = first.log_text()
    # The relay may hold the first critical alert (claimed, the smarthost refusing): it
    # is not the fold's to move.
    assert re.search(r"drain plan: (5,000|4,999) queued mails would take 3 min at 30/s", log)
    assert re.search(r"4,800 alerts of route ops folded into 10 digests, (200|199) mails", log)
    server.start()
    try:
        server.wait_for(100, timeout=60)
        first.kill9()  # in the middle of the drain: 100 of 210 mails
        assert len(server.received) < 200, "the kill came too late to test anything"
        second = launch_daemon(cfg, ready=(), log="daemon2.log")
        server.wait_for(210, timeout=60)
        db = tmp_path / "state" / "outbox.db"

        def all_sent() -> bool:
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
            try:
                return conn.execute(
                    "SELECT count(*) FROM delivery WHERE state != 'sent'"
                ).fetchone() == (0,)
            finally:
                conn.close()

        wait_for(all_sent, timeout=30, what="every delivery sent")
        assert "drain plan:" not in second.log_text()  # the fold survived: not done again
    finally:
        server.stop()

    got = list(server.received)
    by_mid: dict[str, list[str]] = {}
    kinds: list[str] = []
    for r in got:
        if r.message["X-Mailgw-Digest"] is not None:
            ids = folded_ids(r)
            assert len(ids) == int(r.message["X-Mailgw-Digest"])
            kinds.append("digest")
        else:
            ids = [str(r.message["X-Mailgw-Alert-Id"])]
            kinds.append(str(r.message["X-Mailgw-Severity"]))
        # A resend after the kill -9 is the same mail: same Message-ID, same alerts.
        assert by_mid.setdefault(r.message_id, ids) == ids, r.message_id
    # Criticals first, each its own mail; then the digests; nothing else.
    n_digests = kinds.count("digest")
    assert n_digests == 10
    assert set(kinds[: len(kinds) - n_digests]) == {"critical"}, kinds
    assert set(kinds[len(kinds) - n_digests :]) == {"digest"}
    assert len(got) - len(by_mid) <= 2  # at most the mail in flight at the kill, twice
    # Every alert in exactly one mail (counted over distinct Message-IDs).
    every = [i for ids in by_mid.values() for i in ids]
    assert len(every) == len(set(every)) == N
    assert set(every) == crit | rest
    digest_ids = {i for r in got if r.message["X-Mailgw-Digest"] for i in folded_ids(r)}
    assert digest_ids == rest
