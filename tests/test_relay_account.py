"""Account-level refusals against a real smarthost (aiosmtpd): authentication required,
send-as denied, a sending quota, the same 5xx for message after message. Each pauses the
relay and keeps the queue; only replies about a message dead-letter it (invariant 12).
Which reply means what is in test_replies.py; here, what the relay does with them."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway import uplink
from tests.parts import Gateway, Pki, SmtpServer, alert, smtp_conf, wait_for

MAIL_FROM_REFUSALS = [
    "530 5.7.0 Authentication required",
    "530 5.7.57 Client not authenticated to send mail. [AM0PR01CA0001]",
    "550 5.7.60 SMTP; Client does not have permissions to send as this sender",
    "553 5.1.8 <gw@example.com>: Sender address rejected: Domain not found",
    "550 5.4.5 Daily user sending limit exceeded.",
]


@pytest.mark.parametrize("reply", MAIL_FROM_REFUSALS, ids=lambda r: r[:9])
def test_an_account_refusal_at_mail_from_pauses_and_keeps_the_queue(
    pki: Pki, make_gateway: Callable[..., Gateway], reply: str
) -> None:
    with SmtpServer(pki, "starttls") as server:
        server.script.mail_reply = reply
        gw = make_gateway(smtp_conf(server, pki, extra='auth_retry = "1h"\nquota_retry = "1h"\n'))
        gw.add(*[alert(f"a{i}") for i in range(20)])
        wait_for(lambda: gw.runtime.uplink == "paused", what="paused")
        wait_for(lambda: gw.counts()["queued"] == 20, what="all 20 back in the queue")
        time.sleep(1)
        counts = gw.counts()
        assert counts["dead"] == 0 and counts["queued"] == 20
        assert server.script.refused == 1  # one message asked, not twenty
        assert gw.runtime.attempts["deferred"] == 0 and gw.runtime.attempts["dead"] == 0
        assert reply in (gw.runtime.relay_hold or "")
        # The operator fixes the account and flushes: delivered without a restart.
        server.script.mail_reply = None
        gw.flush()
        server.wait_for(20)
        wait_for(lambda: gw.counts()["sent"] == 20, what="all sent")
        assert gw.runtime.uplink == "up"


def test_a_quota_pauses_until_its_window_then_delivers(
    pki: Pki, make_gateway: Callable[..., Gateway]
) -> None:
    """quota_retry scaled down to 2 s (1 h by default): one message asks per window."""
    quota = "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException"
    with SmtpServer(pki, "starttls") as server:
        server.script.data_refusal = quota
        gw = make_gateway(smtp_conf(server, pki, extra='quota_retry = "2s"\n'))
        alerts = [alert(f"a{i}") for i in range(20)]
        gw.add(*alerts)
        wait_for(lambda: gw.runtime.uplink == "paused", what="paused")
        assert "sending quota" in (gw.runtime.relay_hold or "")
        t0 = time.monotonic()
        wait_for(lambda: server.script.refused >= 2, what="a second try after the window")
        assert time.monotonic() - t0 >= 1.5  # not before the window
        server.script.data_refusal = None  # the quota's window resets
        got = server.wait_for(20, timeout=20)
        wait_for(lambda: gw.counts()["sent"] == 20, what="all sent")
        assert gw.counts()["dead"] == 0
        assert len({r.message_id for r in got}) == 20 and len(got) == 20
        assert server.script.refused <= 3  # one message per window, never the queue
        assert gw.runtime.attempts["deferred"] == 0


def test_the_same_5xx_for_several_messages_in_a_row_pauses(
    pki: Pki, make_gateway: Callable[..., Gateway]
) -> None:
    """auth_retry scaled down to 1 s: after each pause the same reply pauses again at
    once; only the messages before the first pause are dead."""
    with SmtpServer(pki, "starttls") as server:
        server.script.data_refusal = "554 5.7.1 Service unavailable; Client host blocked"
        gw = make_gateway(smtp_conf(server, pki, extra='auth_retry = "1s"\n'))
        gw.add(*[alert(f"a{i}") for i in range(20)])
        wait_for(lambda: gw.runtime.uplink == "paused", what="paused")
        assert "different messages in a row" in (gw.runtime.relay_hold or "")
        wait_for(lambda: gw.runtime.attempts["paused"] >= 3, what="three pauses")
        kept = 20 - (uplink.SAME_REFUSALS - 1)
        wait_for(lambda: gw.counts()["queued"] == kept, what="the rest kept")
        assert gw.counts()["dead"] == uplink.SAME_REFUSALS - 1
        server.script.data_refusal = None
        server.wait_for(kept)
        wait_for(lambda: gw.counts()["sent"] == kept, what="the rest sent")


def test_replies_about_each_message_dead_letter_without_pausing(
    pki: Pki, make_gateway: Callable[..., Gateway]
) -> None:
    with SmtpServer(pki, "starttls") as server:
        server.script.rcpt_replies["ops@example.com"] = "550 5.1.1 no such user"
        gw = make_gateway(smtp_conf(server, pki))
        gw.add(*[alert(f"a{i}") for i in range(6)])
        wait_for(lambda: gw.counts()["dead"] == 6, what="all dead")
        assert gw.runtime.uplink == "up" and gw.runtime.attempts["paused"] == 0


RELAY_DENIED = "554 5.7.1 <ops@example.com>: Relay access denied"


def test_relay_access_denied_for_every_recipient_pauses_after_a_streak(
    pki: Pki, make_gateway: Callable[..., Gateway]
) -> None:
    """Every RCPT refused with the same 5.7.1: the account's problem (a relay that will
    not relay for it), so the relay pauses after SAME_REFUSALS - 1 dead letters instead
    of dead-lettering the whole queue (invariant 12)."""
    with SmtpServer(pki, "starttls") as server:
        server.script.rcpt_replies["ops@example.com"] = RELAY_DENIED
        gw = make_gateway(smtp_conf(server, pki, extra='auth_retry = "1h"\n'))
        gw.add(*[alert(f"a{i}") for i in range(12)])
        wait_for(lambda: gw.runtime.uplink == "paused", what="paused")
        wait_for(lambda: gw.counts()["queued"] == 12 - (uplink.SAME_REFUSALS - 1), what="kept")
        time.sleep(0.5)
        assert gw.counts()["dead"] == uplink.SAME_REFUSALS - 1
        assert "Relay access denied" in (gw.runtime.relay_hold or "")


def test_relay_access_denied_at_the_primary_hands_over_to_the_fallback(
    pki: Pki, make_gateway: Callable[..., Gateway], password_file: Path
) -> None:
    with SmtpServer(pki, "starttls") as primary, SmtpServer(pki, "starttls") as fallback:
        primary.script.rcpt_replies["ops@example.com"] = RELAY_DENIED
        conf = smtp_conf(
            primary,
            pki,
            extra=(
                f'auth_retry = "1h"\npassword_file = "{password_file}"\n[[smtp.fallback]]\n'
                f'host = "127.0.0.1"\nport = {fallback.port}\nca_file = "{pki.ca_file}"\n'
                f'username = "gw@example.com"\npassword_file = "{password_file}"\n'
            ),
        )
        gw = make_gateway(conf)
        gw.add(*[alert(f"a{i}") for i in range(12)])
        kept = 12 - (uplink.SAME_REFUSALS - 1)
        fallback.wait_for(kept, timeout=20)
        wait_for(lambda: gw.counts()["sent"] == kept, what="the rest sent via the fallback")
        assert gw.counts()["dead"] == uplink.SAME_REFUSALS - 1
        assert gw.runtime.hosts[0]["state"] == "paused"
