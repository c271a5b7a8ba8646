"""OAuth2 for SMTP (gateway/oauth.py, gateway/smtp.py): the token logic as values, then
the relay against real parts: an HTTPS token endpoint on the test CA issuing short-lived
tokens (tests/token_endpoint.py) and an aiosmtpd smarthost that checks them."""

from __future__ import annotations

import asyncio
import json
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway import oauth
from gateway.config import ConfigError, OAuthSection, parse
from gateway.oauth import Token, TokenRefused, TokenSource, TokenUnavailable, due, form
from tests.parts import Gateway, Pki, SmtpServer, alert, smtp_conf, wait_for
from tests.token_endpoint import TokenEndpoint

CC = OAuthSection(
    token_url="https://login.example/token",
    client_id="app",
    scope="https://outlook.office365.com/.default",
)
RT = OAuthSection(token_url="https://oauth2.example/token", client_id="app", grant="refresh_token")


# --- the pure parts ----------------------------------------------------------------------


def test_the_forms_of_both_grants() -> None:
    assert form(CC, "s", None) == {
        "grant_type": "client_credentials",
        "client_id": "app",
        "client_secret": "s",
        "scope": "https://outlook.office365.com/.default",
    }
    assert form(RT, None, "rt") == {
        "grant_type": "refresh_token",
        "client_id": "app",
        "refresh_token": "rt",
    }


def test_a_token_is_refreshed_before_it_expires() -> None:
    hour = Token("t", expires_at=1000.0 + 3600, lifetime=3600)
    assert not due(hour, 1000.0 + 3600 - 301) and due(hour, 1000.0 + 3600 - 299)
    short = Token("t", expires_at=10.0, lifetime=10)  # a fifth of its life left
    assert not due(short, 7.9) and due(short, 8.0)
    assert due(None, 0.0)


@pytest.mark.parametrize(
    ("status", "body", "error", "text"),
    [
        (400, {"error": "invalid_grant", "error_description": "AADSTS50173\nrevoked"},
         TokenRefused, "invalid_grant (AADSTS50173 revoked); the refresh token"),
        (401, {"error": "invalid_client"}, TokenRefused, "client secrets expire"),
        (503, {"error": "temporarily_unavailable"}, TokenUnavailable, "temporarily_unavailable"),
        (200, {"access_token": "x", "token_type": "mac"}, TokenUnavailable, "no usable bearer"),
        (200, {"access_token": "", "expires_in": 5}, TokenUnavailable, "no usable bearer"),
        (502, "<html>bad gateway</html>", TokenUnavailable, "without a JSON object"),
    ],
)  # fmt: skip
def test_refusals_and_garbage_from_the_endpoint(
    status: int, body: object, error: type[Exception], text: str
) -> None:
    raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    with pytest.raises(error) as got:
        oauth.parse(status, raw, 0.0)
    assert text in str(got.value)


@pytest.mark.parametrize(
    "expires_in",
    [10**400, "9" * 5000, True, -5, 0, 1.5, "١٢", None, [], {"a": 1}],
)
def test_a_hostile_lifetime_is_refused_or_capped_never_a_crash(expires_in: object) -> None:
    raw = json.dumps({"access_token": "a", "expires_in": expires_in}).encode()
    try:
        t = oauth.parse(200, raw, 0.0)
    except TokenUnavailable:
        return
    assert 0 < t.lifetime <= oauth.MAX_LIFETIME and t.expires_at == t.lifetime


def test_a_good_answer() -> None:
    t = oauth.parse(200, b'{"access_token":"a","token_type":"Bearer","expires_in":"3599"}', 5.0)
    assert t == Token("a", 3604.0, 3599.0)


# --- the configuration -------------------------------------------------------------------


def _config(tmp_path: Path, oauth_toml: str, smtp_extra: str = "") -> str:
    secret = tmp_path / "secret"
    secret.write_text("s\n")
    secret.chmod(0o600)
    return (
        f'[gateway]\nstate_dir = "{tmp_path}/state"\n'
        '[smtp]\nhost = "smtp.office365.com"\nfrom = "gw@example.com"\n'
        f'username = "gw@example.com"\n{smtp_extra}'
        f"[smtp.oauth]\n{oauth_toml.format(secret=secret)}"
    )


GOOD = (
    'token_url = "https://login.microsoftonline.com/t/oauth2/v2.0/token"\nclient_id = "app"\n'
    'client_secret_file = "{secret}"\nscope = "https://outlook.office365.com/.default"\n'
)


def test_check_config_takes_client_credentials(tmp_path: Path) -> None:
    cfg = parse(_config(tmp_path, GOOD))
    assert cfg.smtp is not None and cfg.smtp.oauth is not None
    assert cfg.smtp.oauth.grant == "client_credentials" and cfg.smtp.oauth.mechanism == "XOAUTH2"


@pytest.mark.parametrize(
    ("change", "smtp_extra", "message"),
    [
        (("https://login", "http://login"), "", "smtp.oauth.token_url: 'http://login"),
        (("scope = ", "# scope = "), "", "smtp.oauth.scope: is required"),
        (("client_id", "grant = \"refresh_token\"\nclient_id"), "",
         "smtp.oauth.refresh_token_file: is required"),
        (("client_id", "grant = \"password\"\nclient_id"), "", "smtp.oauth.grant"),
        (("client_id", "mechanism = \"plain\"\nclient_id"), "", "smtp.oauth.mechanism"),
        (("client_id", "bogus = 1\nclient_id"), "", "smtp.oauth.bogus: unknown key"),
        (("client_id", "device_url = \"https://x/devicecode\"\nclient_id"), "",
         "smtp.oauth.device_url: needs grant"),
        (("client_id", "device_url = \"http://x/devicecode\"\nclient_id"), "",
         "smtp.oauth.device_url: 'http://x/devicecode' must be an https:// URL"),
        (("", ""), 'password_file = "{secret}"\n', "cannot be combined with [smtp.oauth]"),
    ],
)  # fmt: skip
def test_check_config_refuses_what_cannot_run(
    tmp_path: Path, change: tuple[str, str], smtp_extra: str, message: str
) -> None:
    text = _config(tmp_path, GOOD.replace(*change), smtp_extra)
    text = text.replace("{secret}", str(tmp_path / "secret"))
    with pytest.raises(ConfigError) as got:
        parse(text)
    assert message in str(got.value)


# --- against a real token endpoint and smarthost ------------------------------------------


@pytest.fixture
def endpoint(pki: Pki) -> Iterator[TokenEndpoint]:
    with TokenEndpoint(pki, lifetime=2.0) as ep:
        yield ep


def _secret(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def oauth_conf(server: SmtpServer, pki: Pki, ep: TokenEndpoint, tmp: Path, toml: str = "") -> str:
    return (
        smtp_conf(server, pki, extra='auth_retry = "1h"\n')
        + f'[smtp.oauth]\ntoken_url = "{ep.url}"\nclient_id = "{ep.client_id}"\n'
        f'ca_file = "{pki.ca_file}"\n'
        + (
            toml
            or f'client_secret_file = "{_secret(tmp / "client-secret", ep.client_secret)}"\n'
            'scope = "https://outlook.office365.com/.default"\n'
        )
    )


def test_tokens_expiring_mid_drain_lose_no_mail_and_fail_no_auth(
    pki: Pki, make_gateway: Callable[..., Gateway], endpoint: TokenEndpoint, tmp_path: Path
) -> None:
    """2 s tokens; the smarthost ends each session after 4 mails (0.2 s each), so sessions
    open with tokens near or past their expiry: each must log in at the first try."""
    with SmtpServer(pki, "starttls") as server:
        server.check_token = endpoint.check
        server.script.data_delay = 0.2
        server.script.close_every = 4
        gw = make_gateway(oauth_conf(server, pki, endpoint, tmp_path))
        gw.add(*[alert(f"a{i}") for i in range(24)])
        got = server.wait_for(24, timeout=60)
        wait_for(lambda: gw.counts()["sent"] == 24, what="all sent")
        assert len({r.message_id for r in got}) == 24
        assert server.auth_refused == 0 and len(server.auth_attempts) >= 6
        assert len(endpoint.issued) >= 2  # refreshed on the way
        assert gw.runtime.attempts["auth_failed"] == 0 and gw.counts()["dead"] == 0
        cache = tmp_path / "state" / "oauth-token.json"
        assert stat.S_IMODE(cache.stat().st_mode) == 0o600
        assert json.loads(cache.read_text())["access_token"] in endpoint.issued
        form = endpoint.requests[0]
        assert form["grant_type"] == "client_credentials" and form["client_secret"]


def test_a_token_refused_by_the_smarthost_is_refreshed_once(
    pki: Pki, make_gateway: Callable[..., Gateway], tmp_path: Path
) -> None:
    with TokenEndpoint(pki, lifetime=3600) as ep, SmtpServer(pki, "starttls") as server:
        server.check_token = ep.check
        server.script.close_every = 1
        gw = make_gateway(oauth_conf(server, pki, ep, tmp_path))
        gw.add(alert("first"))
        server.wait_for(1)
        wait_for(lambda: not (gw.relay.session and gw.relay.session.usable), what="closed")
        ep.forget_tokens()  # revoked before its expiry: the gateway cannot know
        gw.add(alert("second"))
        server.wait_for(2)
        assert server.auth_refused == 1 and len(ep.requests) == 2
        assert gw.runtime.attempts["auth_failed"] == 0


def test_oauthbearer(pki: Pki, make_gateway: Callable[..., Gateway], tmp_path: Path) -> None:
    with TokenEndpoint(pki) as ep, SmtpServer(pki, "starttls") as server:
        server.check_token = ep.check
        conf = oauth_conf(server, pki, ep, tmp_path) + 'mechanism = "oauthbearer"\n'
        gw = make_gateway(conf)
        gw.add(alert())
        (got,) = server.wait_for(1)
        assert server.auth_attempts == ["OAUTHBEARER"] and got.auth_user == "gw@example.com"


def test_a_revoked_refresh_token_stops_the_relay_and_keeps_the_queue(
    pki: Pki, make_gateway: Callable[..., Gateway], tmp_path: Path
) -> None:
    """Consent revoked: status says so, nothing is dead; a new refresh token and a flush
    deliver without a restart. The endpoint rotates refresh tokens, as Microsoft's does."""
    with (
        TokenEndpoint(pki, lifetime=3600, rotate=True, refresh_tokens=("rt-1",)) as ep,
        SmtpServer(pki, "starttls") as server,
    ):
        server.check_token = ep.check
        server.script.close_every = 1
        rt_file = _secret(tmp_path / "refresh-token", "rt-1")
        toml = f'grant = "refresh_token"\nrefresh_token_file = "{rt_file}"\n'
        gw = make_gateway(oauth_conf(server, pki, ep, tmp_path, toml))
        gw.add(alert("before"))
        server.wait_for(1)
        wait_for(lambda: not (gw.relay.session and gw.relay.session.usable), what="closed")
        (rotated,) = ep.refresh_tokens
        cache = json.loads((tmp_path / "state" / "oauth-token.json").read_text())
        assert cache["refresh_token"] == rotated  # kept: the file's is spent

        ep.refresh_tokens = set()  # the user revoked the app's consent
        ep.forget_tokens()
        gw.add(*[alert(f"a{i}") for i in range(5)])
        wait_for(lambda: gw.runtime.uplink == "auth_failed", what="auth_failed")
        hold = gw.runtime.relay_hold or ""
        assert "invalid_grant" in hold and "consent was revoked" in hold
        assert rotated not in hold and "eyJ0" not in hold  # no secret in status
        wait_for(lambda: gw.counts()["queued"] == 5, what="the queue kept")
        assert gw.counts()["dead"] == 0 and server.auth_refused == 1

        ep.refresh_tokens = {"rt-2"}  # the operator signs in again ...
        _secret(rt_file, "rt-2")  # ... and writes the new token: it wins over the cache
        gw.flush()
        server.wait_for(6)
        wait_for(lambda: gw.counts()["sent"] == 6, what="all sent")
        assert ep.requests[-1]["refresh_token"] in ("rt-2", *ep.refresh_tokens)
        assert gw.runtime.uplink == "up"


def test_an_unreachable_token_endpoint_is_an_uplink_problem(
    pki: Pki, make_gateway: Callable[..., Gateway], tmp_path: Path
) -> None:
    ep = TokenEndpoint(pki).start()
    with SmtpServer(pki, "starttls") as server:
        conf = oauth_conf(server, pki, ep, tmp_path)
        ep.stop()
        gw = make_gateway(conf)
        gw.add(alert())
        wait_for(lambda: gw.runtime.uplink == "down", what="down")
        assert "cannot reach the token endpoint" in (gw.runtime.last_error or "")
        assert gw.counts()["queued"] == 1


def test_the_token_source_alone_caches_across_restarts(pki: Pki, tmp_path: Path) -> None:
    with TokenEndpoint(pki, lifetime=3600) as ep:
        cfg = OAuthSection(
            token_url=ep.url,
            client_id=ep.client_id,
            client_secret_file=_secret(tmp_path / "s", ep.client_secret),
            scope="x",
            ca_file=pki.ca_file,
        )
        cache = tmp_path / "oauth-token.json"
        first = asyncio.run(TokenSource(cfg, 5, cache).get())
        again = asyncio.run(TokenSource(cfg, 5, cache).get())  # a restarted daemon
        assert first == again and len(ep.requests) == 1
        other = OAuthSection(**{**_fields(cfg), "client_id": "another"})
        with pytest.raises(TokenRefused, match="invalid_client"):
            asyncio.run(TokenSource(other, 5, cache).get())  # the cache is not its


def _fields(cfg: OAuthSection) -> dict[str, object]:
    return {k: getattr(cfg, k) for k in cfg.__slots__}  # type: ignore[attr-defined]


def test_a_token_endpoint_with_an_untrusted_certificate_is_not_used(
    pki: Pki, tmp_path: Path
) -> None:
    with TokenEndpoint(pki) as ep:
        cfg = OAuthSection(
            token_url=ep.url,
            client_id=ep.client_id,
            client_secret_file=_secret(tmp_path / "s", ep.client_secret),
            scope="x",
        )  # no ca_file: the system store does not know the test CA
        with pytest.raises(TokenUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            asyncio.run(TokenSource(cfg, 5).get())
        assert ep.requests == []


def test_smtp_test_fetches_a_token_and_logs_in(pki: Pki, tmp_path: Path) -> None:
    from tests.conftest import run_cli

    with TokenEndpoint(pki) as ep, SmtpServer(pki, "starttls") as server:
        server.check_token = ep.check
        cfg = tmp_path / "gw.toml"
        cfg.write_text(
            f'[gateway]\nstate_dir = "{tmp_path}/s"\n[smtp]\n'
            + oauth_conf(server, pki, ep, tmp_path)
        )
        r = run_cli("smtp-test", "-c", str(cfg))
        assert r.returncode == 0, r.stdout + r.stderr
        assert "logged in as gw@example.com (XOAUTH2)" in r.stdout
        ep.client_secret = "rotated-away"  # the secret on the device is no longer valid
        r = run_cli("smtp-test", "-c", str(cfg))
        assert r.returncode == 1 and "invalid_client" in r.stdout
        assert "client-s3cret" not in r.stdout + r.stderr


def test_sessions_refreshing_at_once_fetch_one_token(pki: Pki, tmp_path: Path) -> None:
    """Several sessions of one smarthost ask at once, with none cached (or all refused):
    one request to the endpoint, and every session gets its token."""
    with TokenEndpoint(pki, lifetime=3600) as ep:
        cfg = OAuthSection(
            token_url=ep.url,
            client_id=ep.client_id,
            client_secret_file=_secret(tmp_path / "s", ep.client_secret),
            scope="x",
            ca_file=pki.ca_file,
        )
        source = TokenSource(cfg, 5)

        async def main(force: bool) -> set[str]:
            got = await asyncio.gather(*(source.get(force=force) for _ in range(4)))
            return {t.access_token for t in got}

        assert len(asyncio.run(main(False))) == 1 and len(ep.requests) == 1
        assert len(asyncio.run(main(True))) == 1 and len(ep.requests) == 2
