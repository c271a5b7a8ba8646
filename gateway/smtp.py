"""One SMTP session to the smarthost, under our TLS and AUTH rules (invariant 7).

- tls = "implicit": TLS from the first byte (port 465).
- tls = "starttls": STARTTLS is required. A server that does not offer it is
  refused, never used in clear: a stripped STARTTLS is how a man in the middle
  downgrades a session to read the password.
- tls = "none": loopback only, never with AUTH (the config refuses both).
Certificates are verified (system store or `smtp.ca_file`), TLS ≥ 1.2, SNI on.

`SmtpSession.deliver` gives back what the server answered as data (`gateway.replies`),
so what a reply means is decided there, without aiosmtplib's exception types.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from dataclasses import dataclass
from email.message import EmailMessage

import aiosmtplib

from gateway.config import SmtpSection
from gateway.oauth import TokenSource
from gateway.replies import (
    Accepted,
    Broken,
    Failed,
    NoRecipients,
    Refused,
    Reply,
    Result,
    Unexpected,
)
from gateway.smtp_data import send_bytes
from gateway.smtp_login import AuthRefused as AuthRefused
from gateway.smtp_login import Login
from gateway.smtp_login import UplinkDown as UplinkDown
from gateway.smtp_login import read_secret as read_secret


def tls_context(cfg: SmtpSection) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


@dataclass
class TlsInfo:
    version: str | None = None
    cipher: str | None = None
    peer_subject: str | None = None
    peer_issuer: str | None = None
    peer_expires: str | None = None


def describe(exc: BaseException) -> str:
    """An error as an operator wants to read it."""
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return f"{exc.code} {exc.message}".strip()
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate not trusted: {exc.verify_message}"
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"certificate not trusted: {cause.verify_message}"
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text} ({cause})"
    return text


CONNECTION_ERRORS = (
    aiosmtplib.SMTPConnectError,
    aiosmtplib.SMTPServerDisconnected,
    aiosmtplib.SMTPTimeoutError,
    aiosmtplib.SMTPConnectTimeoutError,
    aiosmtplib.SMTPConnectResponseError,
    OSError,
    TimeoutError,
    ssl.SSLError,
)
# What opening a session can fail with, besides our own UplinkDown.
OPEN_ERRORS = (aiosmtplib.SMTPException, *CONNECTION_ERRORS)


class SmtpSession:
    def __init__(
        self, cfg: SmtpSection, helo_name: str | None = None, tokens: TokenSource | None = None
    ) -> None:
        self.cfg = cfg
        # [smtp.oauth]: the relay passes its own source, whose token outlives a session.
        if tokens is None and cfg.oauth is not None:
            tokens = TokenSource(cfg.oauth, cfg.timeout)
        self.tokens = tokens
        self.helo_name = cfg.helo_name or helo_name
        self.client: aiosmtplib.SMTP | None = None
        self.tls = TlsInfo()
        self.auth_mechanism: str | None = None
        self.extensions: dict[str, str] = {}

    @property
    def where(self) -> str:
        return f"{self.cfg.host}:{self.cfg.port}"

    async def open(self) -> None:
        """Connect, greet, secure and log in. Raises UplinkDown saying what failed; no
        credential is sent unless the connection is TLS with a verified certificate."""
        cfg = self.cfg
        ctx = tls_context(cfg) if cfg.tls != "none" else None
        client = aiosmtplib.SMTP(
            hostname=cfg.host,
            port=cfg.port,
            timeout=cfg.timeout,
            local_hostname=self.helo_name,
            use_tls=cfg.tls == "implicit",
            start_tls=False,
            tls_context=ctx,
        )
        connected = False
        try:
            await client.connect()
            connected = True
            await self._secure(client, ctx)
            await self._login(client)
        except OPEN_ERRORS as exc:
            await _abort(client)
            raise self._down(exc, connected) from exc
        except BaseException:
            await _abort(client)
            raise
        self.client = client

    async def _secure(self, client: aiosmtplib.SMTP, ctx: ssl.SSLContext | None) -> None:
        await client.ehlo()
        if self.cfg.tls == "starttls":
            if not client.supports_extension("starttls"):
                raise UplinkDown(
                    f'{self.where} does not offer STARTTLS, which smtp.tls = "starttls" '
                    "requires; refusing to send in clear (a stripped STARTTLS is a typical "
                    "downgrade attack, or the port is wrong: 587 is usual)"
                )
            await client.starttls(tls_context=ctx)
            # RFC 3207 §4.2: what the server offered in clear is void; ask again (the
            # AUTH mechanisms are often offered only now).
            await client.ehlo()
        self._read_tls(client)
        self.extensions = dict(client.esmtp_extensions)

    async def _login(self, client: aiosmtplib.SMTP) -> None:
        login = Login(self.cfg, self.tokens, self.where)
        try:
            await login.run(client)
        finally:
            self.auth_mechanism = login.mechanism

    def _down(self, exc: Exception, connected: bool) -> UplinkDown:
        """Why a session could not be opened. `unreachable` only when no connection was
        made at all and TLS played no part: then a TCP connect tells when it is back."""
        if isinstance(exc, aiosmtplib.SMTPAuthenticationError) and 400 <= exc.code < 500:
            # RFC 4954 §6: 454 "temporary authentication failure" ("too many login
            # attempts", a directory that did not answer): not a wrong secret, so backed
            # off like any smarthost that answers but fails (and, while other sessions of
            # ours to it work, taken as "no more sessions"), not held for smtp.auth_retry.
            return UplinkDown(
                f"{self.where} refused the login for {self.cfg.username} for now "
                f"({self.auth_mechanism}): {describe(exc)}"
            )
        if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
            hint = (
                "a freshly fetched token was refused too: check that the app may send as "
                "this mailbox (Microsoft 365: SMTP.SendAsApp and Add-MailboxPermission; "
                'Google: scope "https://mail.google.com/")'
                if self.cfg.oauth
                else "the token in smtp.oauth_token_file is refused (it is never refreshed: "
                "[smtp.oauth] refreshes tokens itself)"
                if self.cfg.oauth_token_file
                else "check smtp.username and the password (Gmail and Microsoft 365 need an "
                "app password or OAuth2)"
            )
            return AuthRefused(
                f"{self.where} refused the login for {self.cfg.username} "
                f"({self.auth_mechanism}): {describe(exc)}; {hint}, then `mailgw flush`"
            )
        if isinstance(exc, aiosmtplib.SMTPConnectResponseError) or isinstance(
            exc.__cause__, aiosmtplib.SMTPServerDisconnected | aiosmtplib.SMTPTimeoutError
        ):
            # The socket connected, and the greeting was a refusal ("421 too many
            # connections"), a hang-up or nothing: the smarthost is reached, so a TCP
            # probe would tell nothing new; sessions back off like any that fail.
            connected = True
        if isinstance(exc, aiosmtplib.SMTPException):
            # SMTPConnectError and its timeouts: no connection at all.
            unreachable = not connected and isinstance(
                exc, aiosmtplib.SMTPConnectError | aiosmtplib.SMTPConnectTimeoutError
            )
            if unreachable and isinstance(exc.__cause__, ssl.SSLError):
                unreachable = False
            return UplinkDown(f"{self.where}: {describe(exc)}", unreachable=unreachable)
        tls = isinstance(exc, ssl.SSLError) or isinstance(exc.__cause__, ssl.SSLError)
        return UplinkDown(
            f"cannot reach {self.where}: {describe(exc)}", unreachable=not connected and not tls
        )

    def _read_tls(self, client: aiosmtplib.SMTP) -> None:
        obj = client.get_transport_info("ssl_object")
        if not isinstance(obj, ssl.SSLObject | ssl.SSLSocket):
            return
        cipher = obj.cipher()
        cert = obj.getpeercert()
        self.tls = TlsInfo(version=obj.version(), cipher=cipher[0] if cipher else None)
        if cert:
            self.tls.peer_subject = _dn(cert.get("subject", ()))
            self.tls.peer_issuer = _dn(cert.get("issuer", ()))
            expires = cert.get("notAfter")
            self.tls.peer_expires = str(expires) if expires else None

    async def deliver(
        self, message: EmailMessage | bytes | bytearray, sender: str, recipients: tuple[str, ...]
    ) -> Result:
        """Send one message: the server's answer, or how the session failed, as data.
        Raises nothing but a cancellation."""
        try:
            refused, reply = await self.send(message, sender, recipients)
        except Exception as exc:
            return failure(exc)
        # aiosmtplib returns only when the end of DATA got 250; it keeps just the text.
        return Accepted(
            Reply(aiosmtplib.SMTPStatus.completed, reply),
            tuple((rcpt, Reply(r.code, r.message)) for rcpt, r in refused.items()),
        )

    async def send(
        self, message: EmailMessage | bytes | bytearray, sender: str, recipients: tuple[str, ...]
    ) -> tuple[dict[str, aiosmtplib.SMTPResponse], str]:
        """aiosmtplib's sendmail (for bytes, with DATA in bounded pieces: smtp_data.py):
        refused recipients and the final reply's text, or its exceptions. For measuring
        the library itself; the relay uses `deliver`."""
        assert self.client is not None
        if isinstance(message, bytes | bytearray):
            # Not aiosmtplib's sendmail: its DATA costs memory per line (smtp_data.py).
            return await send_bytes(self.client, sender, recipients, message)
        return await self.client.send_message(message, sender=sender, recipients=list(recipients))

    @property
    def usable(self) -> bool:
        return self.client is not None and self.client.is_connected

    async def close(self, polite: bool = True) -> None:
        """QUIT (when `polite` and the session is healthy), then drop the connection."""
        client, self.client = self.client, None
        if client is None:
            return
        try:
            if polite and client.is_connected:
                await client.quit(timeout=2)
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            pass
        finally:
            if client.is_connected:
                client.close()
        # aiosmtplib turns a cancellation that races with a dropped connection into
        # SMTPServerDisconnected; do not let that swallow our shutdown.
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError


def failure(exc: Exception) -> Failed:
    """A failed transaction as data. The order matters: SMTPServerDisconnected is a reply
    exception to aiosmtplib, but a dropped session to us; a reply that arrived as a
    connect error (SMTPConnectResponseError) is still a reply."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        return NoRecipients(tuple((e.recipient, Reply(e.code, e.message)) for e in exc.recipients))
    if isinstance(exc, aiosmtplib.SMTPResponseException) and not isinstance(
        exc, aiosmtplib.SMTPServerDisconnected
    ):
        at = "mail" if isinstance(exc, aiosmtplib.SMTPSenderRefused) else ""
        return Refused(Reply(exc.code, exc.message), at=at)
    if isinstance(exc, CONNECTION_ERRORS):
        return Broken(describe(exc), timed_out=isinstance(exc, TimeoutError))
    return Unexpected(describe(exc))


async def _abort(client: aiosmtplib.SMTP) -> None:
    if client.is_connected:
        client.close()


def _dn(rdns: object) -> str:
    parts = []
    if isinstance(rdns, tuple):
        for rdn in rdns:
            for key, value in rdn:
                parts.append(f"{key}={value}")
    return ", ".join(parts)


async def reachable(host: str, port: int, timeout: float) -> bool:
    """Can a TCP connection to host:port be made now? The cheapest probe of a path: one
    SYN (retransmitted once at most), its answer and a FIN; nothing is said to the server.
    """
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            family, type_, proto, _, addr = infos[0]
            sock = socket.socket(family, type_, proto)
            try:
                sock.setblocking(False)
                if hasattr(socket, "TCP_SYNCNT"):
                    # One retransmitted SYN, not Linux's six: a blackholed path costs two SYNs.
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_SYNCNT, 1)
                await loop.sock_connect(sock, addr)
            finally:
                sock.close()
    except (OSError, TimeoutError, IndexError):
        return False
    return True
