"""[smtp] sessions and [[smtp.fallback]]: what is accepted, and every refusal."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import ConfigError, SmtpSection, parse
from tests.conftest import run_cli

BASE = """
[gateway]
device_id = "truck-042"
state_dir = "/var/lib/mailgw"

[smtp]
host = "smtp.example.com"
from = "Gateway <gw@example.com>"
rate_limit = "30/min"
min_backoff = "2m"
{extra}
[[route]]
match = "alerts/#"
to = ["ops@example.com"]
"""


def smtp(extra: str = "") -> SmtpSection:
    cfg = parse(BASE.format(extra=extra))
    assert cfg.smtp is not None
    return cfg.smtp


def problems(extra: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        smtp(extra)
    return info.value.problems


def secret(tmp_path: Path) -> Path:
    p = tmp_path / "pw"
    p.write_text("s3cret\n")
    p.chmod(0o600)
    return p


def test_an_existing_config_is_one_host_and_one_session() -> None:
    s = smtp()
    assert (s.sessions, s.fallbacks) == (1, ())
    assert s.hosts == (s,)


def test_fallbacks_keep_their_connection_and_share_the_rest(tmp_path: Path) -> None:
    pw = secret(tmp_path)
    s = smtp(
        f'sessions = 4\n[[smtp.fallback]]\nhost = "relay.example.net"\ntls = "implicit"\n'
        f'username = "gw-17"\npassword_file = "{pw}"\nsessions = 2\nrate_limit = "5/s"\n'
        '[[smtp.fallback]]\nhost = "127.0.0.1"\ntls = "none"\n'
    )
    first, second = s.fallbacks
    assert s.sessions == 4 and s.hosts == (s, first, second)
    assert (first.host, first.port, first.tls, first.username) == (
        "relay.example.net",
        465,
        "implicit",
        "gw-17",
    )
    assert (first.sessions, first.rate_limit) == (2, (5, 1.0))
    # Shared: the sender, the backoffs; not shared: the primary's rate and sessions.
    assert first.sender == s.sender and "gw@example.com" in s.sender
    assert first.min_backoff == 120.0 and second.rate_limit is None and second.sessions == 1
    assert second.port == 25 and first.fallbacks == ()


def test_a_fallback_may_have_its_own_oauth(tmp_path: Path) -> None:
    pw = secret(tmp_path)
    s = smtp(
        '[[smtp.fallback]]\nhost = "smtp.office365.com"\nusername = "gw@example.com"\n'
        "[smtp.fallback.oauth]\n"
        'token_url = "https://login.example.com/token"\nclient_id = "app"\n'
        f'client_secret_file = "{pw}"\nscope = "https://outlook.office365.com/.default"\n'
    )
    assert s.oauth is None
    oauth = s.fallbacks[0].oauth
    assert oauth is not None and oauth.client_id == "app"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("from", '"other@example.com"'),
        ("timeout", '"10s"'),
        ("min_backoff", '"1m"'),
        ("batch", "10"),
        ("auth_retry", '"1h"'),
        ("return_jitter", '"0s"'),
    ],
)
def test_shared_keys_in_a_fallback_are_refused(key: str, value: str) -> None:
    found = problems(f'[[smtp.fallback]]\nhost = "relay.example.net"\n{key} = {value}\n')
    assert any(f"smtp.fallback[0].{key}" in p and "set it once in [smtp]" in p for p in found), (
        found
    )


def test_credentials_in_clear_to_a_remote_fallback_are_refused(tmp_path: Path) -> None:
    pw = secret(tmp_path)
    found = problems(
        '[[smtp.fallback]]\nhost = "relay.example.net"\ntls = "none"\n'
        f'username = "gw"\npassword_file = "{pw}"\n'
    )
    assert any("smtp.fallback[0].tls" in p and "loopback" in p for p in found), found
    assert any("smtp.fallback[0].tls" in p and "in clear" in p for p in found), found


def test_a_fallback_needs_a_host_and_knows_no_stray_keys() -> None:
    found = problems("[[smtp.fallback]]\nport = 25\nbogus = 1\n")
    assert any("smtp.fallback[0].host: is required" in p for p in found), found
    assert any("smtp.fallback[0].bogus: unknown key" in p for p in found), found


def test_a_fallback_that_is_the_primary_is_refused() -> None:
    found = problems('[[smtp.fallback]]\nhost = "SMTP.example.com"\n')
    assert any("already listed as [smtp]" in p for p in found), found


def test_a_fallback_must_be_a_table() -> None:
    found = problems("fallback = 3\n")
    assert any("smtp.fallback" in p and "array of tables" in p for p in found), found


@given(st.integers(min_value=-(2**40), max_value=2**40))
def test_sessions_between_one_and_sixteen(n: int) -> None:
    if 1 <= n <= 16:
        assert smtp(f"sessions = {n}").sessions == n
        fb = smtp(f'[[smtp.fallback]]\nhost = "b.example.com"\nsessions = {n}\n').fallbacks[0]
        assert fb.sessions == n
    else:
        found = problems(f"sessions = {n}")
        assert any("smtp.sessions: must be between 1 and 16" in p for p in found), found


@pytest.mark.parametrize("value", ['"4"', "2.5", "true"])
def test_sessions_must_be_an_integer(value: str) -> None:
    found = problems(f"sessions = {value}")
    assert any("smtp.sessions: must be an integer" in p for p in found), found


def test_check_config_names_the_fallbacks_line_and_accepts_the_fix(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.toml"
    bad = '[[smtp.fallback]]\nhost = "relay.example.net"\ntimeout = "5s"\n'
    cfg.write_text(BASE.format(extra=bad))
    line = cfg.read_text().splitlines().index('timeout = "5s"') + 1
    r = run_cli("check-config", "-c", str(cfg))
    assert r.returncode == 2, r.stdout
    assert f"{cfg}:{line}: smtp.fallback[0].timeout: is shared" in r.stderr, r.stderr
    cfg.write_text(BASE.format(extra='[[smtp.fallback]]\nhost = "relay.example.net"\n'))
    r = run_cli("check-config", "-c", str(cfg))
    assert r.returncode == 0, r.stderr


OAUTH_FALLBACK = (
    '[[smtp.fallback]]\nhost = "smtp.office365.com"\nusername = "gw@example.com"\n'
    "[smtp.fallback.oauth]\n"
    'token_url = "https://login.example.com/token"\nclient_id = "app"\n'
)


def test_a_fallbacks_device_grant_is_refused_with_what_to_do() -> None:
    """`mailgw oauth login` signs in only the primary: a fallback's device grant would
    never get a token."""
    found = problems(
        OAUTH_FALLBACK + 'grant = "refresh_token"\ndevice_url = "https://login.example.com/dev"\n'
    )
    assert any(
        "smtp.fallback[0].oauth.device_url" in p and "refresh_token_file" in p for p in found
    ), found


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ('grant = "refresh_token"\n', "refresh_token_file"),
        ('scope = "https://outlook.office365.com/.default"\n', "client_secret_file"),
    ],
)
def test_a_fallbacks_oauth_secrets_are_its_own_files(
    extra: str, key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service credentials are the primary's: a fallback must not log in with them."""
    (tmp_path / "smtp-oauth-refresh-token").write_text("rt\n")
    (tmp_path / "smtp-oauth-secret").write_text("cs\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    found = problems(OAUTH_FALLBACK + extra)
    assert any(f"smtp.fallback[0].oauth.{key}" in p and "primary" in p for p in found), found


def test_a_fallbacks_password_is_a_file_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "smtp-password").write_text("primary's\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    found = problems('[[smtp.fallback]]\nhost = "relay.example.net"\nusername = "gw"\n')
    assert any("smtp.fallback[0].password_file" in p and "primary" in p for p in found), found
