"""`mailgw oauth login` (gateway/oauth_device.py, RFC 8628) against a real HTTPS token
endpoint on the test CA: the answers as values, the polling with an injected sleep, and
the command itself followed by the relay using the refresh token it left."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.config import OAuthSection
from gateway.oauth import Token, TokenRefused, TokenUnavailable
from gateway.oauth_device import Pending, authorization, login, poll
from tests.conftest import ROOT
from tests.parts import Gateway, Pki, SmtpServer, alert, smtp_conf, wait_for
from tests.token_endpoint import TokenEndpoint


def test_the_device_authorization_answer() -> None:
    google = b'{"device_code":"d","user_code":"U","verification_url":"https://x","interval":5}'
    got = authorization(200, google)
    assert (got.user_code, got.verification_uri, got.interval) == ("U", "https://x", 5)
    with pytest.raises(TokenUnavailable):
        authorization(200, b'{"device_code":"d"}')
    with pytest.raises(TokenRefused, match="invalid_client"):
        authorization(400, b'{"error":"invalid_client"}')


def test_poll_answers() -> None:
    assert poll(400, b'{"error":"authorization_pending"}', 0) == Pending()
    assert poll(400, b'{"error":"slow_down"}', 0) == Pending(slow_down=True)
    with pytest.raises(TokenRefused, match="declined"):
        poll(400, b'{"error":"access_denied"}', 0)
    with pytest.raises(TokenRefused, match="offline_access"):
        poll(200, b'{"access_token":"a","token_type":"Bearer","expires_in":60}', 0)
    token = poll(200, b'{"access_token":"a","expires_in":60,"refresh_token":"r"}', 0)
    assert token == Token("a", 60.0, 60.0, "r")


def _oauth(ep: TokenEndpoint, pki: Pki) -> OAuthSection:
    return OAuthSection(
        token_url=ep.url,
        client_id=ep.client_id,
        grant="refresh_token",
        scope="https://outlook.office.com/SMTP.Send offline_access",
        ca_file=pki.ca_file,
        device_url=ep.device_url,
    )


def test_login_polls_until_the_sign_in_and_keeps_the_refresh_token(
    pki: Pki, tmp_path: Path
) -> None:
    with TokenEndpoint(pki) as ep:
        ep.slow_down_first = True
        sleeps: list[float] = []

        def sleep(seconds: float) -> None:
            sleeps.append(seconds)
            if len(sleeps) == 3:
                ep.approve()

        out = io.StringIO()
        cache = tmp_path / "oauth-token.json"
        token = login(_oauth(ep, pki), 5, cache, out, sleep=sleep)
        assert "https://microsoft.com/devicelogin" in out.getvalue()
        assert "WDJB-MJHT" in out.getvalue()
        assert sleeps == [1, 6, 6]  # the server's interval, then 5 s more after slow_down
        assert token.refresh_token in ep.refresh_tokens
        kept = json.loads(cache.read_text())
        assert kept["refresh_token"] == token.refresh_token
        assert (cache.stat().st_mode & 0o777) == 0o600


def test_a_declined_sign_in_says_so(pki: Pki, tmp_path: Path) -> None:
    with TokenEndpoint(pki) as ep:
        with pytest.raises(TokenRefused, match="declined"):
            login(
                _oauth(ep, pki),
                5,
                tmp_path / "c.json",
                io.StringIO(),
                sleep=lambda s: ep.approve("denied"),
            )
        assert not (tmp_path / "c.json").exists()


def test_the_command_then_the_relay_uses_its_refresh_token(
    pki: Pki, make_gateway: Callable[..., Gateway], tmp_path: Path
) -> None:
    with TokenEndpoint(pki) as ep, SmtpServer(pki, "starttls") as server:
        server.check_token = ep.check
        smtp = smtp_conf(server, pki) + (
            f'[smtp.oauth]\ngrant = "refresh_token"\ntoken_url = "{ep.url}"\n'
            f'device_url = "{ep.device_url}"\nclient_id = "{ep.client_id}"\n'
            f'ca_file = "{pki.ca_file}"\nscope = "https://outlook.office.com/SMTP.Send '
            'offline_access"\n'
        )
        cfg = tmp_path / "gw.toml"
        cfg.write_text(
            f'[gateway]\nstate_dir = "{tmp_path}/state"\nruntime_dir = "{tmp_path}/run"\n'
            f"[smtp]\n{smtp}"
        )
        (tmp_path / "state").mkdir()
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "oauth", "login", "-c", str(cfg)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()
            assert "enter the code WDJB-MJHT" in first
            ep.approve()
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, err
        assert "signed in" in out

        ep.forget_tokens()  # the access token from the sign-in is gone: refresh
        gw = make_gateway(smtp)
        gw.add(alert())
        server.wait_for(1)
        wait_for(lambda: gw.counts()["sent"] == 1, what="sent")
        used = ep.requests[-1]
        assert used["grant_type"] == "refresh_token" and used["refresh_token"].startswith("rt-dev")
