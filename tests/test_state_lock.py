"""One daemon per state_dir (gateway/state_lock.py): a second `mailgw run` on the same
state_dir exits with a message naming the first; the first goes on delivering, and the
CLI's readers keep working beside it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import state_lock
from gateway.state_lock import AlreadyRunning
from tests.conftest import run_cli
from tests.parts import DaemonProcess, Pki, SmtpServer, daemon_config, wait_for
from tests.test_sendmail_daemon import client


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
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / state_lock.NAME
        path.write_bytes(data)
        pid = state_lock.holder(path)
        # Only the note's first bytes are read: a PID and its newline fit with room.
        text = data[:16].decode("ascii", "replace").strip()
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


def test_a_symlink_in_the_lock_files_place_is_replaced_not_written_through(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (state / state_lock.NAME).symlink_to(victim)
    state_lock.take(state).release()
    assert victim.read_text() == "precious\n"
    note = state / state_lock.NAME
    assert not note.is_symlink() and note.read_text() == f"{os.getpid()}\n"
    assert state_lock.holder(state / "elsewhere") is None
    (state / "link").symlink_to(note)
    assert state_lock.holder(state / "link") is None  # never followed


def test_a_fifo_in_the_lock_files_place_is_refused_at_once(tmp_path: Path) -> None:
    state = tmp_path / "state"
    held = state_lock.take(state)
    note = state / state_lock.NAME
    note.unlink()
    os.mkfifo(note)
    t0 = time.monotonic()
    # A thread, so that a read that blocks fails the test instead of hanging it.
    pool = ThreadPoolExecutor(1)
    with pytest.raises(AlreadyRunning) as refused:
        pool.submit(state_lock.take, state).result(timeout=10)
    pool.shutdown(wait=False)
    assert "(another process) is already running" in str(refused.value)
    assert time.monotonic() - t0 < 5
    assert state_lock.holder(note) is None
    held.release()


def test_deleting_or_replacing_the_lock_file_does_not_let_a_second_daemon_in(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    held = state_lock.take(state, runtime_dir=tmp_path / "run")
    (state / state_lock.NAME).unlink()
    with pytest.raises(AlreadyRunning) as refused:
        state_lock.take(state)
    (state / state_lock.NAME).write_text("1\n")  # replaced by another file
    with pytest.raises(AlreadyRunning) as refused:
        state_lock.take(state, runtime_dir=tmp_path / "run")
    assert f"a state_dir (and runtime_dir {tmp_path / 'run'}) of its own" in str(refused.value)
    held.release()
    state_lock.take(state).release()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to leave a root-owned lock file")
def test_a_lock_file_left_by_root_does_not_keep_the_service_user_out() -> None:
    """A one-off `sudo mailgw run` left daemon.lock owned by root, mode 0600; the
    service user's daemon still takes the lock, and says who holds it."""
    with tempfile.TemporaryDirectory() as tmp:  # pytest's tmp_path is root's alone
        Path(tmp).chmod(0o755)
        _root_left_the_lock_file(Path(tmp) / "state")


def _root_left_the_lock_file(state: Path) -> None:
    state_lock.take(state).release()  # as root: the note is root's, 0600
    os.chown(state, 65534, 65534)
    assert (state / state_lock.NAME).stat().st_uid == 0
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; "
        "from gateway import state_lock; lock = state_lock.take(Path(sys.argv[2])); "
        "print('held'); sys.stdout.flush(); sys.stdin.read()"
    )
    # The system interpreter: the venv's may not be readable by nobody.
    proc = subprocess.Popen(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            script,
            str(client()),  # the checkout may be root's alone (/root/project)
            str(state),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line == "held\n", proc.stderr.read() if proc.stderr else ""
        with pytest.raises(AlreadyRunning) as refused:
            state_lock.take(state)
        assert f"(PID {proc.pid}) is already running" in str(refused.value)
    finally:
        proc.communicate("", timeout=10)


def _has_open(pid: int, path: Path) -> bool:
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) == str(path):
                    return True
    return False


def test_a_daemon_whose_outbox_open_hangs_still_stops_at_sigterm(tmp_path: Path, pki: Pki) -> None:
    """The outbox's open blocks (here another process holds its file locked: SQLite
    waits busy_timeout, 10 s, each try); SIGTERM ends the daemon at once, not when the
    wait is over."""
    cfg = daemon_config(tmp_path, pki, 9)  # no smarthost is ever reached
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    holder = sqlite3.connect(state / "outbox.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("CREATE TABLE held (x)")
    try:
        _stops_at_sigterm(cfg, state, tmp_path)
    finally:
        holder.close()


def _stops_at_sigterm(cfg: Path, state: Path, tmp_path: Path) -> None:
    daemon = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    assert daemon.proc is not None
    pid = daemon.proc.pid
    wait_for(lambda: _has_open(pid, state / "outbox.db"), 20, "the daemon in the outbox's open")
    daemon.proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    try:
        rc = daemon.proc.wait(10)
    except subprocess.TimeoutExpired:
        daemon.kill9()
        raise AssertionError("the daemon ignored SIGTERM while opening the outbox") from None
    took = time.monotonic() - t0
    print(f"exited {took:.1f} s after SIGTERM")
    assert rc == 0, daemon.log_text()
    assert took < 5, took
    assert "received SIGTERM" in daemon.log_text()


def test_a_second_daemon_refuses_when_the_lock_file_is_a_fifo(tmp_path: Path, pki: Pki) -> None:
    with SmtpServer(pki, "starttls") as smtp:
        cfg = daemon_config(tmp_path, pki, smtp.port)
        first = DaemonProcess(cfg, tmp_path / "first.log").start()
        try:
            first.wait_ready()
            note = tmp_path / "state" / state_lock.NAME
            note.unlink()
            os.mkfifo(note)
            second = DaemonProcess(cfg, tmp_path / "second.log").start()
            assert second.proc is not None
            try:
                rc = second.proc.wait(20)
            except subprocess.TimeoutExpired:
                second.kill9()
                raise AssertionError("the second daemon neither ran nor refused") from None
            assert rc == 1
            said = second.log_text()
            assert "another mailgw daemon (another process) is already running" in said, said
            assert f"runtime_dir {tmp_path / 'run'}" in said, said
            assert first.alive
        finally:
            assert first.terminate() == 0
