from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import ROOT
from tests.parts import wait_for


def test_daemon_notifies_systemd_and_stops_cleanly(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    cfg = write_config()
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(15)
    env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "-c", str(cfg)],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        messages: list[str] = []

        def got(prefix: str) -> bool:
            while not any(m.startswith(prefix) for m in messages):
                messages.extend(sock.recv(4096).decode().split("\n"))
            return True

        got("READY=1")
        got("WATCHDOG=1")
        status = tmp_path / "state" / "run" / "status.json"
        wait_for(status.exists, what="status.json")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        got("STOPPING=1")
        assert proc.wait(10) == 0
        assert time.monotonic() - t0 < 5
        order = [m.split("=")[0] for m in messages if m in ("READY=1", "STOPPING=1")]
        assert order == ["READY", "STOPPING"]
        assert not status.exists()  # a stopped daemon leaves no stale status behind
        assert (tmp_path / "state" / "outbox.db").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
        assert proc.stderr is not None
        err = proc.stderr.read()
        sock.close()
    assert "mailgw started" in err and "mailgw stopped" in err


def test_daemon_refuses_invalid_config(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[outbox]\nmax_messages = -1\n")
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "run", "-c", str(cfg)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2 and "outbox.max_messages" in r.stderr


def test_journal_stream_gives_priority_prefixes(write_config: Callable[..., Path]) -> None:
    cfg = write_config()
    env = {**os.environ, "JOURNAL_STREAM": "8:1234"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "-c", str(cfg)],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    lines = [proc.stderr.readline()]
    while "mailgw started" not in lines[-1]:
        lines.append(proc.stderr.readline())
    proc.send_signal(signal.SIGTERM)
    lines += proc.communicate(timeout=10)[1].splitlines()
    assert lines[-1].startswith("<6>mailgw started") or any(
        line.startswith("<6>mailgw started") for line in lines
    )
    assert all(line.startswith(("<6>", "<4>", "<3>", "<2>", "<7>")) for line in lines if line)
