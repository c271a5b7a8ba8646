"""`mailgw oauth login`: a refresh token by the device authorization grant (RFC 8628).

For a single device and a human account (Microsoft 365 with a public client): the
gateway asks the device authorization endpoint for a code, the operator enters it on any
machine with a browser and signs in, and the gateway polls the token endpoint until the
sign-in is done. The refresh token goes to the token cache in state_dir, where the
daemon's `gateway.oauth.TokenSource` uses it from its next login on (`mailgw flush`).

`authorization` and `poll` are pure (the endpoint's answers as values); `login` does the
requests and the waiting, with `sleep` injected so tests need not wait.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from gateway.config import OAuthSection
from gateway.oauth import Token, TokenRefused, TokenSource, TokenUnavailable, parse, post

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
# RFC 8628 §3.5: the client waits `interval` s between polls (5 if the server says
# nothing) and 5 s more after each slow_down.
DEFAULT_INTERVAL = 5
SLOW_DOWN = 5
# RFC 8628 §3.5 errors that end the login, and what they mean for the operator.
_ENDED = {
    "access_denied": "the sign-in was declined",
    "expired_token": "the code expired before the sign-in; run `mailgw oauth login` again",
}


@dataclass(frozen=True, slots=True)
class Authorization:
    device_code: str
    user_code: str
    verification_uri: str
    expires_in: int
    interval: int


@dataclass(frozen=True, slots=True)
class Pending:
    slow_down: bool = False


def authorization(status: int, body: bytes) -> Authorization:
    """The device authorization response (RFC 8628 §3.2), or TokenRefused saying why."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        data = None
    if not isinstance(data, dict):
        raise TokenUnavailable(f"the device authorization endpoint answered HTTP {status}")
    if status != 200 or "error" in data:
        error, desc = data.get("error"), data.get("error_description")
        detail = " ".join(str(desc).split())[:300] if isinstance(desc, str) else ""
        raise TokenRefused(f"device authorization refused: {error} ({detail})")
    # verification_url: Google's spelling before the RFC.
    uri = data.get("verification_uri") or data.get("verification_url")
    fields = (data.get("device_code"), data.get("user_code"), uri)
    expires_in, interval = data.get("expires_in", 900), data.get("interval", DEFAULT_INTERVAL)
    if not all(isinstance(f, str) and f and f.isprintable() for f in fields):
        raise TokenUnavailable("the device authorization response lacks its codes")
    if type(expires_in) is not int or type(interval) is not int:
        raise TokenUnavailable("the device authorization response has no usable times")
    device_code, user_code, verification_uri = (str(f) for f in fields)
    # Bounded: a code is valid minutes, not ages (and 10**400 s would overflow the clock).
    expires_in, interval = min(max(expires_in, 1), 3600), min(max(interval, 1), 300)
    return Authorization(device_code, user_code, verification_uri, expires_in, interval)


def poll(status: int, body: bytes, now: float) -> Token | Pending:
    """One answer to a poll: the token, or still pending (RFC 8628 §3.5)."""
    try:
        error = json.loads(body.decode("utf-8")).get("error")
    except (UnicodeDecodeError, ValueError, RecursionError, AttributeError):
        error = None
    if error == "authorization_pending":
        return Pending()
    if error == "slow_down":
        return Pending(slow_down=True)
    if error in _ENDED:
        raise TokenRefused(_ENDED[error])
    token = parse(status, body, now)
    if token.refresh_token is None:
        raise TokenRefused(
            "the sign-in gave no refresh token; add offline_access to smtp.oauth.scope"
        )
    return token


def login(
    cfg: OAuthSection,
    timeout: float,
    cache: Path,
    out: TextIO,
    sleep: Callable[[float], None] = time.sleep,
) -> Token:
    """Run the device grant; keep the token in `cache`. Raises TokenRefused or
    TokenUnavailable (the caller prints them)."""
    assert cfg.device_url is not None
    source = TokenSource(cfg, timeout, cache)
    secret = source.client_secret()
    fields = {"client_id": cfg.client_id, **({"scope": cfg.scope} if cfg.scope else {})}
    auth = authorization(*post(cfg.device_url, fields, cfg.ca_file, timeout))
    print(
        f"To let this gateway send mail, open {auth.verification_uri} in a browser on any "
        f"device, enter the code {auth.user_code} and sign in as the sending account.\n"
        f"Waiting for the sign-in (the code is valid for {auth.expires_in // 60} minutes)...",
        file=out,
        flush=True,
    )
    poll_fields = {
        "grant_type": DEVICE_GRANT,
        "device_code": auth.device_code,
        "client_id": cfg.client_id,
    }
    if secret is not None:
        poll_fields["client_secret"] = secret
    interval = auth.interval
    deadline = time.monotonic() + auth.expires_in
    while time.monotonic() < deadline:
        sleep(interval)
        answer = poll(*post(cfg.token_url, poll_fields, cfg.ca_file, timeout), time.time())
        if isinstance(answer, Token):
            source.adopt(answer)
            return answer
        if answer.slow_down:
            interval += SLOW_DOWN
    raise TokenRefused(_ENDED["expired_token"])
