"""A real OAuth2 token endpoint for the tests: HTTPS (http.server + ssl) on loopback with
the test CA's certificate, RFC 6749 client credentials (§4.4) and refresh tokens (§6),
short-lived random tokens, and the check a smarthost (tests' aiosmtpd) makes of them."""

from __future__ import annotations

import contextlib
import json
import secrets
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from gateway.lab import Pki


class TokenEndpoint:
    """Issues access tokens valid for `lifetime` s; `check(user, token)` is the
    smarthost's verdict. `refresh_tokens`: the ones it accepts (rotated if `rotate`)."""

    def __init__(
        self,
        pki: Pki,
        lifetime: float = 3600.0,
        client_id: str = "mailgw-test",
        client_secret: str = "client-s3cret",
        refresh_tokens: tuple[str, ...] = ("rt-1",),
        rotate: bool = False,
    ) -> None:
        self.pki = pki
        self.lifetime = lifetime
        self.client_id = client_id
        self.client_secret = client_secret
        self.refresh_tokens = set(refresh_tokens)
        self.rotate = rotate
        self.issued: dict[str, float] = {}  # token → monotonic expiry
        self.requests: list[dict[str, str]] = []  # the forms received, secrets and all
        self.refused: list[str] = []  # the RFC 6749 §5.2 error of each refusal
        # RFC 8628: device code → "pending" | "approved" | "denied"; polls answered
        self.devices: dict[str, str] = {}
        self.polls = 0
        self.slow_down_first = False  # answer the first poll with slow_down
        # Seconds between the bytes of each answer's body, sent after prompt headers (a
        # stalled or overloaded endpoint): the request never ends while this is set.
        self.trickle: float | None = None
        self.trickling = 0  # requests being answered that way now
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"https://127.0.0.1:{self._server.server_address[1]}/oauth2/v2.0/token"

    @property
    def device_url(self) -> str:
        return self.url.replace("/token", "/devicecode")

    def approve(self, state: str = "approved") -> None:
        """The human signed in (or declined, "denied") on the verification page."""
        with self._lock:
            for code in self.devices:
                self.devices[code] = state

    def authorize_device(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            if form.get("client_id") != self.client_id:
                return self._refuse(400, "invalid_client", "unknown client")
            code = secrets.token_hex(8)
            self.devices[code] = "pending"
            return 200, {
                "device_code": code,
                "user_code": "WDJB-MJHT",
                "verification_uri": "https://microsoft.com/devicelogin",
                "expires_in": 900,
                "interval": 1,
            }

    def _device_token(self, form: dict[str, str]) -> tuple[int, dict[str, Any]] | None:
        """A poll (RFC 8628 §3.4): None when approved (issue tokens), else the error."""
        self.polls += 1
        if self.slow_down_first and self.polls == 1:
            return 400, {"error": "slow_down"}
        state = self.devices.get(form.get("device_code", ""))
        if state == "pending":
            return 400, {"error": "authorization_pending"}
        if state == "denied":
            return self._refuse(400, "access_denied", "the user declined")
        if state is None:
            return self._refuse(400, "expired_token", "")
        return None

    def check(self, user: str, token: str) -> bool:
        with self._lock:
            expiry = self.issued.get(token)
        return expiry is not None and time.monotonic() < expiry

    def forget_tokens(self) -> None:
        """Every access token issued so far is revoked (an admin, a password change)."""
        with self._lock:
            self.issued.clear()

    def answer(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """RFC 6749 §5.1 or §5.2, as the endpoint answers `form`."""
        with self._lock:
            self.requests.append(form)
            grant = form.get("grant_type")
            if form.get("client_id") != self.client_id:
                return self._refuse(401, "invalid_client", "AADSTS700016: unknown client")
            if grant == "client_credentials":
                if form.get("client_secret") != self.client_secret:
                    return self._refuse(401, "invalid_client", "AADSTS7000215: invalid secret")
            elif grant == "urn:ietf:params:oauth:grant-type:device_code":
                if (answer := self._device_token(form)) is not None:
                    return answer
                self.devices.pop(form["device_code"])
            elif grant == "refresh_token":
                if form.get("refresh_token") not in self.refresh_tokens:
                    return self._refuse(
                        400,
                        "invalid_grant",
                        "AADSTS65001: The user or administrator has not consented to use the "
                        "application",
                    )
            else:
                return self._refuse(400, "unsupported_grant_type", "")
            token = "eyJ0" + secrets.token_urlsafe(24)
            self.issued[token] = time.monotonic() + self.lifetime
            body: dict[str, Any] = {
                "token_type": "Bearer",
                "access_token": token,
                "expires_in": max(1, round(self.lifetime)),
            }
            if grant == "refresh_token" and self.rotate:
                new = "rt-" + secrets.token_hex(4)
                self.refresh_tokens = {new}  # the old one is spent
                body["refresh_token"] = new
            elif grant and grant.startswith("urn:"):
                new = "rt-dev-" + secrets.token_hex(4)
                self.refresh_tokens.add(new)
                body["refresh_token"] = new
            return 200, body

    def _refuse(self, status: int, error: str, description: str) -> tuple[int, dict[str, Any]]:
        self.refused.append(error)
        return status, {"error": error, "error_description": description}

    def _trickle(self, handler: BaseHTTPRequestHandler, every: float) -> None:
        """Headers at once, then one byte of a JSON body every `every` s, until the client
        goes away, trickling is turned off (the body is then cut short) or the endpoint
        stops. Spaces: what arrives is a valid start of JSON, whatever the client waits for."""
        with self._lock:
            self.trickling += 1
        try:
            handler.send_response(200)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", "4096")
            handler.end_headers()
            handler.wfile.flush()
            while self.trickle is not None and not self._stopping.wait(every):
                handler.wfile.write(b" ")
                handler.wfile.flush()
        except OSError:
            pass  # the client gave up: what a deadline is for
        finally:
            handler.close_connection = True
            with self._lock:
                self.trickling -= 1

    def start(self) -> TokenEndpoint:
        endpoint = self
        self._stopping.clear()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length).decode()
                if endpoint.trickle is not None:
                    endpoint._trickle(self, endpoint.trickle)
                    return
                form = dict(urllib.parse.parse_qsl(raw))
                if self.path.endswith("/devicecode"):
                    status, body = endpoint.authorize_device(form)
                else:
                    status, body = endpoint.answer(form)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = self.pki.server_context()
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # ends the trickling answers
        if self._server is not None:
            self._server.shutdown()
            with contextlib.suppress(OSError):
                self._server.server_close()
            self._server = None

    def __enter__(self) -> TokenEndpoint:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
