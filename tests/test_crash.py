"""A crash costs the mail in flight, not a batch (DESIGN.md invariant 11)."""

from __future__ import annotations

import collections
from pathlib import Path

from gateway.outbox import Outbox
from tests.parts import DaemonProcess, Pki, SmtpServer, daemon_config, routed, wait_for

ALERTS = 400
KILLS = 4


def test_kill_9_mid_drain_resends_at_most_the_mail_in_flight(tmp_path: Path, pki: Pki) -> None:
    with SmtpServer(pki, "starttls") as smtp:
        smtp.script.data_delay = 0.02  # a slow smarthost: 20 ms per mail
        cfg = daemon_config(tmp_path, pki, smtp.port)
        ob = Outbox(tmp_path / "state" / "outbox.db")
        ob.add([routed(f"queued {i}", topic="alerts/q") for i in range(ALERTS)])
        ob.close()
        gw = DaemonProcess(cfg, tmp_path / "daemon.log").start()
        for k in range(1, KILLS + 1):
            wait_for(
                lambda k=k: len(smtp.received) >= k * ALERTS // (KILLS + 1),
                timeout=60,
                what=f"drain past {k}/{KILLS + 1}",
            )
            gw.kill9()
            gw.start()
        wait_for(
            lambda: len({r.message_id for r in smtp.received}) == ALERTS,
            timeout=60,
            what="every alert delivered",
        )
        assert gw.terminate() == 0
        by_id = collections.Counter(r.message_id for r in smtp.received)
        duplicates = sum(n - 1 for n in by_id.values())
        assert duplicates <= KILLS, f"{duplicates} duplicates for {KILLS} kills"
        # Each copy is the same mail with the same Message-ID: content ↔ id one to one.
        by_text = collections.defaultdict(set)
        for r in smtp.received:
            by_text[r.message.get_content()].add(r.message_id)
        assert all(len(ids) == 1 for ids in by_text.values())
