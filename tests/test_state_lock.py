"""One daemon per state_dir (gateway/state_lock.py): a second `mailgw run` on the same
state_dir exits with a message naming the first; the first goes on delivering, and the
CLI's readers keep working beside it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import state_lock
from gateway.state_lock import AlreadyRunning
from tests.conftest import run_cli
from tests.parts import DaemonProcess, Pki, SmtpServer, daemon_config, wait_for


def test_the_lock_is_exclusive_and_names_its_holder(tmp_path: Path) -> None:
    state = tmp_path / "state"
    held = state_lock.take(state)  # makes the directory
    assert (state / state_lock.NAME).read_text().strip() == str(os.getpid())
    with pytest.raises(AlreadyRunning) as refused:
        state_lock.take(state)  # another open file description: as another process
    assert f"(PID {os.getpid()}) is already running on state_dir {state}" in str(refused.value)
    held.release()
    state_lock.take(state).release()  # free again once released


@given(st.binary(max_size=64))
def test_the_holder_is_read_from_any_bytes_without_raising(data: bytes) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / state_lock.NAME
        path.write_bytes(data)
        pid = state_lock.holder(path)
        text = data.decode("ascii", "replace").strip()
        assert pid == (int(text) if text.isdigit() and len(text) <= 10 else None)


def test_a_second_daemon_on_one_state_dir_exits_and_the_first_keeps_delivering(
    tmp_path: Path, pki: Pki
) -> None:
    with SmtpServer(pki, "starttls") as smtp:
        cfg = daemon_config(tmp_path, pki, smtp.port)
        first = DaemonProcess(cfg, tmp_path / "first.log").start()
        try:
            first.wait_ready()
            assert first.proc is not None
            second = DaemonProcess(cfg, tmp_path / "second.log").start()
            assert second.proc is not None
            try:
                rc = second.proc.wait(20)
            except subprocess.TimeoutExpired:
                second.kill9()
                raise AssertionError("the second daemon ran beside the first") from None
            assert rc == 1
            said = second.log_text()
            assert (
                f"another mailgw daemon (PID {first.proc.pid}) is already running on "
                f"state_dir {tmp_path / 'state'}"
            ) in said, said
            assert "Stop it first" in said

            assert first.alive
            r = run_cli("send", "-c", str(cfg), "--sensor", "s", "--severity", "critical", "one")
            assert r.returncode == 0, r.stderr
            (got,) = smtp.wait_for(1, timeout=20)
            assert "one" in got.message["Subject"]

            # The second's exit left the first's status file alone, and the readers work.
            def report() -> dict[str, Any]:
                data: dict[str, Any] = json.loads(
                    run_cli("status", "--json", "-c", str(cfg)).stdout
                )
                return data

            wait_for(lambda: report()["sent"] == 1, 10, "status: 1 sent")
            assert report()["daemon"]["pid"] == first.proc.pid
            assert run_cli("queue", "list", "-c", str(cfg)).returncode == 0
        finally:
            assert first.terminate() == 0
