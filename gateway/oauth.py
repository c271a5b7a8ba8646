"""OAuth2 access tokens for SMTP AUTH (XOAUTH2, OAUTHBEARER), fetched and refreshed here.

Microsoft 365 and Google access tokens live about an hour; the gateway gets its own from
the token endpoint (RFC 6749) with what the config names:
- grant "client_credentials" (§4.4): a client id and secret, no human per device (the
  fleet case: a Microsoft Entra app with the SMTP.SendAsApp permission);
- grant "refresh_token" (§6): a refresh token a human obtained once (Google, single
  devices). A rotated refresh token is kept in the cache and used from then on, until
  the operator writes a new one to refresh_token_file (its digest tells).

The current token is cached in `state_dir/oauth-token.json` (mode 0600: it is a
credential) and refreshed before it expires (`due`), and once more when the smarthost
refuses it (a clock that was wrong when it was fetched, a token revoked early).

Pure parts (`form`, `parse`, `due`) take values; `TokenSource` does the I/O: the secret
files, the cache, and one HTTPS POST with a verified certificate (in a daemon thread,
so the event loop never blocks, under one deadline for the whole request). No token or
secret ever reaches a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import json
import logging
import os
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from gateway.config import OAuthSection
from gateway.errors import TemporaryFailure

log = logging.getLogger(__name__)

# A token endpoint's answer is a small JSON object; a bigger one is not an answer.
MAX_RESPONSE = 64 * 1024
# Refresh this long before expiry at most (5 min), and at the latest when a fifth of the
# lifetime is left: a session opened just before expiry still logs in.
REFRESH_MARGIN = 300.0
# RFC 6749 §5.2 errors that only the operator can fix: waiting will not help.
_REFUSALS = {
    "invalid_grant": "the refresh token or authorisation was refused: consent was revoked, "
    "the token expired or the account's password changed; get a new refresh token and "
    "write it to the refresh token file",
    "invalid_client": "the client id or secret was refused (client secrets expire: Microsoft "
    "Entra after at most 2 years); write the current secret to the client secret file",
    "unauthorized_client": "this client may not use this grant; check the app registration",
    "invalid_scope": "the scope was refused; check smtp.oauth.scope",
    "unsupported_grant_type": "the endpoint does not support this grant; check smtp.oauth.grant",
}
# systemd credentials (LoadCredential=) read when the config names no file.
CREDENTIALS = {"client_secret": "smtp-oauth-secret", "refresh_token": "smtp-oauth-refresh-token"}


class TokenRefused(TemporaryFailure):
    """The token endpoint refused the grant: an operator must act (a login problem)."""


class TokenUnavailable(TemporaryFailure):
    """No token now (the endpoint unreachable, 5xx, a garbled answer): retry later."""


@dataclass(frozen=True, slots=True)
class Token:
    access_token: str
    expires_at: float  # wall time, as the endpoint's expires_in made it
    lifetime: float  # expires_in as given
    refresh_token: str | None = None  # a rotated one, when the endpoint sent it


def form(cfg: OAuthSection, secret: str | None, refresh_token: str | None) -> dict[str, str]:
    """The POST body (RFC 6749 §4.4.2 / §6), client authentication in the body (§2.3.1)."""
    body = {"grant_type": cfg.grant, "client_id": cfg.client_id}
    if cfg.grant == "refresh_token":
        assert refresh_token is not None
        body["refresh_token"] = refresh_token
    if secret is not None:
        body["client_secret"] = secret
    if cfg.scope:
        body["scope"] = cfg.scope
    return body


# A token held longer than this is fetched again anyway: an endpoint's answer of "valid
# for 10^400 seconds" must neither overflow a float nor keep a token for ever.
MAX_LIFETIME = 86400


def _lifetime(value: object) -> int | None:
    """expires_in as seconds (1..MAX_LIFETIME), or None when it is not a positive count.
    Some endpoints send it as a string; a long digit string is refused before int()."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 12:
        value = int(value)
    if type(value) is not int or value <= 0:
        return None
    return min(value, MAX_LIFETIME)


def parse(status: int, body: bytes, now: float) -> Token:
    """The endpoint's answer as a Token, or TokenRefused / TokenUnavailable saying why."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        data = None
    if not isinstance(data, dict):
        raise TokenUnavailable(f"the token endpoint answered HTTP {status} without a JSON object")
    error = data.get("error")
    if status != 200 or error is not None:
        code = error if isinstance(error, str) else f"HTTP {status}"
        desc = data.get("error_description")
        # The description is the server's (Entra's AADSTS codes are what to look up); it
        # holds no secret of ours, but it is text from the network: one short line.
        detail = " ".join(str(desc).split())[:300] if isinstance(desc, str) else ""
        why = _REFUSALS.get(code)
        text = f"the token endpoint refused: {code}" + (f" ({detail})" if detail else "")
        if why is not None:
            raise TokenRefused(f"{text}; {why}")
        raise TokenUnavailable(text)
    token = data.get("access_token")
    kind = data.get("token_type", "Bearer")
    expires_in = _lifetime(data.get("expires_in", 3600))
    if (
        not isinstance(token, str)
        or not token
        or not token.isprintable()
        or not isinstance(kind, str)
        or kind.lower() != "bearer"
        or expires_in is None
    ):
        raise TokenUnavailable("the token endpoint's answer holds no usable bearer token")
    refresh = data.get("refresh_token")
    return Token(
        token,
        now + expires_in,
        float(expires_in),
        refresh if isinstance(refresh, str) and refresh else None,
    )


def due(token: Token | None, now: float) -> bool:
    """Is it time to fetch a new token (none yet, or expiry within the margin)?"""
    if token is None:
        return True
    return now >= token.expires_at - min(REFRESH_MARGIN, token.lifetime / 5)


class _Connection(http.client.HTTPSConnection):
    """Keeps its socket from the moment it exists, for the deadline's timer: the plain
    TCP socket during the connect, the TLS socket from before its handshake on (the
    timer may fire in either); http.client hands the socket to the response (and forgets
    it) when the server will close the connection, and the deadline must reach it there
    too. Each step gets only what is left of the deadline."""

    raw: socket.socket | None = None

    def __init__(
        self,
        host: str,
        port: int,
        context: ssl.SSLContext,
        deadline: float,
        late: threading.Event,
    ) -> None:
        super().__init__(host, port, timeout=max(0.0, deadline - time.monotonic()), context=context)
        self.tls_context = context
        self.deadline = deadline
        self.late = late

    def _left(self) -> float:
        """What is left of the deadline; TimeoutError once it has passed."""
        left = self.deadline - time.monotonic()
        if self.late.is_set() or left <= 0:
            raise TimeoutError("the request's deadline has passed")
        return left

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self._left())
        self.sock = self.raw = sock
        self._left()  # the timer may have fired before the socket was here to cut
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tls = self.tls_context.wrap_socket(
            sock, server_hostname=self.host, do_handshake_on_connect=False
        )
        # The wrap took over the plain socket's descriptor: the TLS socket is the one
        # to cut now, before its handshake reads anything.
        self.sock = self.raw = tls
        tls.settimeout(self._left())
        tls.do_handshake()
        tls.settimeout(self._left())


def post(
    url: str, fields: dict[str, str], ca_file: Path | None, timeout: float
) -> tuple[int, bytes]:
    """One form POST over HTTPS with a verified certificate (TLS >= 1.2): the status and
    body, for a 4xx or 5xx too (they carry the RFC 6749 §5.2 error). Blocking.

    `timeout` bounds the whole request (connect, TLS, headers, body), not each read as a
    socket timeout does: an endpoint that sends a byte now and then would otherwise hold
    the relay's session, and its smarthost, for ever. At the deadline the socket is shut
    down from a timer thread, which ends whichever read is blocked in that moment."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise TokenRefused(f"the token endpoint {url} is not an https:// URL")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    late = threading.Event()
    deadline = time.monotonic() + timeout
    conn = _Connection(parts.hostname, parts.port or 443, ctx, deadline, late)

    def cut() -> None:
        late.set()
        sock = conn.raw
        if sock is not None:
            # The plain socket's shutdown, not SSLSocket's (which drops its SSL object
            # under the reading thread's feet): the blocked read sees the end at once.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    timer = threading.Timer(timeout, cut)
    timer.daemon = True
    timer.start()
    reason: object = None
    status, body = 0, b""
    try:
        conn.request(
            "POST",
            target,
            body=urllib.parse.urlencode(fields).encode(),
            headers={
                "Accept": "application/json",
                "Content-Type": "application/x-www-form-urlencoded",
                "User-Agent": "mailgw",
            },
        )
        resp = conn.getresponse()
        status, body = resp.status, resp.read(MAX_RESPONSE + 1)
    except (OSError, http.client.HTTPException) as exc:
        reason = exc
    finally:
        timer.cancel()
        conn.close()
    if late.is_set() or isinstance(reason, TimeoutError):
        # Whatever the reads saw (an error, or a body cut short), the deadline came first;
        # a step's own timeout is what was left of the deadline, so it is the same.
        raise TokenUnavailable(f"the token endpoint {url} did not answer within {timeout:g} s")
    if reason is not None:
        raise TokenUnavailable(f"cannot reach the token endpoint {url}: {reason}")
    if len(body) > MAX_RESPONSE:
        raise TokenUnavailable(f"the token endpoint's answer exceeds {MAX_RESPONSE} bytes")
    return status, body


T = TypeVar("T")
# Past the request's own deadline, how long the loop waits for the thread: a DNS lookup,
# which no socket deadline covers, must not hold the relay either.
THREAD_GRACE = 2.0


async def in_thread(fn: Callable[[], T], name: str) -> T:
    """fn() in a daemon thread of its own, awaited. Not asyncio.to_thread: the default
    executor's threads are joined at exit, so a call blocked in the network (a DNS
    lookup, a server that never answers) would keep a stopped daemon alive; this thread
    is abandoned at exit instead, and a cancelled await leaves it to finish alone."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return  # the awaiting task was cancelled or timed out meanwhile
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result, error = fn(), None
        except Exception as exc:
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await future


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class TokenSource:
    """The current access token for the relay's sessions; `cache`: where it is kept."""

    def __init__(self, cfg: OAuthSection, timeout: float, cache: Path | None = None) -> None:
        self.cfg = cfg
        self.timeout = timeout
        self.cache = cache
        self.token: Token | None = None
        self._rotated: tuple[str, str] | None = None  # (refresh token, digest of the file's)
        self._file_digest: str | None = None  # of the refresh token file, when last read
        self._loaded = False
        # The sessions of one smarthost share this source: one refresh at a time, and
        # those that waited for it take its token instead of fetching their own (an
        # endpoint that rotates refresh tokens would revoke all but one of them).
        self._lock = asyncio.Lock()
        self._lock_loop: asyncio.AbstractEventLoop | None = None
        # Why the last request to the endpoint failed (None: it did not). The relay
        # clears it before each session, so that after a failed one it tells whether
        # the endpoint was the cause.
        self.failing: str | None = None

    async def get(self, force: bool = False) -> Token:
        """A token valid for a while yet; `force`: a new one whatever the old one's expiry
        (the smarthost refused it). Raises TokenRefused or TokenUnavailable."""
        seen = self.token
        loop = asyncio.get_running_loop()
        if self._lock_loop is not loop:  # a lock serves one loop (`mailgw smtp-test` runs its own)
            self._lock, self._lock_loop = asyncio.Lock(), loop
        async with self._lock:
            if force and self.token is not seen and not due(self.token, time.time()):
                assert self.token is not None
                return self.token  # fetched while this session waited: a new one already
            return await self._get(force)

    async def _get(self, force: bool) -> Token:
        if not self._loaded or force or due(self.token, time.time()):
            # Read again: `mailgw oauth login` may have left a new refresh token there.
            self._loaded = True
            self._load()
        if force or due(self.token, time.time()):
            try:
                async with asyncio.timeout(self.timeout + THREAD_GRACE):
                    self.token = await in_thread(self._fetch, "oauth-token")
            except TimeoutError:
                self.failing = (
                    f"the token endpoint {self.cfg.token_url} did not answer within "
                    f"{self.timeout:g} s"
                )
                raise TokenUnavailable(self.failing) from None
            except TokenUnavailable as exc:
                self.failing = str(exc)
                raise
            self.failing = None
            self._save()
        assert self.token is not None
        return self.token

    def client_secret(self) -> str | None:
        """The client secret, if one is configured (a public client has none)."""
        return self._secret("client_secret", self.cfg.client_secret_file)

    def adopt(self, token: Token) -> None:
        """Keep `token` and its refresh token (from `mailgw oauth login`) in the cache; a
        refresh token written to refresh_token_file later wins over it."""
        assert token.refresh_token is not None
        current = self._secret("refresh_token", self.cfg.refresh_token_file)
        self.token = token
        self._rotated = (token.refresh_token, _digest(current) if current else "")
        self._save()

    # --- the secrets, the endpoint, the cache --------------------------------------

    def _fetch(self) -> Token:
        cfg = self.cfg
        secret = self.client_secret()
        if cfg.grant == "client_credentials" and secret is None:
            raise TokenRefused(
                "[smtp.oauth] grant client_credentials needs the client secret: set "
                "smtp.oauth.client_secret_file or the credential smtp-oauth-secret"
            )
        refresh = self._refresh_token() if cfg.grant == "refresh_token" else None
        status, body = post(cfg.token_url, form(cfg, secret, refresh), cfg.ca_file, self.timeout)
        token = parse(status, body, time.time())
        if token.refresh_token is not None and refresh is not None:
            self._rotated = (token.refresh_token, self._file_digest or "")
        return token

    def _secret(self, name: str, path: Path | None) -> str | None:
        """A secret from its file or systemd credential, stripped; None if neither."""
        if path is None:
            creds = os.environ.get("CREDENTIALS_DIRECTORY")
            if not creds or not (Path(creds) / CREDENTIALS[name]).exists():
                return None
            path = Path(creds) / CREDENTIALS[name]
        try:
            text = path.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            raise TokenRefused(
                f"the secret in {path} is not UTF-8 text; save it as UTF-8"
            ) from None
        except OSError as exc:
            raise TokenRefused(f"cannot read the secret in {path}: {exc.strerror or exc}") from None
        if not text:
            raise TokenRefused(f"{path} is empty; write the secret there on one line")
        return text

    def _refresh_token(self) -> str:
        """The refresh token: the rotated one, unless the file changed since it came."""
        current = self._secret("refresh_token", self.cfg.refresh_token_file)
        self._file_digest = _digest(current) if current else None
        if self._rotated is not None and self._rotated[1] == (self._file_digest or ""):
            return self._rotated[0]
        if current is None:
            raise TokenRefused(
                'grant "refresh_token" has no refresh token yet: run `mailgw oauth login` '
                "(with smtp.oauth.device_url), or set smtp.oauth.refresh_token_file or the "
                "credential smtp-oauth-refresh-token"
            )
        return current

    def _load(self) -> None:
        """The cached token, if it is for this endpoint and client. A corrupt or foreign
        cache is ignored: a new token is one request away."""
        if self.cache is None:
            return
        try:
            data = json.loads(self.cache.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError, RecursionError):
            return
        if not isinstance(data, dict):
            return
        if data.get("token_url") != self.cfg.token_url or data.get("client_id") != (
            self.cfg.client_id
        ):
            return
        access, expires = data.get("access_token"), data.get("expires_at")
        lifetime = data.get("lifetime")
        if (
            isinstance(access, str)
            and isinstance(expires, int | float)
            and isinstance(lifetime, int | float)
        ):
            self.token = Token(access, float(expires), float(lifetime))
        rotated, source = data.get("refresh_token"), data.get("refresh_token_source")
        if isinstance(rotated, str) and isinstance(source, str):
            self._rotated = (rotated, source)

    def _save(self) -> None:
        """Write the cache: 0600 from its creation (it holds credentials), then renamed
        over the old one, so a power cut leaves the old or the new, never half a file."""
        if self.cache is None or self.token is None:
            return
        data: dict[str, object] = {
            "token_url": self.cfg.token_url,
            "client_id": self.cfg.client_id,
            "access_token": self.token.access_token,
            "expires_at": self.token.expires_at,
            "lifetime": self.token.lifetime,
        }
        if self._rotated is not None:
            data["refresh_token"], data["refresh_token_source"] = self._rotated
        tmp = self.cache.with_name(f".{self.cache.name}.tmp")
        try:
            tmp.unlink(missing_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.cache)
        except OSError as exc:
            # The token still works from memory; only a restart costs one more request.
            # A rotated refresh token is lost with it, which is why the error is raised.
            if self._rotated is not None:
                raise TokenUnavailable(
                    f"cannot write {self.cache} ({exc.strerror or exc}), where the refresh "
                    "token must be kept: state_dir must be writable by the service's user "
                    "(run `mailgw oauth login` with sudo)"
                ) from None
            log.warning("cannot keep the OAuth2 token in %s: %s", self.cache, exc)
