"""A message that kills the daemon is held aside, never claimed into a crash loop
(DESIGN.md invariant 13): the real daemon, kill -9 while the message is in flight."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.clock import Stamp
from gateway.outbox import Claimed, Outbox, Outcome, State
from gateway.outbox.queue import HOLD_AFTER
from gateway.outbox.raw import RawMessage, RawPlan
from gateway.outbox.raw import store as raw_store
from gateway.relay import Relay
from tests.conftest import run_cli
from tests.parts import (
    DaemonProcess,
    Gateway,
    Mosquitto,
    Pki,
    Publisher,
    SmtpServer,
    alert,
    daemon_config,
    routed,
    smtp_conf,
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


# --- a message that raises is set aside while the daemon goes on ---------------------------


def _store_unreadable_raw(db: Path) -> None:
    """A sendmail message the relay's compose chokes on (a row a damaged or hand-edited
    outbox may hold: its owner's uid is text): it raises ValueError, as a non-ASCII
    local name in To once raised UnicodeEncodeError. Next to it, an alert that must
    still go."""
    ob = Outbox(db)
    try:
        msg = b"From: root\nTo: root\nSubject: unreadable\n\nbody\n"
        raw_store(
            ob,
            alert("local mail that raises"),
            RawMessage("drop-1", 0, "root", ("ops@example.com",), msg),
            RawPlan(addresses=("ops@example.com",)),
        )
        ob.conn.execute("UPDATE raw_message SET uid = 'not a uid'")
        ob.conn.commit()
        ob.add([routed("fine before")])
    finally:
        ob.close()


def test_a_message_that_raises_in_compose_is_dead_lettered_and_the_daemon_goes_on(
    tmp_path: Path, pki: Pki, broker: Mosquitto
) -> None:
    db = tmp_path / "state" / "outbox.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    _store_unreadable_raw(db)
    with SmtpServer(pki, "starttls") as smtp:
        cfg = daemon_config(tmp_path, pki, smtp.port, broker.port)
        gw = DaemonProcess(cfg, tmp_path / "daemon.log")
        try:
            gw.start()
            gw.wait_ready(("mqtt",))

            def states() -> dict[str, tuple[str, int, str | None]]:
                return _rows(db)

            wait_for(
                lambda: states()["local mail that raises"][0] == "dead",
                timeout=30,
                what="the message that raises dead-lettered",
            )
            _, crashes, reason = states()["local mail that raises"]
            assert reason and "could not be composed or sent: ValueError" in reason
            assert crashes == 0
            pub = Publisher(broker.port)
            pub.publish("alerts/m/x", "an alert after it")

            def delivered() -> set[str]:
                return {r.message["Subject"].rsplit(": ", 1)[-1] for r in smtp.received}

            wait_for(
                lambda: {"fine before", "an alert after it"} <= delivered(),
                timeout=30,
                what="the alerts around it delivered",
            )
            pub.close()
            assert gw.alive, gw.log_text()[-3000:]
            log_text = gw.log_text()
            assert "dead-lettered, the other mails go on" in log_text
            assert log_text.count("could not be composed or sent") == 1
            report = json.loads(run_cli("status", "--json", "-c", str(cfg)).stdout)
            assert report["dead"] == 1
        finally:
            if gw.alive:
                gw.terminate()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_relay_that_fails_with_a_mail_in_flight_counts_a_crash_against_it(
    pki: Pki, make_gateway: Callable[..., Gateway], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def fails(self: Relay, item: Claimed, now: Stamp, worker: Any) -> Outcome:
        raise RuntimeError("a bug outside the per-mail guard")

    monkeypatch.setattr(Relay, "_deliver", fails)
    with SmtpServer(pki, "starttls") as server:
        gw = make_gateway(smtp_conf(server, pki))
        a = alert("in flight when the relay failed")
        gw.add(a)

        def crash_rows() -> list[tuple[str, int]]:
            return gw.writer.call(
                lambda ob: ob.conn.execute(
                    "SELECT d.state, k.crashes FROM delivery d JOIN delivery_crash k"
                    " ON k.alert_seq = d.alert_seq AND k.route = d.route"
                ).fetchall()
            ).result(10)

        wait_for(lambda: crash_rows() == [("queued", 1)], timeout=20, what="a crash counted")


def test_crashes_the_relay_counts_hold_the_delivery_at_hold_after(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "outbox.db")
    try:
        ob.add([routed("kills the relay"), routed("innocent")])
        for round_ in range(1, HOLD_AFTER + 1):
            claimed = ob.claim(10)
            if round_ > 1:  # a suspect is claimed alone
                assert [c.alert.message for c in claimed] == ["kills the relay"]
            bad = next(c for c in claimed if c.alert.message == "kills the relay")
            ob.finish(
                [Outcome(bad.key, State.QUEUED, count_attempt=False, crashed=True, error="boom")]
                + [
                    Outcome(c.key, State.QUEUED, count_attempt=False)
                    for c in claimed
                    if c is not bad
                ]
            )
        state, err = ob.conn.execute(
            "SELECT state, last_error FROM delivery WHERE alert_seq = ?", (bad.seq,)
        ).fetchone()
        assert state == "held" and "mailgw queue retry" in err
        assert ob.claim(10)[0].alert.message == "innocent"
    finally:
        ob.close()
