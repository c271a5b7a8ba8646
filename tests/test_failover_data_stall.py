"""A primary smarthost that answers 354 to DATA and then stops reading: a large local
mail (the bytes path, gateway/smtp_data.py) fills the socket buffers and waits on
them; that wait has smtp.timeout like a reply, after which the relay gives the host up
as one that went silent and the fallback sends. A real daemon, a real `sendmail` as
nobody, a real socket server that stalls and aiosmtpd as the fallback."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.parts import DaemonProcess, Pki, SmtpServer, gateway_toml, wait_for, write_password
from tests.test_sendmail_daemon import pytestmark as needs_root_and_setpriv
from tests.test_sendmail_daemon import sendmail

pytestmark = needs_root_and_setpriv

TIMEOUT = 3.0
# One smtp.timeout, then the probe and the fallback's own session (TLS, AUTH, 9 MB)
# on a busy machine; waiting for ever (the old way) does not fit.
BOUND = TIMEOUT + 12.0


class StallsAfter354:
    """An SMTP server on loopback (no TLS, no AUTH) that answers EHLO, MAIL, RCPT and
    DATA (354), then reads nothing more on that connection and keeps it open."""

    def __init__(self) -> None:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Small buffers, inherited by accepted sockets: the stall shows after a few MB.
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(8)
        self.port = self._listener.getsockname()[1]
        self.stalls = 0
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self._listener.accept()
                self._socks.append(conn)
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            conn.sendall(b"220 stalls ESMTP\r\n")
            f = conn.makefile("rb")
            while line := f.readline():
                cmd = line[:4].upper()
                if cmd == b"EHLO":
                    conn.sendall(b"250-stalls\r\n250 SIZE 50000000\r\n")
                elif cmd == b"DATA":
                    conn.sendall(b"354 go on\r\n")
                    self.stalls += 1
                    return  # reads nothing more; the socket stays open
                elif cmd == b"QUIT":
                    conn.sendall(b"221 bye\r\n")
                    return
                else:
                    conn.sendall(b"250 ok\r\n")

    def close(self) -> None:
        for s in [self._listener, *self._socks]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


@pytest.fixture
def spool() -> Iterator[Path]:
    import shutil
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="mailgw-spool-"))
    top.chmod(0o755)
    drop = top / "maildrop"
    drop.mkdir()
    drop.chmod(0o3733)
    yield drop
    shutil.rmtree(top)


def _config(tmp: Path, pki: Pki, primary: int, fallback: int, drop: Path) -> Path:
    pw = write_password(tmp / "pw")
    cfg = tmp / "gw.toml"
    cfg.write_text(
        gateway_toml(tmp, "gw-stall")
        + f'[smtp]\nhost = "127.0.0.1"\nport = {primary}\ntls = "none"\n'
        f'from = "gw@example.com"\ntimeout = "{TIMEOUT:g}s"\nmin_backoff = "1s"\n'
        'probe_max = "2s"\nthrottle_max = "1s"\nreturn_jitter = "0s"\n'
        f'[[smtp.fallback]]\nhost = "127.0.0.1"\nport = {fallback}\n'
        f'ca_file = "{pki.ca_file}"\nusername = "gw@example.com"\npassword_file = "{pw}"\n'
        f'[sendmail]\nmaildrop = "{drop}"\n'
        '[sendmail.aliases]\nroot = "ops"\n"*" = "ops"\n'
        '[[route]]\nname = "ops"\nmatch = "#"\nto = ["ops@example.com"]\n'
    )
    return cfg


def test_a_primary_that_stops_reading_after_354_fails_over_within_a_timeout(
    tmp_path: Path, pki: Pki, spool: Path
) -> None:
    primary = StallsAfter354()
    try:
        with SmtpServer(pki, "starttls") as fallback:
            cfg = _config(tmp_path, pki, primary.port, fallback.port, spool)
            daemon = DaemonProcess(cfg, tmp_path / "daemon.log").start()
            try:
                daemon.wait_ready()
                wait_for(lambda: (spool / ".max_size").exists(), what="the maildrop's limit")
                body = (b"y" * 998 + b"\n") * 9000  # about 9 MB: more than the buffers hold
                r = sendmail(spool, ["-i", "root"], b"Subject: big local mail\n\n" + body)
                assert r.returncode == 0, r.stderr
                t0 = time.monotonic()
                (got,) = fallback.wait_for(1, timeout=BOUND + 30)
                took = time.monotonic() - t0
                print(f"the fallback had it {took:.1f} s after sendmail returned")
                assert primary.stalls >= 1  # it did go through the primary's DATA first
                assert got.message["Subject"] == "big local mail"
                assert took < BOUND, f"{took:.1f} s"
                said = daemon.log_text()
                assert "the server stopped reading the message (3 s)" in said, said[-3000:]
            finally:
                assert daemon.terminate() == 0
    finally:
        primary.close()
