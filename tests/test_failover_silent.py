"""A primary smarthost that stops answering in the middle of a session costs one
smtp.timeout before the fallback sends, not two (gateway/relay.py): the silent host
(it accepts connections, says nothing) and the blackholed one (packets dropped).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.parts import Gateway, Pki, SmtpServer, alert, smtp_conf, wait_for

TIMEOUT = 5.0
# One smtp.timeout, and room for the probe and the fallback's own session (TLS, AUTH)
# on a busy machine; a second timeout (the old way) does not fit.
BOUND = TIMEOUT + 4.0


class SilentProxy:
    """TCP in front of a real smarthost that can go silent: from `silence()` on, it
    forwards nothing either way and greets no new connection, but accepts them and keeps
    them open, as a hung server or a middlebox that stopped passing data does."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.silent = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._socks: list[socket.socket] = []
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def silence(self) -> None:
        self.silent.set()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._socks.append(client)
            if self.silent.is_set():
                continue  # accepted, never greeted
            server = socket.create_connection(("127.0.0.1", self.upstream))
            self._socks.append(server)
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if not self.silent.is_set():
                    dst.sendall(data)

    def close(self) -> None:
        self._stop.set()
        for s in [self._listener, *self._socks]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


@contextlib.contextmanager
def blackholed(port: int) -> Iterator[None]:
    """Drop every packet to and from `port` on loopback (iptables), as a path that died
    does; the rules are removed whatever happens."""
    rules = [["-p", "tcp", "--dport", str(port)], ["-p", "tcp", "--sport", str(port)]]
    added: list[list[str]] = []
    try:
        for rule in rules:
            subprocess.run(["iptables", "-I", "INPUT", "-i", "lo", *rule, "-j", "DROP"], check=True)
            added.append(rule)
        yield
    finally:
        for rule in added:
            subprocess.run(
                ["iptables", "-D", "INPUT", "-i", "lo", *rule, "-j", "DROP"], check=False
            )


def _conf(primary_port: int, fallback: SmtpServer, pki: Pki, pw: Path) -> str:
    primary = SmtpServer(pki, "starttls", port=primary_port)  # only its port is used
    return smtp_conf(
        primary,
        pki,
        extra=(
            f'password_file = "{pw}"\n'
            "[[smtp.fallback]]\n"
            f'host = "127.0.0.1"\nport = {fallback.port}\nca_file = "{pki.ca_file}"\n'
            f'username = "gw@example.com"\npassword_file = "{pw}"\n'
        ),
    ).replace('timeout = "3s"', f'timeout = "{TIMEOUT:g}s"')


def _fails_over(
    gw: Gateway, primary: SmtpServer, fallback: SmtpServer, go_quiet: Callable[[], None]
) -> tuple[float, str]:
    """A first mail through the primary (its session stays open), then the primary goes
    quiet and a second alert comes: seconds until the fallback has it, and the primary's
    last error."""
    gw.add(alert("through the primary"))
    primary.wait_for(1, timeout=20)
    wait_for(lambda: gw.counts()["sent"] == 1, what="its 250 seen")  # then the session idles
    go_quiet()
    t0 = time.monotonic()
    gw.add(alert("through the fallback"))
    (got,) = fallback.wait_for(1, timeout=40)
    took = time.monotonic() - t0
    print(f"the fallback sent {took:.1f} s after the alert came (smtp.timeout {TIMEOUT:g} s)")
    assert "through the fallback" in got.message["Subject"]
    wait_for(lambda: gw.counts()["sent"] == 2, what="both sent")
    assert gw.counts()["dead"] == 0
    return took, str(gw.runtime.hosts[0]["last_error"])


def test_a_primary_that_goes_silent_mid_session_costs_one_timeout(
    pki: Pki, make_gateway: Callable[..., Gateway], password_file: Path
) -> None:
    with SmtpServer(pki, "starttls") as primary, SmtpServer(pki, "starttls") as fallback:
        proxy = SilentProxy(primary.port)
        try:
            gw = make_gateway(_conf(proxy.port, fallback, pki, password_file))
            took, error = _fails_over(gw, primary, fallback, proxy.silence)
            assert took < BOUND, f"the fallback sent {took:.1f} s after the alert came"
            assert "session failed during delivery" in error, error
            assert "(it stopped answering; it accepts connections)" in error, error
            assert gw.runtime.hosts[0]["state"] == "down"
        finally:
            proxy.close()


@pytest.mark.skipif(
    shutil.which("iptables") is None or os.geteuid() != 0,
    reason="needs iptables and root (Debian package iptables)",
)
def test_a_primary_blackholed_mid_session_costs_one_timeout(
    pki: Pki, make_gateway: Callable[..., Gateway], password_file: Path
) -> None:
    with SmtpServer(pki, "starttls") as primary, SmtpServer(pki, "starttls") as fallback:
        gw = make_gateway(_conf(primary.port, fallback, pki, password_file))
        stack = contextlib.ExitStack()
        with stack:
            took, error = _fails_over(
                gw, primary, fallback, lambda: stack.enter_context(blackholed(primary.port))
            )
            assert took < BOUND, f"the fallback sent {took:.1f} s after the alert came"
            assert "(it stopped answering; it no longer accepts connections)" in error, error
            # Down as a path: cheap TCP probes, not sessions, until it answers again.
            assert gw.relay.hosts[0].uplink.tcp_probe_at < float("inf")
