"""A message that kills the daemon is held aside, never claimed into a crash loop
(DESIGN.md invariant 13): the real daemon, kill -9 while the message is in flight."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

from gateway.outbox import Outbox
from gateway.outbox.queue import HOLD_AFTER
from tests.conftest import run_cli
from tests.parts import (
    DaemonProcess,
    Mosquitto,
    Pki,
    Publisher,
    SmtpServer,
    daemon_config,
    routed,
    wait_for,
)

MARK = b"POISON"


class _Stall:
    """A smarthost that never answers the DATA of a mail holding MARK (until released):
    each time the gateway reaches it, the mail is in flight and the test kills it."""

    def __init__(self, smtp: SmtpServer) -> None:
        self.reached = threading.Event()
        self.release = threading.Event()
        handler: Any = smtp._controller.handler  # type: ignore[union-attr]
        inner = handler.handle_DATA

        async def handle_DATA(server: Any, session: Any, envelope: Any) -> str:
            if MARK in (envelope.original_content or b""):
                self.reached.set()
                while not self.release.is_set():
                    await asyncio.sleep(0.02)
                return "451 4.3.0 try again later"
            result: str = await inner(server, session, envelope)
            return result

        handler.handle_DATA = handle_DATA


def _rows(db: Path) -> dict[str, tuple[str, int, str | None]]:
    """message text → (state, crashes counted, last_error), read-only."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        out: dict[str, tuple[str, int, str | None]] = {}
        names = {n for (n,) in conn.execute("SELECT name FROM sqlite_master")}
        crashes = {}
        if "delivery_crash" in names:
            crashes = {s: n for s, _, n in conn.execute("SELECT * FROM delivery_crash")}
        for table in (n for n in names if n.startswith("alert_")):
            for seq, msg, state, err in conn.execute(
                f"SELECT a.seq, a.message, d.state, d.last_error FROM {table} a"
                " JOIN delivery d ON d.alert_seq = a.seq"
            ):
                out[msg] = (state, crashes.get(seq, 0), err)
        return out
    finally:
        conn.close()


def test_a_message_that_kills_the_daemon_is_held_after_three_starts_and_the_rest_go_out(
    tmp_path: Path, pki: Pki, broker: Mosquitto
) -> None:
    db = tmp_path / "state" / "outbox.db"
    with SmtpServer(pki, "starttls") as smtp:
        stall = _Stall(smtp)
        cfg = daemon_config(tmp_path, pki, smtp.port, broker.port)
        # A stall longer than the test's kill: the mail is in flight when it dies.
        cfg.write_text(cfg.read_text().replace('timeout = "1s"', 'timeout = "20s"'))
        ob = Outbox(db)
        ob.add([routed("POISON pill", topic="alerts/p")])
        ob.add([routed(f"fine {i}", topic="alerts/f") for i in range(4)])
        ob.close()
        gw = DaemonProcess(cfg, tmp_path / "daemon.log")
        try:
            for _ in range(HOLD_AFTER):
                stall.reached.clear()
                gw.start()
                assert stall.reached.wait(60), gw.log_text()[-3000:]
                gw.kill9()
            assert {s for s, _, _ in _rows(db).values()} <= {"sending", "queued", "sent"}
            gw.start()
            gw.wait_ready(("mqtt",))
            pub = Publisher(broker.port)
            pub.publish("alerts/m/x", "an alert sent around it")
            wanted = {f"fine {i}" for i in range(4)} | {"an alert sent around it"}

            def delivered() -> set[str]:
                return {r.message["Subject"].rsplit(": ", 1)[-1] for r in smtp.received}

            wait_for(lambda: delivered() >= wanted, timeout=60, what="the others delivered")
            pub.close()
            state, crashes, reason = _rows(db)["POISON pill"]
            assert (state, crashes) == ("held", HOLD_AFTER)
            assert reason and "held" in reason and "mailgw queue retry" in reason
            assert "held aside" in gw.log_text()

            listing = run_cli("queue", "list", "-c", str(cfg))
            assert listing.returncode == 0, listing.stderr
            line = next(ln for ln in listing.stdout.splitlines() if "POISON" in ln)
            assert " held " in line
            assert "crashes or stalls" in listing.stdout
            report = json.loads(run_cli("status", "--json", "-c", str(cfg)).stdout)
            assert report["held"] == 1
            assert "1 held aside" in run_cli("status", "-c", str(cfg)).stdout

            alert_id = line.split()[0]
            r = run_cli("queue", "retry", alert_id, "-c", str(cfg))
            assert r.returncode == 0 and r.stdout.startswith("1 "), (r.stdout, r.stderr)
            stall.reached.clear()
            # Released: claimed again (its count forgotten) and reaches the smarthost.
            assert stall.reached.wait(30), gw.log_text()[-3000:]
            assert _rows(db)["POISON pill"][:2] == ("sending", 0)
        finally:
            stall.release.set()
            if gw.alive:
                gw.terminate()
