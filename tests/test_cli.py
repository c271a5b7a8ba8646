from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, run_cli
from tests.parts import DaemonProcess, stored_alerts, wait_for

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


# --- flush signals the daemon and nothing else ------------------------------------------


def run_cli_bytes(*args: str, input: bytes) -> subprocess.CompletedProcess[bytes]:
    """run_cli with stdin as raw bytes (run_cli's text mode cannot send b"\\xff")."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        input=input,
        capture_output=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def write_status(cfg: Path, pid: object, **extra: object) -> Path:
    runtime = Path(tomllib.loads(cfg.read_text())["gateway"]["runtime_dir"])
    runtime.mkdir(parents=True, exist_ok=True)
    path = runtime / "status.json"
    path.write_text(json.dumps({"pid": pid, "started_at": time.time(), **extra}))
    return path


USR1_CATCHER = (
    "import pathlib, signal, sys, time\n"
    "signal.signal(signal.SIGUSR1, lambda *a: pathlib.Path(sys.argv[1]).write_text('USR1'))\n"
    "print('ready', flush=True)\n"
    "time.sleep(30)\n"
)


def start_catcher(argv: list[str], **kw: Any) -> subprocess.Popen[str]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, **kw)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return proc


def test_flush_refuses_a_process_that_is_not_the_daemon(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    cfg = write_config(ROUTE)
    assert (
        run_cli("send", "-c", str(cfg), "--sensor", "s", "--severity", "info", "x").returncode == 0
    )
    # A live process of the state directory's owner, but not a mailgw daemon. (First, so
    # that code which signals whatever the file names fails here, on a process of ours.)
    flag = tmp_path / "signalled"
    other = start_catcher([sys.executable, "-c", USR1_CATCHER, str(flag)])
    try:
        write_status(cfg, other.pid)
        r = run_cli("flush", "-c", str(cfg))
        assert r.returncode == 1 and "not a mailgw daemon" in r.stderr, r.stderr
        assert "systemctl kill -s USR1 mailgw" in r.stderr
        r = run_cli("queue", "retry", "--all", "-c", str(cfg))  # signals quietly, if at all
        assert r.returncode == 0
        time.sleep(0.3)
        assert other.poll() is None and not flag.exists()
    finally:
        other.kill()
        other.wait()
    # A process that has exited.
    write_status(cfg, other.pid)
    r = run_cli("flush", "-c", str(cfg))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "systemctl kill -s USR1 mailgw" in r.stderr


# -1 would signal every process, 0 our own group, -N group N, 1 is init; a string, a
# bool or an int past pid_t is no pid either.
NOT_PIDS = (-1, 0, 1, -os.getpid(), "1234", True, 2**70, None, 1.5)


def test_status_file_with_a_pid_that_is_no_process_is_not_believed(tmp_path: Path) -> None:
    from gateway.status import read_runtime

    path = tmp_path / "status.json"
    for pid in NOT_PIDS:
        path.write_text(json.dumps({"pid": pid, "started_at": time.time()}))
        assert read_runtime(path) is None, pid
    path.write_text(json.dumps({"pid": os.getpid(), "started_at": 1.0}))
    assert read_runtime(path) is not None


UNSHARE_PID = ["unshare", "--pid", "--fork", "--mount-proc"]


def _pid_namespaces() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run([*UNSHARE_PID, "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _pid_namespaces(), reason="needs unshare(1) and a PID namespace")
def test_flush_refuses_pids_that_name_groups_or_init(write_config: Callable[..., Path]) -> None:
    # Run in a PID namespace and a session of its own: code that signalled these pids
    # (as mailgw did) would otherwise signal every process on the test machine, or
    # the test's own process group.
    cfg = write_config(ROUTE)
    assert (
        run_cli("send", "-c", str(cfg), "--sensor", "s", "--severity", "info", "x").returncode == 0
    )
    for pid in NOT_PIDS:
        write_status(cfg, pid)
        r = subprocess.run(
            [*UNSHARE_PID, sys.executable, "-m", "gateway", "flush", "-c", str(cfg)],
            start_new_session=True,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert r.returncode == 1, (pid, r.stderr)
        assert "Traceback" not in r.stderr and "systemctl kill -s USR1 mailgw" in r.stderr, pid


@pytest.mark.skipif(os.geteuid() != 0, reason="a process of another user needs root")
def test_flush_refuses_a_mailgw_run_of_another_user(write_config: Callable[..., Path]) -> None:
    # Looks like the daemon by its command line, but runs as nobody, not as the
    # owner of state_dir (root here): a status.json must not aim root's signal at it.
    cfg = write_config(ROUTE)
    assert (
        run_cli("send", "-c", str(cfg), "--sensor", "s", "--severity", "info", "x").returncode == 0
    )
    base = Path(tempfile.mkdtemp(dir="/var/tmp"))
    try:
        base.chmod(0o777)
        script = base / "mailgw"
        script.write_text(USR1_CATCHER.replace("sys.argv[1]", "sys.argv[2]"))
        script.chmod(0o755)
        flag = base / "signalled"
        # The venv's interpreter may live where nobody cannot read: any Python will do.
        python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
        try:
            fake = start_catcher([python, str(script), "run", str(flag)], user=65534)
        except PermissionError:
            pytest.skip(f"user 65534 cannot run {python}")
        try:
            write_status(cfg, fake.pid)
            r = run_cli("flush", "-c", str(cfg))
            assert r.returncode == 1 and "runs as uid 65534" in r.stderr, r.stderr
            time.sleep(0.3)
            assert fake.poll() is None and not flag.exists()
        finally:
            fake.kill()
            fake.wait()
    finally:
        shutil.rmtree(base)


def test_flush_signals_the_real_daemon(write_config: Callable[..., Path], tmp_path: Path) -> None:
    cfg = write_config(ROUTE)
    gw = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    try:
        gw.wait_ready()
        r = run_cli("flush", "-c", str(cfg))
        assert r.returncode == 0, r.stderr
        assert "asked the daemon" in r.stdout
        wait_for(lambda: "flush requested" in gw.log_text(), timeout=10, what="SIGUSR1")
        assert gw.alive
    finally:
        assert gw.terminate() == 0


# --- status survives whatever status.json holds -----------------------------------------


def test_status_survives_a_malformed_status_file(write_config: Callable[..., Path]) -> None:
    cfg = write_config(ROUTE)
    assert (
        run_cli("send", "-c", str(cfg), "--sensor", "s", "--severity", "info", "x").returncode == 0
    )
    path = write_status(cfg, os.getpid())
    live = os.getpid()  # a process that exists: the file is believed as far as it is sane
    bad = [
        "not json {",
        "",
        "[1, 2, 3]",
        '"a string"',
        "null",
        '{"pid": "123", "started_at": 1.0}',
        '{"pid": -1, "started_at": 1.0}',
        f'{{"pid": {live}}}',
        f'{{"pid": {live}, "started_at": "yesterday"}}',
        f'{{"pid": {live}, "started_at": 1e999}}',
        f'{{"pid": {live}, "started_at": 1.0, "uplink": 5, "sources": [1], '
        '"rejected": {"crc": "many", "7": 2}, "last_error": {"x": 1}, '
        '"last_error_at": "now", "next_probe_at": [], "outbox_full": "yes", '
        '"relay_attempts": 3, "ingested": null}',
        f'{{"pid": {live}, "started_at": 1.0, "uplink": "down", "next_probe_at": "soon"}}',
        "[" * 100000,
    ]
    for text in bad:
        path.write_text(text)
        r = run_cli("status", "-c", str(cfg))
        assert r.returncode == 0 and "Traceback" not in r.stderr, (text[:80], r.stderr)
        assert "1 queued" in r.stdout
        r = run_cli("status", "--json", "-c", str(cfg))
        assert r.returncode == 0, (text[:80], r.stderr)
        report = json.loads(r.stdout)
        assert report["queued"] == 1
        if report["daemon"]["running"]:
            assert report["daemon"]["pid"] == live and isinstance(report["rejected"], dict)
            assert report["last_error"] is None
        else:
            assert report["daemon"]["pid"] is None


# --- mailgw send takes bytes -----------------------------------------------------------


def test_send_stores_non_utf8_stdin_with_a_note(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    cfg = str(write_config(ROUTE))
    r = run_cli_bytes(
        "send",
        "-c",
        cfg,
        "--sensor",
        "probe",
        "--severity",
        "warning",
        input=b"temp \xff\xfe high\n",
    )
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    alert_id = r.stdout.decode().strip()
    assert stored_alerts(tmp_path / "state" / "outbox.db") == [
        ("local/probe", "temp \ufffd\ufffd high", alert_id)
    ]
    shown = json.loads(run_cli("queue", "show", alert_id, "-c", cfg).stdout)
    assert shown["notes"] == ["non_utf8"] and shown["message"] == "temp \ufffd\ufffd high"
    # A non-UTF-8 argument (a shell's $'\xff') is taken the same way.
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "send",
            "-c",
            cfg,
            "--sensor",
            "p",
            "--severity",
            "info",
            "--topic",
            os.fsdecode(b"t/\xfe"),
            os.fsdecode(b"x\xffy"),
        ],
        capture_output=True,
        timeout=60,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    assert ("t/\ufffd", "x\ufffdy", r.stdout.decode().strip()) in stored_alerts(
        tmp_path / "state" / "outbox.db"
    )


# --- no control character reaches the terminal raw ---------------------------------------

RAW = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202e]")


def test_listings_escape_control_characters(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    from gateway.alert import Alert, Severity
    from gateway.clock import Stamp
    from gateway.config import load
    from gateway.outbox import Outbox, Routed
    from gateway.routing import Router

    cfg_path = write_config(ROUTE)
    cfg = str(cfg_path)
    r = run_cli("send", "-c", cfg, "--sensor", "s", "--severity", "info", "fake\rOK row\x1b[2J")
    assert r.returncode == 0, r.stderr
    sent_id = r.stdout.strip()
    # normalize() strips ESC from what `send` takes; an alert from elsewhere (an older
    # version, the serial bridge) may still hold one, and SMTP replies hold anything.
    hostile = "clear\x1b[2J\x1b]0;title\x07 csi\x9b31m rtl\u202eevil\u2028next\rover"
    config = load(cfg_path)
    ob = Outbox(config.outbox_path, max_messages=100)
    a = Alert(
        id="01a22bf6-0000-7000-8000-0000000000ee",
        topic="local/s",
        source="local",
        sensor="s",
        severity=Severity.WARNING,
        message=hostile,
        received=Stamp.now(),
    )
    ob.add([Routed(a, Router(config.routes).route(a))])
    ob.close()
    smtp_reply = "421 4.3.0 busy\r\x1b[1A\x1b[2Kall clear\x1b[0m"
    conn = sqlite3.connect(config.outbox_path)
    with conn:
        conn.execute("UPDATE delivery SET last_error = ?", (smtp_reply,))
    conn.close()

    listing = run_cli("queue", "list", "-c", cfg)
    assert listing.returncode == 0, listing.stderr
    assert RAW.search(listing.stdout) is None, repr(listing.stdout)
    assert "fake\\rOK row" in listing.stdout and "clear\\x1b[2J" in listing.stdout
    assert "421 4.3.0 busy\\r\\x1b[1A" in listing.stdout
    rows = json.loads(run_cli("queue", "list", "--json", "-c", cfg).stdout)
    assert {r["message"] for r in rows} == {"fake\rOK row[2J", hostile}
    assert {r["last_error"] for r in rows} == {smtp_reply}

    for alert_id, message in ((sent_id, "fake\rOK row[2J"), (a.id, hostile)):
        shown = run_cli("queue", "show", alert_id, "-c", cfg)
        assert shown.returncode == 0 and RAW.search(shown.stdout) is None, repr(shown.stdout)
        data = json.loads(shown.stdout)
        assert data["message"] == message and data["deliveries"][0]["last_error"] == smtp_reply

    write_status(
        cfg_path,
        os.getpid(),
        last_error=smtp_reply,
        last_error_at=time.time(),
        uplink="down\x1b[2J",
        sources={"mqtt\r": "refused (\x1b[31mbad\x1b[0m)"},
        rejected={"crc\x1b[2J": 3},
    )
    status = run_cli("status", "-c", cfg)
    assert status.returncode == 0, status.stderr
    assert RAW.search(status.stdout) is None, repr(status.stdout)
    assert "421 4.3.0 busy\\r\\x1b[1A" in status.stdout
    assert json.loads(run_cli("status", "--json", "-c", cfg).stdout)["last_error"] == smtp_reply
