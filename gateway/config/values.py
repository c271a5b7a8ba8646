"""The configuration as values: frozen dataclasses, one per section.

Each holds what the builders have already checked (addresses in their ASCII form,
durations in seconds), so the parts built from a Config need not validate again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gateway.config.sendmail import SendmailSection

SEVERITIES = ("debug", "info", "warning", "critical")
DEFAULT_SUBJECT = "[{severity}] {device_id}/{sensor}: {message}"
# What makes two alerts "the same" for dedupe unless a route says otherwise.
DEFAULT_KEY = "{topic}|{sensor}|{severity}|{message}"


@dataclass(frozen=True, slots=True)
class Policy:
    """A route's storm control (gateway/storm.py applies it)."""

    dedupe_window: float = 0.0  # seconds; 0 = off
    rate: tuple[int, float] | None = None  # (mails, per seconds)
    digest_every: float = 3600.0
    critical_bypass: bool = True
    key: str = DEFAULT_KEY

    @property
    def active(self) -> bool:
        return bool(self.dedupe_window or self.rate)


@dataclass(frozen=True, slots=True)
class GatewaySection:
    device_id: str
    state_dir: Path
    runtime_dir: Path
    default_route: str | None = None


@dataclass(frozen=True, slots=True)
class OutboxSection:
    max_messages: int = 100_000
    max_age: float = 5 * 86400
    sent_retention: float = 7 * 86400
    allow_volatile: bool = False
    commit_batch: int = 1000
    commit_interval: float = 0.005
    # Room by kind (gateway/outbox/room.py): alerts keep what local mail may not take.
    local_percent: int = 10
    local_user_percent: int = 25
    unrouted_percent: int = 10
    keep_unrouted: float = 86400


@dataclass(frozen=True, slots=True)
class OAuthSection:
    """[smtp.oauth]: access tokens fetched and refreshed by the gateway (gateway/oauth.py)."""

    token_url: str
    client_id: str
    grant: str = "client_credentials"  # client_credentials | refresh_token
    client_secret_file: Path | None = None
    refresh_token_file: Path | None = None
    scope: str | None = None
    mechanism: str = "XOAUTH2"  # XOAUTH2 | OAUTHBEARER
    ca_file: Path | None = None  # for the token endpoint; default: the system store
    device_url: str | None = None  # RFC 8628 device authorization, for `mailgw oauth login`


@dataclass(frozen=True, slots=True)
class SmtpSection:
    host: str
    port: int
    tls: str  # starttls | implicit | none
    sender: str  # the `from` key
    username: str | None = None
    password_file: Path | None = None
    oauth_token_file: Path | None = None
    ca_file: Path | None = None
    timeout: float = 30.0
    helo_name: str | None = None
    min_backoff: float = 300.0
    max_backoff: float = 3600.0
    probe_max: float = 60.0
    batch: int = 100
    # After the smarthost refused our login, or the account (auth required, send-as),
    # no session is tried again before this: see docs/CONFIG.md for the lockout sums.
    auth_retry: float = 900.0
    quota_retry: float = 3600.0  # after a quota reply: one message tries again after this
    oauth: OAuthSection | None = None
    rate_limit: tuple[int, float] | None = None  # (mails, per seconds) for the whole gateway
    throttle_max: float = 600.0  # the longest pause after "slow down" replies (421, 451 4.7.x)
    return_jitter: float = 30.0  # a random wait of up to this before returning after an outage
    # A backlog that would take longer than this at rate_limit is folded (gateway.drain);
    # None: no drain plan (no rate limit, or "off").
    drain_within: float | None = None
    sessions: int = 1  # the most parallel sessions to this smarthost
    # [[smtp.fallback]]: smarthosts tried in order while this one (the primary) cannot be
    # used. Each is a whole SmtpSection: its own connection keys, the primary's shared ones.
    fallbacks: tuple[SmtpSection, ...] = ()

    @property
    def hosts(self) -> tuple[SmtpSection, ...]:
        """Every smarthost in the order they are tried: this one, then the fallbacks."""
        return (self, *self.fallbacks)

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class MqttSection:
    host: str = "127.0.0.1"
    port: int = 1883
    topics: tuple[str, ...] = ("alerts/#",)
    protocol: str = "3.1.1"
    client_id: str | None = None
    username: str | None = None
    password_file: Path | None = None
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive: int = 30
    accept_retained: bool = False
    max_payload: int = 64 * 1024
    max_inflight: int = 500
    status_interval: float = 60.0
    receipts: bool = True  # publish receipts to publishers that ask (gateway/receipts.py)
    receipt_topic: str = "receipts/{sensor}"  # for a JSON correlation_id without reply_to
    receipt_prefix: str = "receipts/"  # every receipt topic must start with this


@dataclass(frozen=True, slots=True)
class SerialSection:
    port: str
    name: str
    baudrate: int = 115200
    protocol: str = "framed"  # framed | lines
    line_regex: str | None = None
    sensor: str = "serial"
    severity: str = "warning"


@dataclass(frozen=True, slots=True)
class RouteSection:
    name: str
    match: str
    to: tuple[str, ...]
    cc: tuple[str, ...] = ()
    min_severity: str = "info"
    subject: str = DEFAULT_SUBJECT
    body: str | None = None
    priority: int | None = None  # 0-9; default: the alert's severity (0-3)
    storm: Policy = field(default_factory=Policy)


@dataclass(frozen=True, slots=True)
class MetricsSection:
    textfile: Path | None = None


@dataclass(frozen=True, slots=True)
class SilenceSection:
    """A dead man's switch rule (gateway/silence.py): who must speak how often."""

    name: str
    match: str = "#"
    sensor: str | None = None  # only this sensor; None: every sensor on the topics
    expect_every: float = 900.0
    severity: str = "warning"
    route: str | None = None  # None: routed by the alert's topic like any other


@dataclass(frozen=True, slots=True)
class SelfAlertsSection:
    """The gateway's own troubles as alerts (gateway/selfwatch.py)."""

    # On: nobody reads a truck's journal, and a device whose port or broker is gone is
    # exactly what its owner wants mailed. Rate-limited per condition, so few mails.
    enabled: bool = True
    route: str | None = None
    severity: str = "warning"
    min_interval: float = 900.0  # at most one raise per condition per interval
    clear_after: float = 30.0  # a condition must stay clear this long to be resolved
    serial_after: float = 60.0
    mqtt_after: float = 120.0
    store_after: float = 30.0
    clock_after: float = 900.0
    outbox_percent: int = 80
    disk_free_percent: int = 5


@dataclass(frozen=True, slots=True)
class HeartbeatSection:
    """A periodic summary of the device (gateway/heartbeat.py); off without `every`."""

    every: float | None = None
    route: str | None = None
    severity: str = "info"


@dataclass(frozen=True, slots=True)
class Config:
    gateway: GatewaySection
    outbox: OutboxSection
    smtp: SmtpSection | None
    mqtt: MqttSection | None
    serial: tuple[SerialSection, ...]
    routes: tuple[RouteSection, ...]
    metrics: MetricsSection = field(default_factory=MetricsSection)
    path: Path | None = None
    silence: tuple[SilenceSection, ...] = ()
    selfalerts: SelfAlertsSection = field(default_factory=SelfAlertsSection)
    heartbeat: HeartbeatSection = field(default_factory=HeartbeatSection)
    sendmail: SendmailSection = field(default_factory=SendmailSection)

    @property
    def outbox_path(self) -> Path:
        return self.gateway.state_dir / "outbox.db"

    @property
    def storm_policies(self) -> dict[str, Policy]:
        """Storm control of the routes that have any, by route name."""
        return {r.name: r.storm for r in self.routes if r.storm.active}

    def summary(self) -> str:
        parts = [f"device {self.gateway.device_id}", f"outbox {self.outbox_path}"]
        if self.smtp:
            parts.append(f"smtp {self.smtp.host}:{self.smtp.port} ({self.smtp.tls})")
            if self.smtp.sessions > 1:
                parts.append(f"{self.smtp.sessions} sessions")
            if self.smtp.fallbacks:
                parts.append("fallback " + ", ".join(f.where for f in self.smtp.fallbacks))
        else:
            parts.append("no [smtp]: alerts are queued, not relayed")
        if self.mqtt:
            parts.append(f"mqtt {self.mqtt.host}:{self.mqtt.port} {list(self.mqtt.topics)}")
        if self.serial:
            parts.append(f"{len(self.serial)} serial port(s)")
        parts.append(f"{len(self.routes)} route(s)")
        return ", ".join(parts)
