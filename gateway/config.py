"""Load the TOML configuration into frozen, typed values.

Every problem is collected (not just the first) and reported with its key, the
line it is on where the file gives it, and what to do. Unknown keys are errors:
a misspelt `max_mesages` silently meaning "use the default" is how a device ends
up with a queue bound nobody chose.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import stat
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.utils import parseaddr
from pathlib import Path
from typing import Any, TypeVar

from gateway.errors import ConfigError
from gateway.storm import DEFAULT_KEY, Policy, parse_rate

DEFAULT_PATH = Path("/etc/mailgw/gateway.toml")

SEVERITIES = ("debug", "info", "warning", "critical")
DEFAULT_SUBJECT = "[{severity}] {device_id}/{sensor}: {message}"

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB|k|K|M|G)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "k": 1024,
    "K": 1024,
    "KiB": 1024,
    "KB": 1000,
    "M": 1 << 20,
    "MiB": 1 << 20,
    "MB": 1_000_000,
    "G": 1 << 30,
    "GiB": 1 << 30,
    "GB": 10**9,
}


def parse_duration(text: str) -> float:
    """`"90s"`, `"15m"`, `"1h30m"`, `"5d"` → seconds. Raises ValueError."""
    compact = text.replace(" ", "")
    pos = 0
    total = 0.0
    for m in _DURATION_RE.finditer(compact):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if not compact or pos != len(compact):
        raise ValueError(f'not a duration: {text!r} (use e.g. "30s", "15m", "1h30m", "5d")')
    return total


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def parse_size(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            return int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    raise ValueError(f'not a size: {value!r} (use bytes or e.g. "64KiB")')


def is_loopback_host(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_address(text: str) -> str | None:
    """Return why `text` is not a usable mail address, or None if it is."""
    if any(c in text for c in "\r\n\0"):
        return "contains a line break or NUL"
    _, addr = parseaddr(text)
    if not addr or "@" not in addr or addr.startswith("@") or addr.endswith("@"):
        return f"{text!r} is not a mail address (expected e.g. ops@example.com)"
    return None


def check_topic_filter(text: str) -> str | None:
    """Validate an MQTT topic filter (MQTT 3.1.1 §4.7.1)."""
    if not text:
        return "a topic filter cannot be empty"
    if "\0" in text:
        return "a topic filter cannot contain NUL"
    levels = text.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return f"{text!r}: '#' must be a whole level and the last one"
        if "+" in level and level != "+":
            return f"{text!r}: '+' must be a whole level"
    return None


# --- the values --------------------------------------------------------------


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
class Config:
    gateway: GatewaySection
    outbox: OutboxSection
    smtp: SmtpSection | None
    mqtt: MqttSection | None
    serial: tuple[SerialSection, ...]
    routes: tuple[RouteSection, ...]
    metrics: MetricsSection = field(default_factory=MetricsSection)
    path: Path | None = None

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
        else:
            parts.append("no [smtp]: alerts are queued, not relayed")
        if self.mqtt:
            parts.append(f"mqtt {self.mqtt.host}:{self.mqtt.port} {list(self.mqtt.topics)}")
        if self.serial:
            parts.append(f"{len(self.serial)} serial port(s)")
        parts.append(f"{len(self.routes)} route(s)")
        return ", ".join(parts)


# --- reading -----------------------------------------------------------------


class _Lines:
    """Map (table, key) → line number, by a light scan of the TOML text.

    tomllib gives no positions for values, and a full position-keeping parser
    is not worth its weight here: tables and keys at the start of a line cover
    every config we document.
    """

    _HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.-]+)\s*\]\]?")
    _KEY = re.compile(r"^\s*([A-Za-z0-9_-]+|\"[^\"]*\")\s*=")

    def __init__(self, text: str) -> None:
        self._lines: dict[tuple[str, str], int] = {}
        counts: dict[str, int] = {}
        table = ""
        for no, line in enumerate(text.splitlines(), 1):
            m = self._HEADER.match(line)
            if m:
                name = m.group(2)
                if m.group(1) == "[[":
                    index = counts.get(name, 0)
                    counts[name] = index + 1
                    table = f"{name}[{index}]"
                else:
                    table = name
                self._lines.setdefault((table, ""), no)
                continue
            m = self._KEY.match(line)
            if m:
                self._lines.setdefault((table, m.group(1).strip('"')), no)

    def find(self, table: str, key: str) -> int | None:
        return self._lines.get((table, key)) or self._lines.get((table, ""))


T = TypeVar("T")
_MISSING: Any = object()


class _Table:
    """Typed access to one TOML table, collecting problems instead of raising."""

    def __init__(self, loader: _Loader, name: str, data: object) -> None:
        self.loader = loader
        self.name = name
        self.seen: set[str] = set()
        if isinstance(data, dict):
            self.data: dict[str, Any] = data
        else:
            loader.problem(name, "", f"must be a table, got {type(data).__name__}")
            self.data = {}

    def _get(self, key: str, default: T, kind: str, check: Callable[[Any], bool]) -> Any:
        self.seen.add(key)
        if key not in self.data:
            if default is _MISSING:
                self.loader.problem(self.name, key, "is required")
                return None
            return default
        value = self.data[key]
        if not check(value):
            self.loader.problem(
                self.name, key, f"must be {kind}, got {type(value).__name__} {value!r}"
            )
            return None if default is _MISSING else default
        return value

    def text(self, key: str, default: Any = _MISSING, choices: tuple[str, ...] = ()) -> Any:
        value = self._get(key, default, "a string", lambda v: isinstance(v, str))
        if choices and isinstance(value, str) and value not in choices:
            self.loader.problem(
                self.name, key, f"must be one of {', '.join(choices)}; got {value!r}"
            )
            return None if default is _MISSING else default
        return value

    def integer(self, key: str, default: Any = _MISSING, lo: int = 0, hi: int = 2**63) -> Any:
        value = self._get(
            key,
            default,
            "an integer",
            lambda v: isinstance(v, int) and not isinstance(v, bool),
        )
        if isinstance(value, int) and not lo <= value <= hi:
            self.loader.problem(self.name, key, f"must be between {lo} and {hi}; got {value}")
            return default if default is not _MISSING else None
        return value

    def flag(self, key: str, default: Any = _MISSING) -> Any:
        return self._get(key, default, "true or false", lambda v: isinstance(v, bool))

    def duration(self, key: str, default: Any = _MISSING, minimum: float = 0.0) -> Any:
        value = self._get(
            key, default, 'a duration string like "30s"', lambda v: isinstance(v, str)
        )
        if not isinstance(value, str):
            return value
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            self.loader.problem(self.name, key, str(exc))
            return default if default is not _MISSING else None
        if seconds < minimum:
            self.loader.problem(self.name, key, f"must be at least {minimum:g}s; got {value!r}")
        return seconds

    def size(self, key: str, default: Any = _MISSING) -> Any:
        self.seen.add(key)
        if key not in self.data:
            return default
        try:
            return parse_size(self.data[key])
        except ValueError as exc:
            self.loader.problem(self.name, key, str(exc))
            return default

    def strings(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(
            key,
            default,
            "a list of strings",
            lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
        )
        return tuple(value) if isinstance(value, list) else value

    def path(self, key: str, default: Any = None, must_exist: bool = False) -> Any:
        value = self.text(key, default)
        if not isinstance(value, str):
            return value
        p = Path(value)
        if must_exist and not p.exists():
            self.loader.problem(self.name, key, f"{p} does not exist; create it or fix the path")
        return p

    def done(self) -> None:
        for key in self.data:
            if key not in self.seen:
                self.loader.problem(
                    self.name,
                    key,
                    "unknown key; check its spelling against the "
                    "configuration reference (docs/CONFIG.md)",
                )


class _Loader:
    def __init__(self, text: str, source: str) -> None:
        self.lines = _Lines(text)
        self.source = source
        self.problems: list[str] = []
        self.opened: list[_Table] = []

    def problem(self, table: str, key: str, message: str) -> None:
        dotted = ".".join(p for p in (table, key) if p)
        line = self.lines.find(table, key)
        where = f"{self.source}:{line}" if line else self.source
        self.problems.append(f"{where}: {dotted}: {message}")

    def table(self, name: str, data: object) -> _Table:
        t = _Table(self, name, data)
        self.opened.append(t)
        return t

    def tables(self, name: str, data: object) -> Iterator[_Table]:
        if data is None:
            return
        if not isinstance(data, list):
            self.problem(name, "", f"must be an array of tables, written [[{name}]]")
            return
        for i, item in enumerate(data):
            yield self.table(f"{name}[{i}]", item)


def _secret_file_problem(path: Path) -> str | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return f"{path} does not exist; create it with the secret on one line (chmod 600)"
    except PermissionError:
        return None  # not ours to read at check time; the daemon's user may read it
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    if st.st_mode & 0o007:
        mode = stat.S_IMODE(st.st_mode)
        return f"{path} is readable by others (mode {mode:04o}); chmod 600 it (or 640 root:mailgw)"
    return None


def _gateway(t: _Table) -> GatewaySection:
    device_id = t.text("device_id", socket.gethostname())
    if isinstance(device_id, str) and not re.fullmatch(
        r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", device_id
    ):
        t.loader.problem(
            t.name,
            "device_id",
            f"{device_id!r}: use letters, digits, '.', '_', '-' "
            "(max 64); it appears in topics and Message-IDs",
        )
    section = GatewaySection(
        device_id=device_id or "mailgw",
        state_dir=t.path("state_dir", "/var/lib/mailgw") or Path("/var/lib/mailgw"),
        runtime_dir=t.path("runtime_dir", os.environ.get("RUNTIME_DIRECTORY", "/run/mailgw"))
        or Path("/run/mailgw"),
        default_route=t.text("default_route", None),
    )
    t.done()
    return section


def _outbox(t: _Table) -> OutboxSection:
    section = OutboxSection(
        max_messages=t.integer("max_messages", 100_000, lo=10),
        max_age=t.duration("max_age", 5 * 86400.0, minimum=60),
        sent_retention=t.duration("sent_retention", 7 * 86400.0),
        allow_volatile=t.flag("allow_volatile", False),
        commit_batch=t.integer("commit_batch", 1000, lo=1, hi=100_000),
        commit_interval=t.duration("commit_interval", 0.005),
    )
    t.done()
    return section


def _smtp(t: _Table) -> SmtpSection | None:
    tls = t.text("tls", "starttls", choices=("starttls", "implicit", "none")) or "starttls"
    default_port = {"starttls": 587, "implicit": 465, "none": 25}[tls]
    host = t.text("host")
    sender = t.text("from")
    username = t.text("username", None)
    password_file = t.path("password_file", None)
    oauth_token_file = t.path("oauth_token_file", None)
    section = SmtpSection(
        host=host or "",
        port=t.integer("port", default_port, lo=1, hi=65535),
        tls=tls,
        sender=sender or "",
        username=username,
        password_file=password_file,
        oauth_token_file=oauth_token_file,
        ca_file=t.path("ca_file", None, must_exist=True),
        timeout=t.duration("timeout", 30.0, minimum=1),
        helo_name=t.text("helo_name", None),
        min_backoff=t.duration("min_backoff", 300.0, minimum=1),
        max_backoff=t.duration("max_backoff", 3600.0, minimum=1),
        probe_max=t.duration("probe_max", 60.0, minimum=1),
        batch=t.integer("batch", 100, lo=1, hi=10_000),
    )
    t.done()
    if isinstance(sender, str) and (why := check_address(sender)):
        t.loader.problem(t.name, "from", why)
    if isinstance(host, str) and (not host or any(c.isspace() for c in host)):
        t.loader.problem(t.name, "host", f"{host!r} is not a host name or address")
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
        if isinstance(p, Path) and (why := _secret_file_problem(p)):
            t.loader.problem(t.name, key, why)
    if (password_file or oauth_token_file) and not username:
        t.loader.problem(t.name, "username", "is required when a password or token is configured")
    if section.min_backoff > section.max_backoff:
        t.loader.problem(t.name, "min_backoff", "must not exceed max_backoff")
    return section


def _mqtt(t: _Table) -> MqttSection:
    topics = t.strings("topics", ("alerts/#",)) or ()
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
        max_payload=t.size("max_payload", 64 * 1024),
        max_inflight=t.integer("max_inflight", 500, lo=1, hi=65535),
        status_interval=t.duration("status_interval", 60.0, minimum=1),
    )
    t.done()
    if section.password_file and (why := _secret_file_problem(section.password_file)):
        t.loader.problem(t.name, "password_file", why)
    return section


def _serial(t: _Table) -> SerialSection:
    port = t.text("port") or ""
    name = t.text("name", Path(port).name or "serial")
    regex = t.text("line_regex", None)
    if regex is not None:
        try:
            re.compile(regex)
        except re.error as exc:
            t.loader.problem(t.name, "line_regex", f"is not a valid regular expression: {exc}")
    section = SerialSection(
        port=port,
        name=name,
        baudrate=t.integer("baudrate", 115200, lo=50, hi=4_000_000),
        protocol=t.text("protocol", "framed", choices=("framed", "lines")) or "framed",
        line_regex=regex,
        sensor=t.text("sensor", "serial"),
        severity=t.text("severity", "warning", choices=SEVERITIES) or "warning",
    )
    t.done()
    return section


def _route(t: _Table, index: int) -> RouteSection:
    match = t.text("match", "#") or "#"
    name = t.text("name", f"route{index}") or f"route{index}"
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", name):
        t.loader.problem(
            t.name,
            "name",
            f"{name!r}: use letters, digits, '_' and '-' (max 32); it appears in Message-IDs",
        )
    if why := check_topic_filter(match):
        t.loader.problem(t.name, "match", why)
    to = t.strings("to") or ()
    cc = t.strings("cc", ()) or ()
    if not to:
        t.loader.problem(t.name, "to", "needs at least one recipient")
    for key, addrs in (("to", to), ("cc", cc)):
        for addr in addrs:
            if why := check_address(addr):
                t.loader.problem(t.name, key, why)
    section = RouteSection(
        name=name,
        match=match,
        to=to,
        cc=cc,
        min_severity=t.text("min_severity", "info", choices=SEVERITIES) or "info",
        subject=t.text("subject", DEFAULT_SUBJECT),
        body=t.text("body", None),
        priority=t.integer("priority", None, lo=0, hi=9),
        storm=_storm(t),
    )
    t.done()
    return section


def _storm(t: _Table) -> Policy:
    rate = None
    text = t.text("rate_limit", None)
    if text is not None:
        try:
            rate = parse_rate(text)
        except ValueError as exc:
            t.loader.problem(t.name, "rate_limit", str(exc))
    return Policy(
        dedupe_window=t.duration("dedupe_window", 0.0) or 0.0,
        rate=rate,
        digest_every=t.duration("digest_every", 3600.0, minimum=1) or 3600.0,
        critical_bypass=bool(t.flag("critical_bypass", True)),
        key=t.text("dedupe_key", DEFAULT_KEY) or DEFAULT_KEY,
    )


def parse(text: str, source: str = "<config>", path: Path | None = None) -> Config:
    """Parse and validate config text; raise ConfigError listing every problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: not valid TOML: {exc}"]) from None
    loader = _Loader(text, source)
    known = {"gateway", "outbox", "smtp", "mqtt", "serial", "route", "metrics"}
    for key in data:
        if key not in known:
            loader.problem("", key, f"unknown section; known: {', '.join(sorted(known))}")
    gateway = _gateway(loader.table("gateway", data.get("gateway", {})))
    outbox = _outbox(loader.table("outbox", data.get("outbox", {})))
    smtp = _smtp(loader.table("smtp", data["smtp"])) if "smtp" in data else None
    mqtt = _mqtt(loader.table("mqtt", data["mqtt"])) if "mqtt" in data else None
    serial = tuple(_serial(t) for t in loader.tables("serial", data.get("serial")))
    routes = tuple(_route(t, i) for i, t in enumerate(loader.tables("route", data.get("route"))))
    metrics_t = loader.table("metrics", data.get("metrics", {}))
    metrics = MetricsSection(textfile=metrics_t.path("textfile", None))
    metrics_t.done()

    names = [s.name for s in serial]
    for dup in {n for n in names if names.count(n) > 1}:
        loader.problem("serial", "name", f"two ports are named {dup!r}; give each a unique name")
    route_names = [r.name for r in routes]
    for dup in {n for n in route_names if route_names.count(n) > 1}:
        loader.problem("route", "name", f"two routes are named {dup!r}; give each a unique name")
    if gateway.default_route and gateway.default_route not in route_names:
        loader.problem(
            "gateway",
            "default_route",
            f"names no route; known routes: {', '.join(route_names) or 'none'}",
        )
    if loader.problems:
        raise ConfigError(loader.problems)
    return Config(
        gateway=gateway,
        outbox=outbox,
        smtp=smtp,
        mqtt=mqtt,
        serial=serial,
        routes=routes,
        metrics=metrics,
        path=path,
    )


def known_keys() -> dict[str, set[str]]:
    """Every key each section accepts, read off the loader itself (for the docs test)."""
    loader = _Loader("", "<schema>")
    _gateway(loader.table("gateway", {}))
    _outbox(loader.table("outbox", {}))
    _smtp(loader.table("smtp", {}))
    _mqtt(loader.table("mqtt", {}))
    _serial(loader.table("serial", {}))
    _route(loader.table("route", {}), 0)
    metrics = loader.table("metrics", {})
    metrics.path("textfile", None)
    return {t.name: set(t.seen) for t in loader.opened}


def load(path: Path | str | None = None) -> Config:
    p = Path(path) if path is not None else DEFAULT_PATH
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            [f"{p}: no such file; pass -c PATH or create it (an example is in the README)"]
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{p}: cannot read: {exc}"]) from None
    return parse(text, source=str(p), path=p)
