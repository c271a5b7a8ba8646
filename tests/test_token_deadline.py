"""A token endpoint that answers slowly, a byte at a time (gateway/oauth.py): the whole
request has a deadline, the relay moves to [[smtp.fallback]], status names the endpoint,
and SIGTERM ends the daemon while the endpoint still trickles."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway import oauth
from gateway.oauth import TokenUnavailable
from tests.conftest import run_cli
from tests.parts import (
    DaemonProcess,
    Gateway,
    Pki,
    SmtpServer,
    alert,
    daemon_config,
    smtp_conf,
    wait_for,
)
from tests.token_endpoint import TokenEndpoint


def test_a_trickling_answer_ends_at_the_request_deadline(pki: Pki) -> None:
    """Headers at once, then a byte every 0.3 s: each read is quick, the request is not."""
    with TokenEndpoint(pki) as ep:
        ep.trickle = 0.3
        got: list[BaseException | tuple[int, bytes]] = []

        def call() -> None:
            try:
                got.append(oauth.post(ep.url, {"grant_type": "x"}, pki.ca_file, 2.0))
            except BaseException as exc:
                got.append(exc)

        t0 = time.monotonic()
        worker = threading.Thread(target=call, daemon=True)
        worker.start()
        worker.join(15)
        took = time.monotonic() - t0
        assert not worker.is_alive(), "the request was still running after 15 s"
        (result,) = got
        assert isinstance(result, TokenUnavailable), result
        assert f"the token endpoint {ep.url} did not answer within 2 s" in str(result)
        assert took < 4.0, took
        wait_for(lambda: ep.trickling == 0, 5, "the endpoint saw the client go")


def _oauth_daemon(tmp_path: Path, pki: Pki, primary: SmtpServer, ep: TokenEndpoint, timeout: str,
                  fallback: SmtpServer | None) -> Path:  # fmt: skip
    """A daemon whose primary logs in with OAuth2 tokens from `ep`, its fallback (if
    any) with a password; smtp.timeout `timeout`."""
    cfg = daemon_config(tmp_path, pki, primary.port)
    secret = tmp_path / "client-secret"
    secret.write_text(ep.client_secret + "\n")
    secret.chmod(0o600)
    text = cfg.read_text().replace('timeout = "1s"', f'timeout = "{timeout}"')
    text = text.replace(f'password_file = "{tmp_path / "pw"}"\n', "")
    table = (
        f'[smtp.oauth]\ntoken_url = "{ep.url}"\nclient_id = "{ep.client_id}"\n'
        f'client_secret_file = "{secret}"\nca_file = "{pki.ca_file}"\n'
        'scope = "https://outlook.office365.com/.default"\n'
    )
    if fallback is not None:
        table += (
            f'[[smtp.fallback]]\nhost = "127.0.0.1"\nport = {fallback.port}\n'
            f'ca_file = "{pki.ca_file}"\nusername = "gw@example.com"\n'
            f'password_file = "{tmp_path / "pw"}"\n'
        )
    # No self-alerts: the queue holds just what the test sends.
    table += "[selfalerts]\nenabled = false\n"
    cfg.write_text(text.replace("[[route]]", table + "[[route]]", 1))
    r = run_cli("check-config", "-c", str(cfg))
    assert r.returncode == 0, r.stdout + r.stderr
    return cfg


def _send(cfg: Path, text: str) -> None:
    r = run_cli("send", "-c", str(cfg), "--sensor", "s", "--severity", "critical", text)
    assert r.returncode == 0, r.stderr


def test_a_stalled_token_endpoint_fails_over_and_status_names_it(tmp_path: Path, pki: Pki) -> None:
    with (
        TokenEndpoint(pki) as ep,
        SmtpServer(pki, "starttls") as primary,
        SmtpServer(pki, "starttls") as fallback,
    ):
        primary.check_token = ep.check
        ep.trickle = 0.5  # each byte well within smtp.timeout: only a whole deadline ends it
        cfg = _oauth_daemon(tmp_path, pki, primary, ep, "3s", fallback)
        gw = DaemonProcess(cfg, tmp_path / "daemon.log").start()
        try:
            gw.wait_ready()
            t0 = time.monotonic()
            _send(cfg, "via the fallback")
            (got,) = fallback.wait_for(1, timeout=25)
            took = time.monotonic() - t0
            print(f"the fallback sent {took:.1f} s after the alert came (smtp.timeout 3 s)")
            assert "via the fallback" in got.message["Subject"]
            assert took < 3 + 10, f"the fallback sent after {took:.1f} s"
            assert primary.received == []

            def report() -> dict[str, Any]:
                r = run_cli("status", "--json", "-c", str(cfg))
                data: dict[str, Any] = json.loads(r.stdout)
                return data

            # The status file is rewritten every second or two: poll it.
            wait_for(lambda: report()["smarthosts"][0]["state"] == "down", 10, "primary down")
            first = report()["smarthosts"][0]
            assert f"the token endpoint {ep.url} did not answer within 3 s" in (
                first["last_error"] or ""
            ), first
            assert report()["sent"] == 1 and report()["dead"] == 0
        finally:
            assert gw.terminate(timeout=20) == 0


@pytest.mark.timeout(120)
def test_sigterm_ends_the_daemon_while_the_token_endpoint_trickles(
    tmp_path: Path, pki: Pki
) -> None:
    """A long smtp.timeout, so that the token request is surely under way at SIGTERM."""
    with TokenEndpoint(pki) as ep, SmtpServer(pki, "starttls") as primary:
        primary.check_token = ep.check
        ep.trickle = 0.5
        cfg = _oauth_daemon(tmp_path, pki, primary, ep, "60s", None)
        gw = DaemonProcess(cfg, tmp_path / "daemon.log").start()
        gw.wait_ready()
        _send(cfg, "stuck behind the token")
        wait_for(lambda: ep.trickling >= 1, 20, "the token request under way")
        assert gw.proc is not None
        t0 = time.monotonic()
        gw.proc.terminate()
        try:
            rc = gw.proc.wait(20)  # the unit's TimeoutStopSec
        except Exception:
            gw.kill9()
            raise AssertionError(
                f"the daemon lived on after SIGTERM:\n{gw.log_text()[-2000:]}"
            ) from None
        took = time.monotonic() - t0
        print(f"the daemon ended {took:.1f} s after SIGTERM")
        assert rc == 0 and took < 20
        assert "mailgw stopped" in gw.log_text()


def test_a_stalled_token_endpoint_holds_the_fallbacks_of_the_same_account(
    pki: Pki, make_gateway: Callable[..., Gateway], password_file: Path, tmp_path: Path
) -> None:
    """Fallback 1 logs in as the same OAuth2 client: its sessions would stall on the same
    endpoint, a whole smtp.timeout more. It is held with the primary, and fallback 2 (a
    password) sends after one timeout."""
    with (
        TokenEndpoint(pki) as ep,
        SmtpServer(pki, "starttls") as primary,
        SmtpServer(pki, "starttls") as same,
        SmtpServer(pki, "starttls") as other,
    ):
        primary.check_token = same.check_token = ep.check
        ep.trickle = 0.5
        secret = tmp_path / "client-secret"
        secret.write_text(ep.client_secret + "\n")
        secret.chmod(0o600)
        oauth = (
            f'token_url = "{ep.url}"\nclient_id = "{ep.client_id}"\n'
            f'client_secret_file = "{secret}"\nca_file = "{pki.ca_file}"\n'
            'scope = "https://outlook.office365.com/.default"\n'
        )
        conf = smtp_conf(primary, pki) + f"[smtp.oauth]\n{oauth}"
        conf += (
            f'[[smtp.fallback]]\nhost = "127.0.0.1"\nport = {same.port}\n'
            f'ca_file = "{pki.ca_file}"\nusername = "gw@example.com"\n'
            f"[smtp.fallback.oauth]\n{oauth}"
            f'[[smtp.fallback]]\nhost = "127.0.0.1"\nport = {other.port}\n'
            f'ca_file = "{pki.ca_file}"\nusername = "gw@example.com"\n'
            f'password_file = "{password_file}"\n'
        )
        knocks = same.connections  # aiosmtpd's own, at its start
        gw = make_gateway(conf)
        t0 = time.monotonic()
        gw.add(alert("past both"))
        (got,) = other.wait_for(1, timeout=30)
        took = time.monotonic() - t0
        print(f"fallback 2 sent {took:.1f} s after the alert came (smtp.timeout 3 s)")
        assert "past both" in got.message["Subject"]
        assert took < 2 * 3 - 0.5, f"fallback 2 sent after {took:.1f} s: fallback 1 was tried"
        assert same.connections == knocks  # never tried
        held = str(gw.runtime.hosts[1]["last_error"])
        assert f"held with {gw.runtime.hosts[0]['host']} (the same account)" in held, held
        assert "did not answer within 3 s" in held, held


def test_the_deadline_holds_when_it_passes_before_the_tls_socket_exists(pki: Pki) -> None:
    """The TCP connect takes about a second (the endpoint's accept queue is full: the
    SYN is retransmitted), the TLS handshake is answered only after the deadline, then
    the answer trickles. The timer fires while there is no TLS socket yet to cut; the
    request still ends at its deadline."""
    timeout = 3.0
    srv = socket.create_server(("127.0.0.1", 0), backlog=0)
    port = srv.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port))  # fills the accept queue
    ctx = pki.server_context()
    t0 = time.monotonic()
    stop = threading.Event()

    def serve() -> None:
        with contextlib.suppress(OSError):
            stop.wait(0.8)
            first, _ = srv.accept()  # frees the queue: the client's SYN gets in next time
            conn, _ = srv.accept()
            stop.wait(max(0.0, t0 + timeout + 0.5 - time.monotonic()))
            tls = ctx.wrap_socket(conn, server_side=True)
            tls.recv(65536)
            answer = (
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 30\r\n"
                b'\r\n{"access_token":"x","a":"bbb"}'
            )
            for b in answer:
                if stop.wait(0.4):
                    break
                tls.send(bytes([b]))
            for s in (first, tls):
                s.close()

    threading.Thread(target=serve, daemon=True).start()
    got: list[BaseException | tuple[int, bytes]] = []

    def call() -> None:
        try:
            got.append(oauth.post(f"https://127.0.0.1:{port}/token", {}, pki.ca_file, timeout))
        except BaseException as exc:
            got.append(exc)

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(40)
    took = time.monotonic() - t0
    stop.set()
    for s in (filler, srv):
        s.close()
    assert not worker.is_alive(), "the request was still running after 40 s"
    (result,) = got
    assert isinstance(result, TokenUnavailable), result
    assert "did not answer within 3 s" in str(result), result
    assert took < timeout + 1.5, f"post() returned after {took:.1f} s"
