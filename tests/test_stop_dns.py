"""SIGTERM ends the daemon by the stop deadline while the MQTT broker's name is being
looked up in a DNS that never answers (gateway/sources/mqtt.py: paho's network thread
is stuck in the lookup; stopping it is bounded). The real daemon runs in a mount
namespace of its own whose /etc/resolv.conf names nameservers that swallow queries."""

from __future__ import annotations

import contextlib
import os
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from subprocess import Popen

import pytest

from gateway import service
from tests.conftest import ROOT, run_cli
from tests.parts import Pki, SmtpServer, can_unshare_mount, daemon_config, wait_for

pytestmark = pytest.mark.skipif(
    not can_unshare_mount(),
    reason="needs root and a private mount namespace for its own /etc/resolv.conf",
)


class SwallowingDns:
    """Nameservers on loopback that take every query and never answer."""

    def __init__(self) -> None:
        net = f"127.53.{random.randrange(1, 255)}"  # not another test's addresses
        self.addresses = [f"{net}.{i}" for i in (1, 2, 3)]
        self._socks = []
        for ip in self.addresses:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((ip, 53))
            self._socks.append(s)
        self.queries = 0
        self._stop = threading.Event()
        threading.Thread(target=self._swallow, daemon=True).start()

    def _swallow(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select(self._socks, [], [], 0.2)
            for s in ready:
                with contextlib.suppress(OSError):
                    s.recv(4096)
                    self.queries += 1

    def resolv_conf(self, path: Path) -> Path:
        lines = [f"nameserver {ip}" for ip in self.addresses]
        path.write_text("\n".join([*lines, "options timeout:10 attempts:2", ""]))
        return path

    def close(self) -> None:
        self._stop.set()
        for s in self._socks:
            s.close()


@pytest.fixture
def dns() -> Iterator[SwallowingDns]:
    d = SwallowingDns()
    yield d
    d.close()


def _daemon_behind(
    dns: SwallowingDns, cfg: Path, log_path: Path, hostname: str = ""
) -> Popen[bytes]:
    """`mailgw run -c cfg` in a mount namespace whose resolv.conf names `dns` (and, given
    a `hostname`, a UTS namespace where that is the host's name)."""
    resolv = dns.resolv_conf(cfg.parent / "resolv.conf")
    uts = ["--uts"] if hostname else []
    name = f'hostname "{hostname}" && ' if hostname else ""
    with log_path.open("ab") as log:
        # exec: the daemon is the process that gets SIGTERM.
        return subprocess.Popen(
            [
                "unshare", "--mount", "--propagation", "private", *uts, "sh", "-c",
                f'{name}mount --bind "$1" /etc/resolv.conf && '
                'exec "$2" -m gateway run -c "$3"',
                "sh", str(resolv), sys.executable, str(cfg),
            ],
            cwd=ROOT,
            stdout=log,
            stderr=log,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip


def test_sigterm_ends_the_daemon_in_time_while_the_brokers_dns_hangs(
    tmp_path: Path, pki: Pki, dns: SwallowingDns
) -> None:
    cfg = daemon_config(tmp_path, pki, 9)  # no smarthost: none is needed
    cfg.write_text(
        cfg.read_text()
        + '[mqtt]\nhost = "broker.example.net"\nport = 1883\ntopics = ["alerts/#"]\n'
    )
    log_path = tmp_path / "daemon.log"
    proc = _daemon_behind(dns, cfg, log_path)
    try:
        wait_for(lambda: dns.queries > 0 or proc.poll() is not None, 30, "the broker's lookup")
        assert proc.poll() is None, log_path.read_text()
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        try:
            rc = proc.wait(40)
        except subprocess.TimeoutExpired:
            raise AssertionError("the daemon did not exit within 40 s of SIGTERM") from None
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    said = log_path.read_text()
    print(f"exited {took:.1f} s after SIGTERM")
    assert took < service.EXIT_WITHIN, f"{took:.1f} s\n{said}"
    assert rc == 0, said
    assert "the MQTT network thread did not stop within 3 s" in said, said


def test_the_relay_starts_and_sends_while_dns_does_not_answer_for_our_own_name(
    tmp_path: Path, pki: Pki, dns: SwallowingDns
) -> None:
    """A host name /etc/hosts does not know: the full name for EHLO is asked of DNS,
    which never answers. The relay gives up on it after FQDN_WITHIN and sends."""
    from gateway import relay

    with SmtpServer(pki, "starttls") as smtp:
        cfg = daemon_config(tmp_path, pki, smtp.port)
        log_path = tmp_path / "daemon.log"
        proc = _daemon_behind(dns, cfg, log_path, hostname="gw-unknown-to-dns")
        try:
            t0 = time.monotonic()
            r = run_cli("send", "-c", str(cfg), "--sensor", "s", "--severity", "critical", "one")
            assert r.returncode == 0, r.stderr
            (got,) = smtp.wait_for(1, timeout=relay.FQDN_WITHIN + 20)
            took = time.monotonic() - t0
            print(f"sent {took:.1f} s after the start")
            said = log_path.read_text()
            assert "one" in got.message["Subject"]
            assert dns.queries > 0
            assert "took over 5 s (DNS is not answering); greeting smarthosts as " in said, said
            proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            assert proc.wait(30) == 0
            took = time.monotonic() - t0
            # Nothing waits for the lookup still under way: it is not the loop's.
            assert took < 5, f"exited {took:.1f} s after SIGTERM"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
