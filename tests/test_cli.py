from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import run_cli

ROUTE = '[[route]]\nmatch = "#"\nto = ["ops@example.com"]\n'


def test_send_status_queue_roundtrip(write_config: Callable[..., Path]) -> None:
    cfg = str(write_config(ROUTE))
    r = run_cli("send", "-c", cfg, "--sensor", "door", "--severity", "critical", "door", "open")
    assert r.returncode == 0, r.stderr
    alert_id = r.stdout.strip()
    r = run_cli("send", "-c", cfg, "--sensor", "fan", "--severity", "info", input="fan slow\n")
    assert r.returncode == 0, r.stderr

    status = json.loads(run_cli("status", "-c", cfg, "--json").stdout)
    for key in (
        "queued",
        "sending",
        "sent",
        "dead",
        "oldest_queued_age_s",
        "last_success",
        "last_error",
        "rejected",
    ):
        assert key in status
    assert status["queued"] == 2 and status["daemon"]["running"] is False

    human = run_cli("status", "-c", cfg).stdout
    assert "2 queued" in human and "not running" in human
    assert all(len(line) <= 80 for line in human.splitlines())

    listing = run_cli("queue", "list", "-c", cfg).stdout
    assert alert_id in listing and "door open" in listing
    shown = json.loads(run_cli("queue", "show", alert_id, "-c", cfg).stdout)
    assert shown["topic"] == "local/door" and shown["severity"] == "critical"
    assert shown["deliveries"][0]["state"] == "queued"

    r = run_cli("queue", "delete", alert_id, "-c", cfg)
    assert r.returncode == 0 and "deleted" in r.stdout
    assert json.loads(run_cli("status", "-c", cfg, "--json").stdout)["queued"] == 1
    assert run_cli("queue", "show", alert_id, "-c", cfg).returncode == 1


def test_send_rejects_bad_input_clearly(write_config: Callable[..., Path]) -> None:
    cfg = str(write_config(ROUTE))
    r = run_cli("send", "-c", cfg, "--sensor", "s", "--severity", "loud", "x")
    assert r.returncode == 2 and "unknown severity" in r.stderr
    r = run_cli("send", "-c", cfg, "--sensor", "s", "--severity", "info", input="   \n")
    assert r.returncode == 2 and "empty message" in r.stderr


def test_send_when_full_fails_and_says_so(write_config: Callable[..., Path]) -> None:
    cfg = str(write_config(ROUTE + "[outbox]\nmax_messages = 10\n"))
    for i in range(10):
        assert (
            run_cli("send", "-c", cfg, "--sensor", "s", "--severity", "info", str(i)).returncode
            == 0
        )
    r = run_cli("send", "-c", cfg, "--sensor", "s", "--severity", "info", "one too many")
    assert r.returncode == 1 and "not stored" in r.stderr and "max_messages" in r.stderr


def test_unrouted_alerts_show_in_status(write_config: Callable[..., Path]) -> None:
    cfg = str(write_config())
    run_cli("send", "-c", cfg, "--sensor", "s", "--severity", "info", "nobody listens")
    status = json.loads(run_cli("status", "-c", cfg, "--json").stdout)
    assert status["unrouted"] == 1
    assert "nobody listens" in run_cli("queue", "list", "-c", cfg).stdout


def test_retry_and_flush_without_daemon(write_config: Callable[..., Path]) -> None:
    cfg = str(write_config(ROUTE))
    run_cli("send", "-c", cfg, "--sensor", "s", "--severity", "info", "x")
    r = run_cli("queue", "retry", "--all", "-c", cfg)
    assert r.returncode == 0 and "1 deliveries" in r.stdout
    r = run_cli("flush", "-c", cfg)
    assert r.returncode == 1 and "not running" in r.stderr
    r = run_cli("queue", "retry", "-c", cfg)
    assert r.returncode == 2


def test_config_errors_exit_2(tmp_path: Path) -> None:
    r = run_cli("status", "-c", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and "no such file" in r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="acting as another user needs root")
def test_root_runs_outbox_commands_as_the_outbox_owner(tmp_path: Path) -> None:
    # `sudo mailgw send/queue/status` must not leave root-owned outbox.db-wal/-shm files
    # that would lock the daemon's user out of its own outbox.
    base = Path(tempfile.mkdtemp(dir="/var/tmp"))
    try:
        base.chmod(0o755)
        state = base / "state"
        state.mkdir(mode=0o700)
        os.chown(state, 65534, 65534)
        cfg = tmp_path / "gateway.toml"
        cfg.write_text(
            f'[gateway]\ndevice_id = "t"\nstate_dir = "{state}"\nruntime_dir = "{base}/run"\n'
            + ROUTE
        )
        r = run_cli("send", "-c", str(cfg), "--sensor", "s", "--severity", "info", "as root")
        assert r.returncode == 0, r.stderr
        assert run_cli("queue", "list", "-c", str(cfg)).returncode == 0
        owners = {p.name: p.stat().st_uid for p in state.iterdir()}
        assert "outbox.db" in owners and set(owners.values()) == {65534}, owners
    finally:
        shutil.rmtree(base)
