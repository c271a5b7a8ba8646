"""`sendmail` end to end: a non-root caller, the maildrop, a real daemon, a real
smarthost (aiosmtpd). The caller runs as `nobody` under the system python with only
the stdlib and the worktree on its path: what cron would run."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path

import pytest

from gateway.sendmail_compose import mail_name
from tests.conftest import run_cli
from tests.parts import DaemonProcess, Pki, SmtpServer, daemon_config, wait_for

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv") or not os.path.exists(SYSTEM_PYTHON),
    reason="needs root (to run sendmail as nobody), setpriv and /usr/bin/python3",
)


@pytest.fixture
def spool() -> Iterator[Path]:
    """A maildrop as the package makes it (3733), where `nobody` can reach it."""
    top = Path(tempfile.mkdtemp(prefix="mailgw-spool-"))
    top.chmod(0o755)
    drop = top / "maildrop"
    drop.mkdir()
    drop.chmod(0o3733)
    yield drop
    shutil.rmtree(top)


def config(tmp: Path, pki: Pki, port: int, drop: Path, extra: str = "") -> Path:
    cfg = daemon_config(tmp, pki, port)
    cfg.write_text(
        cfg.read_text()
        + f'[sendmail]\nmaildrop = "{drop}"\n{extra}'
        + '[sendmail.aliases]\nroot = "ops"\n"*" = "ops"\n'
    )
    return cfg


_CLIENT: list[Path] = []


def client() -> Path:
    """Where `nobody` finds the package: the checkout may sit where only root can read
    (/root/project on a fresh Debian), so the client runs from a world-readable copy."""
    if not _CLIENT:
        top = Path(tempfile.mkdtemp(prefix="mailgw-client-"))
        atexit.register(shutil.rmtree, top, True)
        shutil.copytree(
            ROOT / "gateway", top / "gateway", ignore=shutil.ignore_patterns("__pycache__")
        )
        for path in (top, *top.rglob("*")):
            path.chmod(0o755 if path.is_dir() else 0o644)
        _CLIENT.append(top)
    return _CLIENT[0]


def sendmail(
    drop: Path, args: list[str], message: bytes, user: str = "nobody"
) -> subprocess.CompletedProcess[bytes]:
    cmd = [SYSTEM_PYTHON, "-m", "gateway.sendmail", *args]
    if user != "root":
        cmd = ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups", *cmd]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(client()), "MAILGW_MAILDROP": str(drop)}
    return subprocess.run(
        cmd,
        input=message,
        capture_output=True,
        timeout=30,
        cwd="/tmp",
        env={**env, "LOGNAME": user},
    )


def raw_rows(tmp: Path) -> int:
    db = tmp / "state" / "outbox.db"
    if not db.exists():
        return 0
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT count(*) FROM raw_message").fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


def spooled(drop: Path) -> list[str]:
    return [n for n in os.listdir(drop) if not n.startswith(".")]


CRON_MAIL = (
    b"From: root (Cron Daemon)\n"
    b"To: root\n"
    b"Subject: Cron <nobody@gw> /usr/local/bin/check-disk\n"
    b"MIME-Version: 1.0\n"
    b"Content-Type: text/plain; charset=UTF-8\n"
    b"Content-Transfer-Encoding: 8bit\n"
    b"\n"
    b"/dev/mmcblk0p2 is 93% full\n"
    b".\n"
    b"(a lone dot above: kept, this is -i)\n"
)


def test_cron_style_mail_from_a_non_root_user_reaches_the_smarthost(
    tmp_path: Path, pki: Pki, spool: Path
) -> None:
    with SmtpServer(pki, "starttls") as smtp:
        gw = DaemonProcess(config(tmp_path, pki, smtp.port, spool), tmp_path / "d.log").start()
        gw.wait_ready()
        # what cron runs: sendmail -FCronDaemon -i -odi -oem -oi -t -f root
        r = sendmail(
            spool, ["-FCronDaemon", "-i", "-odi", "-oem", "-oi", "-t", "-f", "root"], CRON_MAIL
        )
        assert r.returncode == 0, r.stderr
        # recipients on the command line, no -t; -v and -N are ignored as sendmail does
        r2 = sendmail(
            spool, ["-oi", "-v", "-N", "never", "alice@example.com"], b"Subject: hi\n\nbody\n"
        )
        assert r2.returncode == 0, r2.stderr
        got = sorted(smtp.wait_for(2, timeout=30), key=lambda m: m.recipients)
        cron, hi = got[1], got[0]
        assert hi.recipients == ["alice@example.com"]
        assert cron.recipients == ["ops@example.com"]  # root → route ops
        for m in got:
            assert m.sender == "gw@example.com"  # the envelope the smarthost accepts
            assert m.message["X-Mailgw-Submitted-By"] == "uid 65534"  # nobody, kernel-attested
            assert m.message["Message-ID"]
            assert m.message["Date"]
        assert cron.message["From"] == "CronDaemon <gw@example.com>"
        # A local name is qualified as Debian's MTAs do; no Reply-To to an address that
        # receives no mail (gateway/sendmail_compose.py).
        assert cron.message["X-Original-From"] == f"Cron Daemon <root@{mail_name()}>"
        assert cron.message["Reply-To"] is None
        assert cron.message["To"] == f"root@{mail_name()}"
        assert cron.message["Subject"] == "Cron <nobody@gw> /usr/local/bin/check-disk"
        body = cron.data.split(b"\r\n\r\n", 1)[1]
        assert body == CRON_MAIL.split(b"\n\n", 1)[1].replace(b"\n", b"\r\n")
        assert spooled(spool) == []
        assert gw.terminate() == 0


def _mime(crlf: bool) -> tuple[bytes, bytes]:
    attachment = os.urandom(150_000) + bytes(range(256))
    msg = EmailMessage()
    msg["From"] = "smartd <root@gw>"
    msg["To"] = "bob@example.com"
    msg["Subject"] = "SMART error (ATA error count increased) detected on host: gw"
    msg["Message-ID"] = "<smartd.1234@gw>"
    msg.set_content("Device: /dev/sda [SAT], ATA error count increased from 0 to 3\n")
    msg.add_attachment(
        attachment, maintype="application", subtype="octet-stream", filename="log.bin"
    )
    data = msg.as_bytes(policy=SMTP) if crlf else msg.as_bytes()
    return data, attachment


@pytest.mark.parametrize("crlf", [True, False], ids=["crlf", "lf"])
def test_a_mime_message_with_an_attachment_arrives_byte_identical(
    tmp_path: Path, pki: Pki, spool: Path, crlf: bool
) -> None:
    data, attachment = _mime(crlf)
    with SmtpServer(pki, "starttls") as smtp:
        gw = DaemonProcess(config(tmp_path, pki, smtp.port, spool), tmp_path / "d.log").start()
        gw.wait_ready()
        r = sendmail(spool, ["-t", "-oi"], data)
        assert r.returncode == 0, r.stderr
        (got,) = smtp.wait_for(1, timeout=30)
        assert got.recipients == ["bob@example.com"]
        assert got.message_id == "<smartd.1234@gw>"  # its own Message-ID is kept
        sent_body = got.data.split(b"\r\n\r\n", 1)[1]
        want = data.split(b"\r\n\r\n" if crlf else b"\n\n", 1)[1]
        # CRLF as written: byte for byte. Bare LF: each made CRLF, nothing else.
        assert sent_body == (want if crlf else want.replace(b"\n", b"\r\n"))
        (part,) = [p for p in got.message.iter_attachments()]
        assert part.get_content() == attachment
        gw.terminate()


def test_a_message_over_the_limit_is_refused_and_nothing_is_stored(
    tmp_path: Path, pki: Pki, spool: Path
) -> None:
    with SmtpServer(pki, "starttls") as smtp:
        cfg = config(tmp_path, pki, smtp.port, spool, extra='max_size = "64 KiB"\n')
        gw = DaemonProcess(cfg, tmp_path / "d.log").start()
        gw.wait_ready()
        wait_for(lambda: (spool / ".max_size").exists(), what="the daemon published its limit")
        big = b"To: root\nSubject: big\n\n" + b"x" * 70_000 + b"\n"
        r = sendmail(spool, ["-t", "-i"], big)
        assert r.returncode == 65
        assert b"larger than the limit of 65536 bytes" in r.stderr
        assert spooled(spool) == []
        ok = sendmail(spool, ["-i", "root"], b"Subject: small\n\nfits\n")
        assert ok.returncode == 0
        (got,) = smtp.wait_for(1, timeout=30)
        assert got.message["Subject"] == "small"
        assert raw_rows(tmp_path) == 1  # only the one that fits
        gw.terminate()


def test_mail_injected_while_the_smarthost_is_down_is_delivered_when_it_returns(
    tmp_path: Path, pki: Pki, spool: Path
) -> None:
    smtp = SmtpServer(pki, "starttls")  # not started: the smarthost is down
    gw = DaemonProcess(config(tmp_path, pki, smtp.port, spool), tmp_path / "d.log").start()
    gw.wait_ready()
    for i in range(3):
        r = sendmail(spool, ["-i", "root"], f"Subject: while down {i}\n\nbody {i}\n".encode())
        assert r.returncode == 0, r.stderr
    wait_for(lambda: raw_rows(tmp_path) == 3, what="three messages stored")
    smtp.start()
    try:
        got = smtp.wait_for(3, timeout=40)
        assert sorted(str(m.message["Subject"]) for m in got) == [
            f"while down {i}" for i in range(3)
        ]
    finally:
        smtp.stop()
        gw.terminate()


def test_kill_9_after_sendmail_returned_still_delivers(
    tmp_path: Path, pki: Pki, spool: Path
) -> None:
    smtp = SmtpServer(pki, "starttls")  # down until the end, so nothing leaves early
    cfg = config(tmp_path, pki, smtp.port, spool)
    gw = DaemonProcess(cfg, tmp_path / "d.log").start()
    gw.wait_ready()
    assert sendmail(spool, ["-i", "root"], b"Subject: one\n\nbefore the kill\n").returncode == 0
    gw.kill9()  # at once: picked up or not, the mail is on the disk
    assert sendmail(spool, ["-i", "root"], b"Subject: two\n\nwhile it is dead\n").returncode == 0
    smtp.start()
    try:
        gw.start()
        got = smtp.wait_for(2, timeout=40)
        assert sorted(str(m.message["Subject"]) for m in got) == ["one", "two"]
        assert spooled(spool) == []
    finally:
        smtp.stop()
        gw.terminate()


def test_hostile_maildrop_files_are_counted_rejections_and_intake_goes_on(
    tmp_path: Path, pki: Pki, spool: Path
) -> None:
    with SmtpServer(pki, "starttls") as smtp:
        cfg = config(tmp_path, pki, smtp.port, spool, extra='max_size = "64 KiB"\n')
        (spool / "garbage").write_bytes(b"\x00\xffnot a drop file")
        with (spool / "huge").open("wb") as f:
            f.write(b"MAILGW-DROP 1\nU x\nR root\n\n")
            f.truncate(10 * 1024 * 1024)  # sparse: big to read, cheap to make
        (spool / "link").symlink_to("/etc/passwd")
        os.mkfifo(spool / "fifo")
        (spool / "dir").mkdir()
        for name in ("garbage", "huge", "fifo"):
            (spool / name).chmod(0o640)  # "complete", as sendmail leaves a file
        gw = DaemonProcess(cfg, tmp_path / "d.log").start()
        gw.wait_ready()
        assert sendmail(spool, ["-i", "root"], b"Subject: good\n\nstill works\n").returncode == 0
        (got,) = smtp.wait_for(1, timeout=30)
        assert got.message["Subject"] == "good"
        rejected = spool.parent / "rejected"
        wait_for(lambda: len(os.listdir(rejected)) == 5, what="five files moved aside")
        assert spooled(spool) == []
        kinds = {n.split("-", 1)[1] for n in os.listdir(rejected)}
        assert kinds == {"garbage", "huge", "link", "fifo", "dir"}
        assert stat.S_ISFIFO(os.lstat(next(rejected.glob("*-fifo"))).st_mode)  # moved, unread

        def counted() -> bool:
            st = gw.status()
            r = st["rejected"] if st else {}
            return sum(v for k, v in r.items() if k.startswith("maildrop_")) == 5

        wait_for(counted, what="five counted rejections in status")
        st = gw.status()
        assert st is not None
        assert st["rejected"]["maildrop_link"] == 1
        assert st["rejected"]["maildrop_too_large"] == 1
        assert st["rejected"]["maildrop_not_file"] == 2
        assert st["rejected"]["maildrop_malformed"] == 1
        assert gw.alive
        gw.terminate()


def test_a_reload_changes_where_local_mail_goes_and_mailq_shows_it_waiting(
    tmp_path: Path, pki: Pki, spool: Path
) -> None:
    smtp = SmtpServer(pki, "starttls")  # down at first: the mail waits, for mailq to list
    cfg = config(tmp_path, pki, smtp.port, spool)
    gw = DaemonProcess(cfg, tmp_path / "d.log").start()
    gw.wait_ready()
    cfg.write_text(
        cfg.read_text().replace('root = "ops"', 'root = "night"')
        + '[[route]]\nname = "night"\nmatch = "never/#"\nto = ["night@example.com"]\n'
    )
    assert gw.proc is not None
    gw.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reloaded routes" in gw.log_text(), what="the reload")
    assert sendmail(spool, ["-i", "root"], b"Subject: after reload\n\nx\n").returncode == 0
    wait_for(lambda: raw_rows(tmp_path) == 1, what="the mail stored")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MAILGW_CONFIG": str(cfg)}
    env["MAILGW_MAILDROP"] = str(spool)
    mailq = subprocess.run(
        [sys.executable, "-m", "gateway.sendmail", "-bp"], capture_output=True, text=True, env=env
    )
    assert mailq.returncode == 0, mailq.stderr
    assert " night " in mailq.stdout and " root\n" not in mailq.stdout, mailq.stdout
    smtp.start()
    try:
        (got,) = smtp.wait_for(1, timeout=40)
        assert got.recipients == ["night@example.com"]
    finally:
        smtp.stop()
        gw.terminate()


def test_a_non_ascii_local_name_in_to_from_or_cc_is_sent_and_the_daemon_goes_on(
    tmp_path: Path, pki: Pki, spool: Path
) -> None:
    """`To: jérôme` once raised in the rewrite on every claim: the daemon exited at
    each start and the mail never left the queue. It goes as written now."""
    with SmtpServer(pki, "starttls") as smtp:
        cfg = config(tmp_path, pki, smtp.port, spool)
        gw = DaemonProcess(cfg, tmp_path / "d.log").start()
        try:
            gw.wait_ready()
            for header in ("To: jérôme", "From: jérôme", "Cc: Zoë <zoë>"):
                msg = f"{header}\nSubject: hi {header[:2]}\n\nbody\n".encode()
                r = sendmail(spool, ["-i", "root"], msg)
                assert r.returncode == 0, r.stderr
            got = smtp.wait_for(3, timeout=30)
            heads = b"\n".join(m.data.split(b"\r\n\r\n", 1)[0] for m in got)
            assert "To: jérôme".encode() in heads
            assert "X-Original-From: jérôme".encode() in heads
            assert "Cc: Zoë <zoë>".encode() in heads
            assert all(m.recipients == ["ops@example.com"] for m in got)
            r = run_cli("send", "-c", str(cfg), "--sensor", "s", "--severity", "critical", "after")
            assert r.returncode == 0, r.stderr
            wait_for(lambda: len(smtp.received) == 4, timeout=30, what="the alert after them")
            assert gw.alive, gw.log_text()[-3000:]
        finally:
            if gw.alive:
                gw.terminate()
