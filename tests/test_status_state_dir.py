"""Two state_dirs given one runtime_dir: `mailgw status` and `mailgw flush` of one
configuration do not report or signal the daemon of the other, and the downtime
figure at start is not taken from the other's status file (gateway/status.py,
gateway/cli_signal.py, gateway/watch.py)."""

from __future__ import annotations

import json
from pathlib import Path

from gateway.watch import _last_alive
from tests.conftest import run_cli
from tests.parts import DaemonProcess, Pki, SmtpServer, daemon_config


def test_status_and_flush_ignore_the_status_file_of_another_state_dir(
    tmp_path: Path, pki: Pki
) -> None:
    with SmtpServer(pki, "starttls") as smtp:
        cfg_a = daemon_config(tmp_path, pki, smtp.port)
        other = tmp_path / "other-state"
        cfg_b = tmp_path / "b.toml"  # the same runtime_dir, another state_dir
        cfg_b.write_text(cfg_a.read_text().replace(f"{tmp_path}/state", str(other)))
        daemon = DaemonProcess(cfg_a, tmp_path / "daemon.log").start()
        try:
            daemon.wait_ready()
            assert daemon.proc is not None
            status_file = tmp_path / "run" / "status.json"

            mine = json.loads(run_cli("status", "--json", "-c", str(cfg_a)).stdout)
            assert mine["daemon"]["pid"] == daemon.proc.pid
            assert "ignored" not in mine["daemon"]

            r = run_cli("status", "--json", "-c", str(cfg_b))
            theirs = json.loads(r.stdout)
            assert theirs["daemon"]["running"] is False
            assert theirs["daemon"]["pid"] is None
            said = (
                f"the status file {status_file} is another daemon's (state_dir "
                f"{tmp_path / 'state'}), not this state_dir's ({other}): give each daemon "
                "a runtime_dir of its own"
            )
            assert theirs["daemon"]["ignored"] == said
            assert said in run_cli("status", "-c", str(cfg_b)).stdout

            r = run_cli("flush", "-c", str(cfg_b))
            assert r.returncode == 1
            assert f"mailgw: not signalling: {said}" in r.stderr, r.stderr
            assert run_cli("flush", "-c", str(cfg_a)).returncode == 0
            assert json.loads(status_file.read_text())["state_dir"] == str(tmp_path / "state")
        finally:
            assert daemon.terminate() == 0
        log = daemon.log_text()
        assert log.count("flush requested") == 1, log  # cfg_a's flush only


def test_the_downtime_ignores_the_status_file_of_another_state_dir(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    path.write_text(json.dumps({"written_at": 150.0, "state_dir": str(tmp_path / "other")}))
    assert _last_alive(100.0, path, 200.0, tmp_path / "state") == 100.0
    assert _last_alive(100.0, path, 200.0, tmp_path / "other") == 150.0
    path.write_text(json.dumps({"written_at": 150.0}))  # written before it said whose
    assert _last_alive(100.0, path, 200.0, tmp_path / "state") == 150.0
