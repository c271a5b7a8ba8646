"""Builders of the sections that reach another machine: [smtp] and [mqtt].

Both carry credentials, so both keep invariant 7: nothing but loopback may see a
message or a credential in clear. The secret files and TLS files are checked as the
daemon will read them (checks.py), so a bad one stops check-config, not the daemon.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from gateway.config.addresses import check_helo_name, normalize_address
from gateway.config.checks import (
    check_host,
    check_topic_filter,
    is_loopback_host,
    mqtt_string_problem,
    secret_file_problem,
    tls_files_problems,
)
from gateway.config.loader import Table
from gateway.config.sections import mqtt_receipt_keys
from gateway.config.units import parse_duration, parse_rate
from gateway.config.values import MqttSection, OAuthSection, SmtpSection


def _connection(t: Table) -> tuple[dict[str, Any], Any]:
    """The keys of one smarthost's connection ([smtp] or a [[smtp.fallback]]), and its
    host as written (None when missing or not a string)."""
    tls = t.text("tls", "starttls", choices=("starttls", "implicit", "none")) or "starttls"
    default_port = {"starttls": 587, "implicit": 465, "none": 25}[tls]
    host = t.text("host")
    helo_name = t.text("helo_name", None)
    t.seen.add("oauth")
    oauth = (
        oauth_section(t.loader.table(f"{t.name}.oauth", t.data["oauth"]))
        if "oauth" in t.data
        else None
    )
    if isinstance(helo_name, str) and (why := check_helo_name(helo_name)):
        t.loader.problem(t.name, "helo_name", why)
    keys = {
        "host": host or "",
        "port": t.integer("port", default_port, lo=1, hi=65535),
        "tls": tls,
        "username": t.text("username", None),
        "password_file": t.path("password_file", None),
        "oauth_token_file": t.path("oauth_token_file", None),
        "ca_file": t.path("ca_file", None, must_exist=True),
        "helo_name": helo_name,
        "oauth": oauth,
        "rate_limit": _rate_limit(t),
        # Most submission servers allow a few sessions per account or client (Postfix's
        # smtpd_client_connection_count_limit is 50, Microsoft 365 allows 3 per mailbox);
        # past 16 a gateway gains nothing and a shared smarthost sees a crowd.
        "sessions": t.integer("sessions", 1, lo=1, hi=MAX_SESSIONS),
    }
    return keys, host


MAX_SESSIONS = 16


def smtp_section(t: Table) -> SmtpSection:
    connection, host = _connection(t)
    sender = t.text("from")
    if isinstance(sender, str):
        try:
            # Downstream code (envelope, From header) gets the IDNA form.
            sender = normalize_address(sender)
        except ValueError as exc:
            t.loader.problem(t.name, "from", str(exc))
    section = SmtpSection(
        **connection,
        sender=sender or "",
        # aiosmtplib waits this long for each reply; the relay counts as stuck after
        # six of them, and RFC 5321 §4.5.3.2 asks for at most minutes.
        timeout=t.duration("timeout", 30.0, minimum=1, maximum=3600),
        min_backoff=t.duration("min_backoff", 300.0, minimum=1),
        max_backoff=t.duration("max_backoff", 3600.0, minimum=1),
        probe_max=t.duration("probe_max", 60.0, minimum=1),
        batch=t.integer("batch", 100, lo=1, hi=10_000),
        # Each attempt with a wrong password counts toward the account's lockout: 15 min
        # is 2 failures in any 30 min and 4 an hour, under AD's common 5-in-30-min and
        # Microsoft 365 smart lockout's 10 (docs/CONFIG.md).
        auth_retry=t.duration("auth_retry", 900.0, minimum=1),
        # Quotas are counted over a rolling day (Gmail, Microsoft 365, SES) and the reply
        # does not say when it ends: one message an hour finds the end within the hour.
        quota_retry=t.duration("quota_retry", 3600.0, minimum=1),
        # "Slow down" pauses double from 30 s up to this: long enough for a smarthost's
        # per-minute window to pass, short enough that the queue moves within minutes.
        throttle_max=t.duration("throttle_max", 600.0, minimum=1, maximum=86400),
        # A fleet that lost the same uplink comes back in step; 30 s spreads 100 devices
        # to about 3 sessions a second, and delays an alert after an outage by at most
        # half a minute (docs/CONFIG.md).
        return_jitter=t.duration("return_jitter", 30.0, maximum=3600),
        drain_within=_drain_within(t),
    )
    t.seen.add("fallback")
    t.done()
    _check_smtp(t, section, host)
    tables = t.loader.tables("smtp.fallback", t.data.get("fallback"))
    fallbacks = tuple(fallback_section(f, section) for f in tables)
    _check_distinct(t, (section, *fallbacks))
    return replace(section, fallbacks=fallbacks)


# The keys that say how the relay behaves rather than where it connects: one value for
# every smarthost, so that a failover changes the path, not the mail or its schedule.
SHARED_KEYS = (
    "from",
    "timeout",
    "min_backoff",
    "max_backoff",
    "probe_max",
    "batch",
    "auth_retry",
    "quota_retry",
    "throttle_max",
    "return_jitter",
    "drain_within",  # the drain plan reckons with the primary's rate_limit
    "fallback",
)


def fallback_section(t: Table, primary: SmtpSection) -> SmtpSection:
    """One [[smtp.fallback]]: its own connection keys, the primary's shared ones."""
    connection, host = _connection(t)
    for key in SHARED_KEYS:
        if key in t.data:
            t.seen.add(key)
            t.loader.problem(
                t.name,
                key,
                "is shared by every smarthost; set it once in [smtp], not in a "
                "[[smtp.fallback]] (a fallback has only connection keys: host, port, tls, "
                "ca_file, username, password_file, oauth_token_file, [smtp.fallback.oauth], "
                "helo_name, sessions, rate_limit)",
            )
    t.done()
    section = replace(primary, **connection, fallbacks=())
    _check_smtp(t, section, host)
    _check_fallback_secrets(t, section)
    return section


def _check_fallback_secrets(t: Table, section: SmtpSection) -> None:
    """A fallback's secrets are its own files: the service's credentials (smtp-password,
    smtp-oauth-secret, smtp-oauth-refresh-token) and `mailgw oauth login` are the
    primary's, so a fallback relying on them would log in with the primary's secret, or
    never get a token at all."""
    oauth = section.oauth
    where = f"{t.name}.oauth"
    if oauth is None:
        if section.username and not (section.password_file or section.oauth_token_file):
            t.loader.problem(
                t.name,
                "password_file",
                "is required with username in a [[smtp.fallback]]: the service credential "
                "smtp-password is the primary's; write this account's password to a file "
                "of its own (mode 0600) and name it here",
            )
        return
    if oauth.device_url:
        t.loader.problem(
            where,
            "device_url",
            "`mailgw oauth login` signs in only the primary's [smtp.oauth], so this fallback "
            "would never get a token: sign in for it with a copy of the config where this "
            "table is [smtp.oauth], put the refresh token in a file (mode 0600), set "
            "refresh_token_file here and remove device_url",
        )
    elif oauth.grant == "refresh_token" and oauth.refresh_token_file is None:
        t.loader.problem(
            where,
            "refresh_token_file",
            "is required in a [[smtp.fallback]]: the service credential "
            "smtp-oauth-refresh-token is the primary's",
        )
    if oauth.grant == "client_credentials" and oauth.client_secret_file is None:
        t.loader.problem(
            where,
            "client_secret_file",
            "is required in a [[smtp.fallback]]: the service credential smtp-oauth-secret "
            "is the primary's",
        )


def _check_distinct(t: Table, hosts: tuple[SmtpSection, ...]) -> None:
    seen: dict[tuple[str, int], int] = {}
    for i, h in enumerate(hosts):
        if not h.host:
            continue
        key = (h.host.lower(), h.port)
        if key in seen:
            where = "[smtp]" if seen[key] == 0 else f"smtp.fallback[{seen[key] - 1}]"
            t.loader.problem(
                f"smtp.fallback[{i - 1}]",
                "host",
                f"{h.host}:{h.port} is already listed as {where}; a fallback must be "
                "another smarthost (or another port)",
            )
        seen.setdefault(key, i)


# Past these a rate limit is a mistake, not a limit: over 100 mails a second no smarthost
# account is allowed and the relay could not send them; under one a day holds alerts
# back for days.
MAX_SEND_RATE = 100.0
MIN_SEND_RATE = 1 / 86400


def _rate_limit(t: Table) -> tuple[int, float] | None:
    text = t.text("rate_limit", None)
    if text is None:
        return None
    try:
        count, period = parse_rate(text)
    except ValueError as exc:
        t.loader.problem(t.name, "rate_limit", str(exc))
        return None
    if count / period > MAX_SEND_RATE:
        t.loader.problem(
            t.name,
            "rate_limit",
            f"{text!r} is over {MAX_SEND_RATE:g} mails a second, more than any smarthost "
            'account allows; write the account\'s limit (Microsoft 365: "30/min") or remove '
            "the key",
        )
        return None
    if count / period < MIN_SEND_RATE:
        t.loader.problem(
            t.name,
            "rate_limit",
            f'{text!r} is under one mail a day: alerts would wait days; write at least "1/d"',
        )
        return None
    return count, period


DRAIN_DEFAULT = 1800.0  # with a rate limit: a backlog past 30 min of sending is folded
DRAIN_MIN, DRAIN_MAX = 60.0, 7 * 86400.0


def _drain_within(t: Table) -> float | None:
    """smtp.drain_within: the bound of the drain plan (gateway.drain), reckoned at
    smtp.rate_limit. "30m" by default with a rate limit, nothing without one; "off" or
    a zero duration turns it off."""
    t.seen.add("drain_within")
    has_rate = isinstance(t.data.get("rate_limit"), str)
    raw = t.data.get("drain_within")
    if raw is None:
        return DRAIN_DEFAULT if has_rate else None
    if raw == "off" or (isinstance(raw, str) and _is_zero(raw)):
        return None
    within = t.duration("drain_within", None, minimum=DRAIN_MIN, maximum=DRAIN_MAX)
    if within is None or within < DRAIN_MIN:
        return None  # the problem is reported
    if not has_rate:
        t.loader.problem(
            t.name,
            "drain_within",
            "needs smtp.rate_limit: the drain plan reckons a backlog's time at that rate; "
            'set rate_limit (Microsoft 365: "30/min") or remove drain_within',
        )
        return None
    return float(within)


def _is_zero(text: str) -> bool:
    try:
        return text.strip() == "0" or parse_duration(text) == 0
    except ValueError:
        return False


def _check_smtp(t: Table, section: SmtpSection, host: Any) -> None:
    """The checks that span keys; `host` as written (None when missing or not a string)."""
    tls = section.tls
    username = section.username
    password_file = section.password_file
    oauth_token_file = section.oauth_token_file
    if isinstance(host, str) and (why := check_host(host)):
        t.loader.problem(t.name, "host", why)
    if tls == "none":
        # Invariant 7: nothing but loopback may see a message or a credential in clear.
        if isinstance(host, str) and host and not is_loopback_host(host):
            t.loader.problem(
                t.name,
                "tls",
                f'"none" is only allowed for a loopback host, not '
                f'{host!r}; use "starttls" (port 587) or "implicit" (port 465)',
            )
        if username or password_file or oauth_token_file:
            t.loader.problem(
                t.name,
                "tls",
                '"none" cannot be combined with AUTH (username, '
                "password_file): credentials would travel in clear",
            )
    for key, p in (("password_file", password_file), ("oauth_token_file", oauth_token_file)):
        if isinstance(p, Path) and (why := secret_file_problem(p)):
            t.loader.problem(t.name, key, why)
    for key, why in tls_files_problems(section.ca_file):
        t.loader.problem(t.name, key, why)
    if (password_file or oauth_token_file or section.oauth) and not username:
        t.loader.problem(
            t.name,
            "username",
            "is required when a password or token is configured (with [smtp.oauth]: the "
            "mailbox to send as)",
        )
    if section.oauth and (password_file or oauth_token_file):
        key = "password_file" if password_file else "oauth_token_file"
        t.loader.problem(t.name, key, "cannot be combined with [smtp.oauth]; remove one")
    if section.oauth and tls == "none":
        t.loader.problem(t.name, "tls", '"none" cannot be combined with [smtp.oauth]')
    if section.min_backoff > section.max_backoff and not section.fallbacks and t.name == "smtp":
        t.loader.problem(t.name, "min_backoff", "must not exceed max_backoff")


def oauth_section(t: Table) -> OAuthSection:
    """[smtp.oauth]: what gateway/oauth.py needs to fetch and refresh access tokens."""
    grant = t.text("grant", "client_credentials", choices=("client_credentials", "refresh_token"))
    token_url = t.text("token_url")
    device_url = t.text("device_url", None)
    for key, url in (("token_url", token_url), ("device_url", device_url)):
        if isinstance(url, str) and (why := _token_url_problem(url)):
            t.loader.problem(t.name, key, why)
    section = OAuthSection(
        token_url=token_url or "",
        client_id=t.text("client_id") or "",
        grant=grant or "client_credentials",
        client_secret_file=t.path("client_secret_file", None),
        refresh_token_file=t.path("refresh_token_file", None),
        scope=t.text("scope", None),
        mechanism=(
            t.text("mechanism", "xoauth2", choices=("xoauth2", "oauthbearer")) or "xoauth2"
        ).upper(),
        ca_file=t.path("ca_file", None, must_exist=True),
        device_url=device_url,
    )
    t.done()
    for key in ("client_secret_file", "refresh_token_file"):
        p = getattr(section, key)
        if isinstance(p, Path) and (why := secret_file_problem(p)):
            t.loader.problem(t.name, key, why)
    for key, why in tls_files_problems(section.ca_file):
        t.loader.problem(t.name, key, why)
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    credential = bool(creds) and (Path(creds or "") / "smtp-oauth-refresh-token").exists()
    if section.grant == "refresh_token" and not (
        section.refresh_token_file or section.device_url or credential
    ):
        t.loader.problem(
            t.name,
            "refresh_token_file",
            'is required with grant = "refresh_token", unless device_url is set (then '
            "`mailgw oauth login` gets one) or the service has the credential "
            "smtp-oauth-refresh-token; see docs/OPERATIONS.md",
        )
    if section.device_url and section.grant != "refresh_token":
        t.loader.problem(
            t.name, "device_url", 'needs grant = "refresh_token" (what the login gives)'
        )
    if section.grant == "client_credentials" and not section.scope:
        t.loader.problem(
            t.name,
            "scope",
            'is required with grant = "client_credentials" (Microsoft 365: '
            '"https://outlook.office365.com/.default")',
        )
    return section


def _token_url_problem(url: str) -> str | None:
    """The token endpoint gets the client secret or refresh token: HTTPS only."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError as exc:
        return f"{url!r} is not a URL: {exc}"
    if parts.scheme != "https" or not host:
        return f"{url!r} must be an https:// URL (the secret must not travel in clear)"
    return check_host(host) if not host.startswith("[") else None


def mqtt_section(t: Table) -> MqttSection:
    topics = t.strings("topics", ("alerts/#",)) or ()
    if "topics" in t.data and isinstance(t.data["topics"], list) and not topics:
        t.loader.problem(t.name, "topics", 'needs at least one topic filter, e.g. ["alerts/#"]')
    for topic in topics:
        if why := check_topic_filter(topic):
            t.loader.problem(t.name, "topics", why)
    tls = t.flag("tls", False)
    section = MqttSection(
        host=t.text("host", "127.0.0.1"),
        port=t.integer("port", 8883 if tls else 1883, lo=1, hi=65535),
        topics=topics,
        protocol=t.text("protocol", "3.1.1", choices=("3.1.1", "5")) or "3.1.1",
        client_id=t.text("client_id", None),
        username=t.text("username", None),
        password_file=t.path("password_file", None),
        tls=tls,
        ca_file=t.path("ca_file", None, must_exist=True),
        cert_file=t.path("cert_file", None, must_exist=True),
        key_file=t.path("key_file", None, must_exist=True),
        keepalive=t.integer("keepalive", 30, lo=5, hi=3600),
        accept_retained=t.flag("accept_retained", False),
        # 0 would reject every alert. An alert keeps 8 KiB of message and 64 fields of
        # 1 KiB; a payload is held several times over while it is read and parsed (paho's
        # buffer, a copy, the text, the JSON objects), so 1 MiB keeps a message's peak
        # within the unit's MemoryMax with room to spare.
        max_payload=t.size("max_payload", 64 * 1024, lo=1, hi=1 << 20),
        max_inflight=t.integer("max_inflight", 500, lo=1, hi=65535),
        status_interval=t.duration("status_interval", 60.0, minimum=1),
        **mqtt_receipt_keys(t, topics),
    )
    t.done()
    _check_mqtt(t, section)
    return section


def _check_mqtt(t: Table, section: MqttSection) -> None:
    """The checks that span keys: names, credentials, TLS files."""
    tls = section.tls
    host = section.host
    if isinstance(host, str) and (why := check_host(host)):
        t.loader.problem(t.name, "host", why)
    for key in ("client_id", "username"):
        value = getattr(section, key)
        if isinstance(value, str) and (why := mqtt_string_problem(value)):
            t.loader.problem(t.name, key, why)
    if section.password_file and (why := secret_file_problem(section.password_file)):
        t.loader.problem(t.name, "password_file", why)
    if section.password_file and not section.username:
        t.loader.problem(t.name, "username", "is required when password_file is set")
    if (
        (section.username or section.password_file)
        and not tls
        and isinstance(host, str)
        and not is_loopback_host(host)
    ):
        # Invariant 7, as for SMTP: MQTT's CONNECT carries the password as it is.
        t.loader.problem(
            t.name,
            "tls",
            f"must be true when username or password_file is set for a broker that is not "
            f"on loopback ({host!r}): credentials would travel in clear; set tls = true "
            "(port 8883)",
        )
    if not tls:
        for key in ("ca_file", "cert_file", "key_file"):
            if getattr(section, key):
                t.loader.problem(t.name, key, "has no effect without tls = true; set tls = true")
    elif section.key_file and not section.cert_file:
        t.loader.problem(t.name, "key_file", "needs cert_file (the client certificate)")
    else:
        for key, why in tls_files_problems(section.ca_file, section.cert_file, section.key_file):
            t.loader.problem(t.name, key, why)
