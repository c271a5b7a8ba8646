"""Real parts for the demo and the tests: a throwaway CA, an SMTP smarthost, a broker.

Needs the `demo` extra (aiosmtpd); imported only by `mailgw demo` and the tests.

Nothing here is a mock. The smarthost is aiosmtpd speaking real SMTP with real
STARTTLS, implicit TLS and AUTH (PLAIN, LOGIN, CRAM-MD5, XOAUTH2) over loopback;
its failures (4xx, 5xx, a dropped connection, a stall) are scripted replies the
client cannot tell from a real server's. The broker is Debian's Mosquitto.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import email
import email.policy
import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# aiosmtpd warns about its own deprecated attribute on every AUTH; not our news.
logging.getLogger("mail.log").setLevel(logging.ERROR)

# --- a throwaway certificate authority ------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca_file: Path
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_pki(
    directory: Path, hostnames: tuple[str, ...] = ("localhost",), ca_name: str = "mailgw test CA"
) -> Pki:
    """A CA and a server certificate for localhost, 127.0.0.1 and ::1."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(ca_name))
        .issuer_name(_name(ca_name))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
    sans += [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hostnames[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    ca_file, cert_file, key_file = (
        directory / "ca.pem",
        directory / "cert.pem",
        directory / "key.pem",
    )
    ca_file.write_bytes(ca_cert.public_bytes(pem))
    cert_file.write_bytes(cert.public_bytes(pem))
    key_file.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_file.chmod(0o600)
    return Pki(ca_file, cert_file, key_file)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the smarthost -------------------------------------------------------------


@dataclass
class Received:
    sender: str
    recipients: list[str]
    data: bytes
    message: EmailMessage
    auth_user: str | None
    tls: bool
    at: float = field(default_factory=time.monotonic)

    @property
    def message_id(self) -> str:
        return str(self.message["Message-ID"])


class Script:
    """Scripted misbehaviour, consumed in order. Thread-safe enough for tests."""

    def __init__(self) -> None:
        self.data_replies: list[str] = []  # replies to end of DATA, e.g. "451 4.3.0 later"
        self.rcpt_replies: dict[str, str] = {}  # recipient → reply (every time)
        self.drop_in_data = 0  # close the connection mid-DATA this many times
        self.stall_in_data = 0.0  # seconds to sit on end of DATA (once)
        self.data_delay = 0.0  # seconds every end of DATA takes (a slow smarthost)
        self.drop_when: bytes | None = None  # close mid-DATA whenever the mail holds this
        self.mail_reply: str | None = None  # reply to every MAIL FROM while set
        self.data_refusal: str | None = None  # reply to every end of DATA while set
        self.refused = 0  # MAIL FROMs and DATAs refused by the two above
        self.close_every = 0  # close the session after every n-th accepted mail


class _Handler:
    def __init__(self, server: SmtpServer) -> None:
        self.server = server

    async def handle_MAIL(
        self,
        smtp: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        script = self.server.script
        if script.mail_reply:
            script.refused += 1
            return script.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self,
        smtp: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        reply = self.server.script.rcpt_replies.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, smtp: SMTP, session: Session, envelope: Envelope) -> str:
        script = self.server.script
        if script.drop_when is not None and script.drop_when in (envelope.original_content or b""):
            assert smtp.transport is not None
            smtp.transport.close()  # a server that crashes on this message
            return "421 closing"
        if script.drop_in_data > 0:
            script.drop_in_data -= 1
            assert smtp.transport is not None
            smtp.transport.close()
            return "421 closing"  # never reaches the client: the connection is gone
        if script.stall_in_data > 0:
            stall, script.stall_in_data = script.stall_in_data, 0.0
            await asyncio.sleep(stall)
        if script.data_delay > 0:
            await asyncio.sleep(script.data_delay)
        if script.data_replies:
            return script.data_replies.pop(0)
        if script.data_refusal:
            script.refused += 1
            return script.data_refusal
        raw = envelope.original_content or b""
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        login = (
            session.auth_data.login.decode()
            if isinstance(session.auth_data, LoginPassword)
            else (session.auth_data if isinstance(session.auth_data, str) else None)
        )
        self.server.record(
            Received(
                sender=envelope.mail_from or "",
                recipients=list(envelope.rcpt_tos),
                data=raw,
                message=msg,
                auth_user=login,
                tls=smtp._tls_protocol is not None or self.server.tls == "implicit",
            )
        )
        if script.close_every and len(self.server.received) % script.close_every == 0:
            # A session that ends after this reply: the next mail needs a new login.
            assert smtp.transport is not None
            asyncio.get_running_loop().call_later(0.05, smtp.transport.close)
        return "250 2.0.0 OK queued"

    # CRAM-MD5 (RFC 2195) and XOAUTH2 are not built into aiosmtpd; handlers may add them.
    async def auth_CRAM__MD5(self, smtp: SMTP, args: list[str]) -> AuthResult:
        self.server.auth_attempts.append("CRAM-MD5")
        if "CRAM-MD5" in self.server.broken_mechanisms:  # advertised, not supported
            await smtp.push("504 5.5.4 Unrecognized authentication type")
            return AuthResult(success=False, handled=True)
        challenge = f"<{secrets.token_hex(8)}@mailgw-test>".encode()
        response = await smtp.challenge_auth(challenge)
        if not isinstance(response, bytes):
            return AuthResult(success=False, handled=False)
        user, _, digest = response.decode().partition(" ")
        password = self.server.users.get(user)
        if password is None:
            return AuthResult(success=False, handled=False)
        expected = hmac.new(password.encode(), challenge, hashlib.md5).hexdigest()
        ok = hmac.compare_digest(expected, digest)
        return AuthResult(success=ok, handled=False, auth_data=user if ok else None)

    async def auth_XOAUTH2(self, smtp: SMTP, args: list[str]) -> AuthResult:
        return self._bearer("XOAUTH2", args)

    async def auth_OAUTHBEARER(self, smtp: SMTP, args: list[str]) -> AuthResult:
        return self._bearer("OAUTHBEARER", args)

    def _bearer(self, mechanism: str, args: list[str]) -> AuthResult:
        """XOAUTH2 and OAUTHBEARER (RFC 7628): the token checked by `check_token` (a
        token endpoint's) or against `tokens`. A refusal is a plain 535."""
        self.server.auth_attempts.append(mechanism)
        if len(args) < 2:
            return AuthResult(success=False, handled=False)
        parts = base64.b64decode(args[1]).decode().split("\x01")
        fields = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
        head = parts[0]
        if mechanism == "OAUTHBEARER":  # "n,a=user," GS2 header
            user = head.split(",")[1].removeprefix("a=").replace("=2C", ",").replace("=3D", "=")
        else:
            user = head.removeprefix("user=")
        token = fields.get("auth", "").removeprefix("Bearer ")
        check = self.server.check_token
        ok = check(user, token) if check else token == self.server.tokens.get(user, "-")
        if not ok:
            self.server.auth_refused += 1
        return AuthResult(success=ok, handled=False, auth_data=user if ok else None)


class SmtpServer:
    """A real SMTP server on loopback, restartable on the same port.

    tls: "starttls" (offered; AUTH only after it), "implicit", or "none".
    """

    def __init__(
        self,
        pki: Pki | None,
        tls: str = "starttls",
        port: int | None = None,
        users: dict[str, str] | None = None,
        offer_starttls: bool = True,
        exclude_auth: tuple[str, ...] = (),
        host: str = "127.0.0.1",
    ) -> None:
        self.pki = pki
        self.tls = tls
        self.host = host
        self.port = port or free_port()
        self.users = users if users is not None else {"gw@example.com": "s3cret"}
        self.tokens: dict[str, str] = {}
        self.offer_starttls = offer_starttls
        self.exclude_auth = exclude_auth
        self.script = Script()
        self.received: list[Received] = []
        self.connections = 0
        # Sessions at once: more than max_sessions get a 421 at the greeting.
        self.max_sessions: int | None = None
        self.open_sessions = 0
        self.peak_sessions = 0
        self.turned_away = 0
        self.auth_attempts: list[str] = []  # one entry per AUTH command, its mechanism
        self.broken_mechanisms: tuple[str, ...] = ()
        self.auth_refused = 0  # bearer tokens refused
        # (user, token) → valid? For tokens a test's token endpoint issued.
        self.check_token: Callable[[str, str], bool] | None = None
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._controller: Controller | None = None
        self.on_receive: Callable[[Received], None] | None = None

    def record(self, item: Received) -> None:
        with self._changed:
            self.received.append(item)
            self._changed.notify_all()
        if self.on_receive:
            self.on_receive(item)

    def wait_for(self, count: int, timeout: float = 30.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self.received) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"smarthost received {len(self.received)} of {count} messages "
                        f"within {timeout} s"
                    )
                self._changed.wait(left)
            return list(self.received)

    def _authenticator(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        self.auth_attempts.append(mechanism)
        if isinstance(auth_data, LoginPassword):
            user, pw = auth_data.login.decode(), auth_data.password.decode()
            if self.users.get(user) == pw:
                return AuthResult(success=True, auth_data=auth_data)
        return AuthResult(success=False, handled=False)

    def start(self) -> SmtpServer:
        server = self

        class CountingSMTP(SMTP):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                if getattr(self, "turned_away", None) is False:
                    # Called again with the TLS transport after STARTTLS: one session.
                    super().connection_made(transport)
                    return
                server.connections += 1
                self.turned_away = server.max_sessions is not None and (
                    server.open_sessions >= server.max_sessions
                )
                if self.turned_away:  # as Postfix's smtpd_client_connection_count_limit
                    server.turned_away += 1
                    assert isinstance(transport, asyncio.WriteTransport)
                    transport.write(b"421 4.7.0 Error: too many connections\r\n")
                    transport.close()
                    return
                server.open_sessions += 1
                server.peak_sessions = max(server.peak_sessions, server.open_sessions)
                super().connection_made(transport)

            def connection_lost(self, exc: Exception | None) -> None:
                if self.turned_away:
                    return
                server.open_sessions -= 1
                super().connection_lost(exc)

        class Ctl(Controller):
            def factory(self) -> SMTP:
                return CountingSMTP(self.handler, **self.SMTP_kwargs)

        kwargs: dict[str, Any] = {
            "hostname": self.host,
            "port": self.port,
            "server_hostname": "localhost",
            "authenticator": self._authenticator if self.users else None,
            # aiosmtpd only knows about STARTTLS; an implicit-TLS session is TLS all along.
            "auth_require_tls": self.tls == "starttls",
            "auth_exclude_mechanism": list(self.exclude_auth),
            "decode_data": False,
            "data_size_limit": 10 * 1024 * 1024,
        }
        if self.tls == "starttls" and self.offer_starttls and self.pki:
            kwargs["tls_context"] = self.pki.server_context()
        if self.tls == "implicit" and self.pki:
            kwargs["ssl_context"] = self.pki.server_context()
        self._controller = Ctl(_Handler(self), **kwargs)
        self._controller.start()
        # aiosmtpd's own test connection at start is no client's session.
        deadline = time.monotonic() + 2
        while self.open_sessions and time.monotonic() < deadline:
            time.sleep(0.01)
        self.peak_sessions = 0
        return self

    def stop(self) -> None:
        if self._controller is not None:
            with contextlib.suppress(Exception):
                self._controller.stop()
            self._controller = None

    @property
    def running(self) -> bool:
        return self._controller is not None

    def __enter__(self) -> SmtpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- the broker -------------------------------------------------------------------


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None
    )


class Mosquitto:
    """Debian's Mosquitto on a free loopback port, persistent so it can be restarted."""

    def __init__(self, directory: Path, port: int | None = None, max_inflight: int = 100) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)
        self.conf = directory / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {directory}/\n"
            "autosave_interval 1\n"
            f"max_inflight_messages {max_inflight}\n"
            "max_queued_messages 0\n"
            # As root, Mosquitto drops to the `mosquitto` user, which could not write its
            # persistence file here: the broker would lose sessions across a restart.
            + ("user root\n" if os.geteuid() == 0 else "")
            + "log_dest stderr\n"
            "log_type error\n"
        )

    def start(self) -> Mosquitto:
        binary = mosquitto_binary()
        if binary is None:
            raise RuntimeError(
                "mosquitto is not installed: run `make test` (it installs it) "
                "or `apt-get install mosquitto mosquitto-clients`"
            )
        self.proc = subprocess.Popen([binary, "-c", str(self.conf)], stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return self
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"mosquitto exited: {err}")
            time.sleep(0.02)
        raise RuntimeError("mosquitto did not start listening")

    def stop(self, kill: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()
