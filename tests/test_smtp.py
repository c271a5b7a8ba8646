"""The SMTP session (gateway/smtp.py) against a real server (aiosmtpd) on loopback with a
throwaway CA: TLS and AUTH as invariant 7 requires, and every answer given back as data."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import aiosmtplib
import pytest

from gateway import outbox as ob_mod
from gateway.alert import Severity
from gateway.config import SmtpSection, parse
from gateway.replies import (
    Accepted,
    Broken,
    NoRecipients,
    Refused,
    Reply,
    Result,
    Unexpected,
    judge,
)
from gateway.smtp import SmtpSession, failure
from tests.parts import Gateway, Pki, SmtpServer, alert, make_pki, smtp_conf, wait_for


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("other-pki"), ca_name="someone else's CA")


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_starttls_and_each_auth_mechanism(
    pki: Pki, make_gateway: Callable[..., Gateway], mechanism: str
) -> None:
    others = tuple(m for m in ("PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2") if m != mechanism)
    with SmtpServer(pki, "starttls", exclude_auth=others) as server:
        gw = make_gateway(smtp_conf(server, pki))
        a = alert("fridge 3 at 11.2 C", Severity.CRITICAL)
        gw.add(a)
        (got,) = server.wait_for(1)
        assert got.tls and got.auth_user == "gw@example.com"
        assert got.message_id == f"<{a.id}.ops@gw-1.mailgw>"
        assert got.recipients == ["ops@example.com"] and got.sender == "gw@example.com"
        msg = got.message
        assert msg["Auto-Submitted"] == "auto-generated"
        assert msg["X-Mailgw-Severity"] == "critical" and msg["X-Mailgw-Alert-Id"] == a.id
        assert msg["X-Mailgw-Topic"] == "alerts/cold/temp" and msg["X-Mailgw-Device"] == "gw-1"
        assert msg["Subject"] == "[critical] gw-1/temp: fridge 3 at 11.2 C"
        body = msg.get_body().get_content()
        assert "fridge 3 at 11.2 C" in body and a.id in body
        wait_for(lambda: gw.counts()["sent"] == 1, what="row marked sent")


def test_xoauth2_token(pki: Pki, make_gateway: Callable[..., Gateway], tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("ya29.token\n")
    token.chmod(0o600)
    with SmtpServer(pki, "starttls") as server:
        server.tokens["gw@example.com"] = "ya29.token"
        gw = make_gateway(smtp_conf(server, pki) + f'oauth_token_file = "{token}"\n')
        gw.add(alert())
        (got,) = server.wait_for(1)
        assert got.auth_user == "gw@example.com"


def test_implicit_tls(pki: Pki, make_gateway: Callable[..., Gateway]) -> None:
    with SmtpServer(pki, "implicit") as server:
        gw = make_gateway(smtp_conf(server, pki, tls="implicit"))
        gw.add(alert())
        (got,) = server.wait_for(1)
        assert got.tls and got.auth_user == "gw@example.com"


def test_plain_loopback_without_auth(pki: Pki, make_gateway: Callable[..., Gateway]) -> None:
    with SmtpServer(None, "none", users={}) as server:
        gw = make_gateway(smtp_conf(server, pki, tls="none", auth=False))
        gw.add(alert())
        (got,) = server.wait_for(1)
        assert not got.tls


def test_untrusted_certificate_sends_nothing_and_no_credentials(
    pki: Pki, other_pki: Pki, make_gateway: Callable[..., Gateway]
) -> None:
    with SmtpServer(other_pki, "starttls") as server:
        gw = make_gateway(smtp_conf(server, pki))  # trusts `pki`, server shows `other_pki`
        gw.add(alert())
        wait_for(lambda: gw.runtime.uplink == "down", what="uplink down")
        assert "certificate" in (gw.runtime.last_error or "")
        assert server.received == [] and server.auth_attempts == []
        counts = gw.counts()
        # (the probe that failed puts its claimed row back just after reporting the uplink)
        wait_for(lambda: gw.counts()["queued"] == 1, what="the row back in the queue")
        assert counts["sent"] == 0
        rows = gw.writer.call(lambda ob: ob_mod.listing(ob.conn, ["queued", "sending"])).result(5)
        assert rows[0]["attempts"] == 0  # the uplink's fault, not the message's


def test_missing_starttls_is_refused_not_downgraded(
    pki: Pki, make_gateway: Callable[..., Gateway]
) -> None:
    with SmtpServer(pki, "starttls", offer_starttls=False) as server:
        gw = make_gateway(smtp_conf(server, pki))
        gw.add(alert())
        wait_for(lambda: gw.runtime.uplink == "down", what="uplink down")
        assert "does not offer STARTTLS" in (gw.runtime.last_error or "")
        assert "downgrade" in (gw.runtime.last_error or "")
        assert server.received == [] and server.auth_attempts == []


def test_wrong_password_stops_the_relay(
    pki: Pki, make_gateway: Callable[..., Gateway], tmp_path: Path
) -> None:
    bad = tmp_path / "bad-pw"
    bad.write_text("wrong")
    bad.chmod(0o600)
    with SmtpServer(pki, "starttls") as server:
        gw = make_gateway(smtp_conf(server, pki) + f'password_file = "{bad}"\n')
        gw.add(alert())
        wait_for(lambda: gw.runtime.uplink == "auth_failed", what="auth_failed")
        assert "refused the login" in (gw.runtime.last_error or "")
        wait_for(lambda: gw.counts()["queued"] == 1, what="the row back in the queue")


# --- what a transaction gives back -----------------------------------------------------


def _section(tmp: Path, server: SmtpServer, pki: Pki, password_file: Path) -> SmtpSection:
    text = (
        f'[gateway]\nstate_dir = "{tmp}/state"\n[smtp]\n'
        + smtp_conf(server, pki)
        + f'password_file = "{password_file}"\n'
    )
    cfg = parse(text)
    assert cfg.smtp is not None
    return cfg.smtp


def deliver(smtp: SmtpSection, *recipients: str) -> Result:
    """One message over a fresh session: what SmtpSession.deliver gives back."""

    async def go() -> Result:
        session = SmtpSession(smtp, "gw.example.com")
        await session.open()
        try:
            data = b"From: gw@example.com\r\nSubject: t\r\n\r\nbody\r\n"
            return await session.deliver(data, "gw@example.com", recipients)
        finally:
            await session.close()

    return asyncio.run(go())


def test_accepted_with_the_reply_and_each_refused_recipient(
    pki: Pki, tmp_path: Path, password_file: Path
) -> None:
    with SmtpServer(pki, "starttls") as server:
        server.script.rcpt_replies["gone@example.com"] = "550 5.1.1 no such user"
        smtp = _section(tmp_path, server, pki, password_file)
        result = deliver(smtp, "ops@example.com", "gone@example.com")
        assert isinstance(result, Accepted)
        assert result.reply.code == 250
        assert result.refused == (("gone@example.com", Reply(550, "5.1.1 no such user")),)
        assert deliver(smtp, "ops@example.com") == Accepted(result.reply)


def test_every_recipient_refused(pki: Pki, tmp_path: Path, password_file: Path) -> None:
    with SmtpServer(pki, "starttls") as server:
        server.script.rcpt_replies["a@example.com"] = "450 4.2.1 busy"
        server.script.rcpt_replies["b@example.com"] = "550 5.1.1 gone"
        smtp = _section(tmp_path, server, pki, password_file)
        result = deliver(smtp, "a@example.com", "b@example.com")
        assert result == NoRecipients(
            (
                ("a@example.com", Reply(450, "4.2.1 busy")),
                ("b@example.com", Reply(550, "5.1.1 gone")),
            )
        )
        assert server.received == []


@pytest.mark.parametrize(
    "reply", ["421 4.3.2 shutting down", "451 4.3.0 try again later", "554 5.7.1 rejected"]
)
def test_a_reply_to_the_end_of_data(
    pki: Pki, tmp_path: Path, password_file: Path, reply: str
) -> None:
    with SmtpServer(pki, "starttls") as server:
        server.script.data_replies = [reply]
        smtp = _section(tmp_path, server, pki, password_file)
        code, text = reply.split(" ", 1)
        assert deliver(smtp, "ops@example.com") == Refused(Reply(int(code), text))


def test_a_session_dropped_mid_data(pki: Pki, tmp_path: Path, password_file: Path) -> None:
    with SmtpServer(pki, "starttls") as server:
        server.script.drop_in_data = 1
        smtp = _section(tmp_path, server, pki, password_file)
        result = deliver(smtp, "ops@example.com")
        assert isinstance(result, Broken) and not result.timed_out


def test_a_session_stalled_past_the_timeout(pki: Pki, tmp_path: Path, password_file: Path) -> None:
    with SmtpServer(pki, "starttls") as server:
        server.script.stall_in_data = 5.0  # longer than smtp.timeout = 3s
        smtp = _section(tmp_path, server, pki, password_file)
        result = deliver(smtp, "ops@example.com")
        assert isinstance(result, Broken) and result.timed_out


R = ("a@x", "b@x")


@pytest.mark.parametrize(
    ("exc", "data", "state"),
    [
        (aiosmtplib.SMTPDataError(451, "later"), Refused(Reply(451, "later")), "queued"),
        (aiosmtplib.SMTPDataError(552, "too big"), Refused(Reply(552, "too big")), "dead"),
        (
            aiosmtplib.SMTPSenderRefused(553, "bad", "s"),
            Refused(Reply(553, "bad"), at="mail"),
            "queued",  # the sender is every message's: the relay pauses
        ),
        (aiosmtplib.SMTPDataError(421, "bye"), Refused(Reply(421, "bye")), "queued"),
        (
            aiosmtplib.SMTPRecipientsRefused(
                [
                    aiosmtplib.SMTPRecipientRefused(550, "no", "a@x"),
                    aiosmtplib.SMTPRecipientRefused(550, "no", "b@x"),
                ]
            ),
            NoRecipients((("a@x", Reply(550, "no")), ("b@x", Reply(550, "no")))),
            "dead",
        ),
        # A reply exception to aiosmtplib, a dropped session to us:
        (aiosmtplib.SMTPServerDisconnected("gone"), Broken("gone"), "queued"),
        (aiosmtplib.SMTPReadTimeoutError("timed out"), Broken("timed out", True), "queued"),
        (ConnectionResetError("reset by peer"), Broken("reset by peer"), "queued"),
        # A connect error that carries a reply is still a reply:
        (
            aiosmtplib.SMTPConnectResponseError(554, "go away"),
            Refused(Reply(554, "go away")),
            "dead",
        ),
        (ValueError("address has a line break"), Unexpected("address has a line break"), "queued"),
    ],
)
def test_aiosmtplib_exceptions_become_data(exc: Exception, data: Result, state: str) -> None:
    assert failure(exc) == data
    verdict = judge(failure(exc), R)
    assert verdict.state == state
    assert verdict.reconnect == (
        isinstance(data, Broken | Unexpected)
        or (isinstance(data, Refused) and data.reply.code == 421)
    )
