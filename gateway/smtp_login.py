"""Logging in to the smarthost (RFC 4954): the secret path and the mechanisms.

The secret is read late (at each login, so a fixed password file works without a
restart), used once, never stored, never logged. A password is tried with one mechanism
per session, not with each one offered: a wrong password would count as several failed
logins toward the account's lockout. OAuth2 tokens come from `gateway.oauth` and go out
as XOAUTH2 or OAUTHBEARER (RFC 7628), done here rather than with aiosmtplib's
auth_xoauth2, which needs aiosmtplib 5.1.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import aiosmtplib

from gateway.config import SmtpSection
from gateway.errors import TemporaryFailure
from gateway.oauth import TokenRefused, TokenSource, TokenUnavailable


class UplinkDown(TemporaryFailure):
    """The smarthost cannot be used right now: the uplink's fault, not a message's.

    `unreachable`: no connection could be made at all (refused, timed out, no route, no
    DNS): the network path is at fault, so a cheap TCP connect tells when it is back.
    Otherwise the smarthost answered and refused us (TLS, AUTH, a reply), which only a
    whole session can tell has changed.
    """

    def __init__(self, text: str, unreachable: bool = False) -> None:
        super().__init__(text)
        self.unreachable = unreachable


class AuthRefused(UplinkDown):
    """The smarthost refused our login: retrying soon cannot help (the secret is wrong
    or revoked) and every failed AUTH counts toward the account's lockout, so the relay
    waits smtp.auth_retry, or for `mailgw flush` after the fix."""


# A reply to AUTH that refuses the mechanism, not the credentials (RFC 4954 §6: 504
# unrecognised, 534 too weak): another offered mechanism may be tried in the same session
# without counting as a failed login. Any other refusal ends the attempt.
_MECHANISM_REFUSED = (504, 534)


def read_secret(cfg: SmtpSection) -> tuple[str, str] | None:
    """("password"|"token", secret) for AUTH, or None when no AUTH is configured."""
    if not cfg.username:
        return None
    if cfg.oauth_token_file:
        return "token", _read(Path(cfg.oauth_token_file), str(cfg.oauth_token_file)).strip()
    if cfg.password_file:
        return "password", _nonempty(Path(cfg.password_file), str(cfg.password_file))
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / "smtp-password").exists():
        # The unit falls back to an empty credential when /etc/mailgw/smtp-password is
        # missing, so that this message is logged instead of a silent restart loop.
        return "password", _nonempty(
            Path(creds) / "smtp-password", "/etc/mailgw/smtp-password (credential smtp-password)"
        )
    raise UplinkDown(
        "smtp.username is set but there is no password: set smtp.password_file, or give the "
        "service the credential `smtp-password` (LoadCredential=smtp-password:/etc/mailgw/"
        "smtp-password)"
    )


def _read(path: Path, where: str) -> str:
    """The secret file as UTF-8 text, or UplinkDown saying what to fix (never the bytes:
    they are the secret). check-config refuses the same files when it can read them."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UplinkDown(
            f"the secret in {where} is not UTF-8 text: save it as UTF-8, then "
            "systemctl restart mailgw"
        ) from None
    except OSError as exc:
        raise UplinkDown(f"cannot read the secret in {where}: {exc.strerror or exc}") from None


def _nonempty(path: Path, where: str) -> str:
    secret = _read(path, where).rstrip("\r\n")
    if not secret:
        raise UplinkDown(
            f"smtp.username is set but the password in {where} is empty or missing: write "
            "the password there (one line, mode 0600), then systemctl restart mailgw"
        )
    return secret


class Login:
    """One session's login; `mechanism` says which was used (or tried last)."""

    def __init__(self, cfg: SmtpSection, tokens: TokenSource | None, where: str) -> None:
        self.cfg = cfg
        self.tokens = tokens
        self.where = where
        self.mechanism: str | None = None

    async def run(self, client: aiosmtplib.SMTP) -> None:
        """Log in as the config says (nothing without smtp.username). Raises UplinkDown,
        or aiosmtplib's SMTPAuthenticationError for a refused login."""
        cfg = self.cfg
        if self.tokens is not None:
            await self._oauth(client, self.tokens)
            return
        secret = read_secret(cfg)
        if secret is None:
            return
        if client.get_transport_info("sslcontext") is None:
            # Defence in depth: config already forbids AUTH with tls = "none".
            raise UplinkDown("refusing to send credentials over a connection without TLS")
        kind, value = secret
        assert cfg.username is not None
        if kind == "token":
            await self._bearer(client, "XOAUTH2", cfg.username, value)
        else:
            await self._password(client, cfg.username, value)

    async def _oauth(self, client: aiosmtplib.SMTP, tokens: TokenSource) -> None:
        """Log in with the current token; if it is refused, once more with a new one (a
        token revoked early, or judged by a clock that was wrong when it was fetched)."""
        if client.get_transport_info("sslcontext") is None:
            raise UplinkDown("refusing to send a token over a connection without TLS")
        assert self.cfg.username is not None and self.cfg.oauth is not None
        mechanism = self.cfg.oauth.mechanism
        for force in (False, True):
            try:
                token = await tokens.get(force=force)
            except TokenRefused as exc:
                raise AuthRefused(f"OAuth2 for {self.cfg.username}: {exc}") from None
            except TokenUnavailable as exc:
                raise UplinkDown(f"OAuth2 for {self.cfg.username}: {exc}") from None
            try:
                await self._bearer(client, mechanism, self.cfg.username, token.access_token)
                return
            except aiosmtplib.SMTPAuthenticationError as exc:
                if force or 400 <= exc.code < 500:
                    raise  # a 4xx is "not now", which a new token cannot change

    async def _bearer(self, client: aiosmtplib.SMTP, mechanism: str, user: str, token: str) -> None:
        """SASL XOAUTH2 (Google's) or OAUTHBEARER (RFC 7628), one AUTH command. Done here,
        not with aiosmtplib's auth_xoauth2, which needs aiosmtplib 5.1."""
        self.mechanism = mechanism
        if mechanism == "OAUTHBEARER":
            # RFC 7628 §3.1: a GS2 header with the authzid, ',' and '=' escaped (RFC 5801).
            name = user.replace("=", "=3D").replace(",", "=2C")
            raw = f"n,a={name},\x01auth=Bearer {token}\x01\x01"
        else:
            raw = f"user={user}\x01auth=Bearer {token}\x01\x01"
        encoded = base64.b64encode(raw.encode("utf-8"))
        response = await client.execute_command(b"AUTH", mechanism.encode(), encoded)
        if response.code == 334:
            # A refusal comes as a challenge holding a JSON error; the client must answer
            # (RFC 7628 §3.2.3: %x01; XOAUTH2: an empty line) to get the final reply.
            dummy = b"AQ==" if mechanism == "OAUTHBEARER" else b""
            response = await client.execute_command(dummy)
        if response.code != 235:
            raise aiosmtplib.SMTPAuthenticationError(response.code, response.message)

    async def _password(self, client: aiosmtplib.SMTP, username: str, password: str) -> None:
        """One login, not aiosmtplib's `login()`, which goes on to the next mechanism after
        a refused one: a wrong password would count as several failures per session."""
        offered = client.supported_auth_methods  # aiosmtplib's preference: CRAM-MD5 first
        if not offered:
            raise UplinkDown(
                f"{self.where} offers no AUTH mechanism mailgw can use (CRAM-MD5, PLAIN, LOGIN) "
                f"after {'TLS' if self.cfg.tls != 'none' else 'EHLO'}; check smtp.host and port"
            )
        for name in offered:
            self.mechanism = name.upper()
            try:
                await getattr(client, f"auth_{name.replace('-', '')}")(username, password)
                return
            except aiosmtplib.SMTPAuthenticationError as exc:
                if exc.code not in _MECHANISM_REFUSED or name == offered[-1]:
                    raise
