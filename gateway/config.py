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
from email.utils import getaddresses, parseaddr
from pathlib import Path
from typing import Any, TypeVar

from gateway.errors import ConfigError
from gateway.storm import DEFAULT_KEY, Policy, parse_rate

DEFAULT_PATH = Path("/etc/mailgw/gateway.toml")

SEVERITIES = ("debug", "info", "warning", "critical")
DEFAULT_SUBJECT = "[{severity}] {device_id}/{sensor}: {message}"

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
# The longest duration any key takes. Far beyond any sensible setting, and far below
# where time arithmetic overflows (datetime ends in year 9999, threading's TIMEOUT_MAX
# is ~292 years) or a float turns into inf ("1" with 400 zeros, in seconds).
MAX_DURATION = 3650 * 86400.0
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


# RFC 5321 §4.1.2: Dot-string = Atom *("." Atom), Atom = 1*atext (RFC 5322 §3.2.3).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*")
# RFC 5321 §4.1.2: sub-domain = Let-dig [Ldh-str]; a label is at most 63 octets (§4.5.3.1.2).
_LDH_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# A host to connect to may be a local name (/etc/hosts), where '_' is common.
_HOST_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Python's "idna" codec is IDNA 2003, which maps these away (ß → ss, a joiner → nothing);
# IDNA 2008, which registries use, keeps them. straße.de and strasse.de are different
# domains, so encoding one silently would mail someone else.
_IDNA_DEVIATIONS = {
    "\u00df": "ß",
    "\u1e9e": "ẞ",
    "\u03c2": "ς",
    "\u200c": "a zero-width non-joiner",
    "\u200d": "a zero-width joiner",
}


def _address_literal_problem(text: str) -> str | None:
    """RFC 5321 §4.1.3: `[192.0.2.1]` or `[IPv6:2001:db8::1]`."""
    inner = text[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        return f"{text!r} is not an address literal (write e.g. [192.0.2.1] or [IPv6:2001:db8::1])"
    return None


def ascii_domain(domain: str) -> str:
    """A mail domain (RFC 5321 §4.1.2 Domain or address literal) in its all-ASCII form.

    A non-ASCII domain is IDNA-encoded (müller.de → xn--mller-kva.de): without
    SMTPUTF8, which we do not use, only that form may appear in RCPT TO and in headers.
    Raises ValueError saying what is wrong.
    """
    if domain.startswith("[") and domain.endswith("]"):
        if why := _address_literal_problem(domain):
            raise ValueError(why)
        return domain
    for ch, what in _IDNA_DEVIATIONS.items():
        if ch in domain:
            raise ValueError(
                f"the domain {domain!r} contains {what}, which IDNA encoders disagree on; "
                "write the domain in its xn-- form as your registrar shows it"
            )
    try:
        encoded = domain.encode("idna").decode("ascii")
    except UnicodeError as exc:
        reason = exc.__cause__ or exc
        raise ValueError(
            f"the domain {domain!r} cannot be encoded as an international domain name "
            f"(IDNA: {reason})"
        ) from None
    if len(encoded) > 253 or not all(_LDH_LABEL.fullmatch(label) for label in encoded.split(".")):
        raise ValueError(
            f"{domain!r} is not a domain name: use letters, digits and '-' "
            "(not first or last) between single dots, no trailing dot"
        )
    return encoded


def normalize_address(text: str) -> str:
    """One mail address from the config, as downstream code may use it: all ASCII.

    Returns `addr-spec` or `"Display Name" <addr-spec>` with the domain IDNA-encoded
    (the display name may stay non-ASCII: it is RFC 2047-encoded when composed).
    Raises ValueError when the text is not exactly one plain address, so that nothing
    in a parser's leniency changes who gets mail: parseaddr reads "a@x, b@x" as a@x
    and "a @x" as a@x; both are refused here, not silently trimmed.
    """
    if _CONTROL.search(text):
        raise ValueError(f"{text!r} contains a control character (line break, tab, NUL); remove it")
    found = [pair for pair in getaddresses([text]) if pair != ("", "")]
    if len(found) > 1:
        raise ValueError(
            f"{text!r} holds more than one address; write one address per list entry, "
            'e.g. ["a@example.com", "b@example.com"] (a display name with a comma must be '
            'quoted: "Ops, Night" <ops@example.com>)'
        )
    name, addr = found[0] if found else ("", "")
    local, at, domain = addr.rpartition("@")
    if not at or not local or not domain:
        raise ValueError(f"{text!r} is not a mail address (expected e.g. ops@example.com)")
    if addr not in text:
        raise ValueError(f"{text!r} would be read as {addr!r}; write the address without spaces")
    if not local.isascii():
        raise ValueError(
            f"{text!r}: a non-ASCII local part ({local!r}) needs SMTPUTF8, which mailgw does "
            "not use; use an ASCII address for this recipient"
        )
    if not _DOT_ATOM.fullmatch(local) or len(local) > 64:
        raise ValueError(
            f"{text!r}: the part before '@' may hold letters, digits, "
            "!#$%&'*+/=?^_`{|}~- and single dots not first or last (at most 64)"
        )
    try:
        ascii_addr = f"{local}@{ascii_domain(domain)}"
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc}") from None
    if not name:
        return ascii_addr
    quoted = name.replace("\\", "\\\\").replace('"', '\\"')
    result = f'"{quoted}" <{ascii_addr}>'
    if parseaddr(result) != (name, ascii_addr):
        raise ValueError(f"{text!r}: the display name cannot be kept; simplify it")
    return result


def check_address(text: str) -> str | None:
    """Return why `text` is not a usable mail address, or None if it is."""
    try:
        normalize_address(text)
    except ValueError as exc:
        return str(exc)
    return None


def check_host(host: str) -> str | None:
    """Why `host` cannot be connected to (a name or an IP address), or None."""
    if host.startswith("["):
        return f"{host!r}: write an IP address without brackets"
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    hint = "; put the port in `port`" if ":" in host else ""
    try:
        encoded = host.encode("idna").decode("ascii")
    except UnicodeError:
        return f"{host!r} is not a host name or IP address{hint}"
    labels = encoded.removesuffix(".").split(".")
    if len(encoded) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        return f"{host!r} is not a host name or IP address{hint}"
    return None


def check_helo_name(text: str) -> str | None:
    """RFC 5321 §4.1.1.1: EHLO takes a Domain or an address literal, in ASCII."""
    if text.startswith("[") and text.endswith("]"):
        return _address_literal_problem(text)
    if not text.isascii():
        try:
            return f"{text!r} is not ASCII; write its IDNA form {ascii_domain(text)!r}"
        except ValueError as exc:
            return str(exc)
    try:
        ascii_domain(text)
    except ValueError:
        return (
            f"{text!r} is not a host name: use letters, digits and '-' between single dots, "
            "or an address literal like [192.0.2.1]"
        )
    return None


def mqtt_string_problem(text: str) -> str | None:
    """Why a broker would refuse `text` as an MQTT UTF-8 string, or None.

    MQTT 3.1.1 §1.5.3 (MQTT 5 §1.5.4): no U+0000, at most 65535 bytes; Mosquitto also
    refuses control characters and non-characters, and drops the connection of a client
    that sends one, so a subscription holding one would loop through reconnects.
    """
    if len(text.encode("utf-8")) > 65535:
        return "is longer than MQTT's 65535 bytes"
    for ch in text:
        cp = ord(ch)
        if cp <= 0x1F or 0x7F <= cp <= 0x9F:
            return f"{text!r} contains the control character U+{cp:04X}"
        if 0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE:
            return f"{text!r} contains the non-character U+{cp:04X}"
    return None


def check_topic_filter(text: str) -> str | None:
    """Validate an MQTT topic filter (MQTT 3.1.1 §4.7.1)."""
    if not text:
        return "a topic filter cannot be empty"
    if "\0" in text:
        return "a topic filter cannot contain NUL"
    if why := mqtt_string_problem(text):
        return why
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

    def integer(self, key: str, default: Any = _MISSING, lo: int = 0, hi: int = 2**63 - 1) -> Any:
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

    def duration(
        self,
        key: str,
        default: Any = _MISSING,
        minimum: float = 0.0,
        maximum: float = MAX_DURATION,
    ) -> Any:
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
        elif not seconds <= maximum:
            self.loader.problem(
                self.name, key, f"must be at most {format_duration(maximum)}; got {value!r}"
            )
            return default if default is not _MISSING else None
        return seconds

    def size(self, key: str, default: Any = _MISSING, lo: int = 1, hi: int = 2**63 - 1) -> Any:
        self.seen.add(key)
        if key not in self.data:
            return default
        try:
            value = parse_size(self.data[key])
        except ValueError as exc:
            self.loader.problem(self.name, key, str(exc))
            return default
        if not lo <= value <= hi:
            self.loader.problem(self.name, key, f"must be between {lo} and {hi} bytes; got {value}")
            return default
        return value

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
        if "\0" in value:
            self.loader.problem(self.name, key, f"{value!r} contains NUL; fix the path")
            return default
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
    try:
        raw = path.read_bytes()
    except OSError:
        return None  # as above: the daemon's user may be able to read it
    # The daemon reads the secret as UTF-8 text. Say nothing about where the decoding
    # failed: the offending byte is part of the secret.
    try:
        secret = raw.decode("utf-8")
    except UnicodeDecodeError:
        return f"{path} is not UTF-8 text; save the secret as UTF-8 (one line)"
    if not secret.strip():
        return f"{path} is empty; write the secret there on one line (chmod 600)"
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
        # The writer sleeps up to this before a commit, and every ack waits for it; the
        # daemon takes a writer silent for 15 s as stuck.
        commit_interval=t.duration("commit_interval", 0.005, maximum=1),
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
    helo_name = t.text("helo_name", None)
    if isinstance(helo_name, str) and (why := check_helo_name(helo_name)):
        t.loader.problem(t.name, "helo_name", why)
    if isinstance(sender, str):
        try:
            # Downstream code (envelope, From header) gets the IDNA form.
            sender = normalize_address(sender)
        except ValueError as exc:
            t.loader.problem(t.name, "from", str(exc))
    section = SmtpSection(
        host=host or "",
        port=t.integer("port", default_port, lo=1, hi=65535),
        tls=tls,
        sender=sender or "",
        username=username,
        password_file=password_file,
        oauth_token_file=oauth_token_file,
        ca_file=t.path("ca_file", None, must_exist=True),
        # aiosmtplib waits this long for each reply; the relay counts as stuck after
        # six of them, and RFC 5321 §4.5.3.2 asks for at most minutes.
        timeout=t.duration("timeout", 30.0, minimum=1, maximum=3600),
        helo_name=helo_name,
        min_backoff=t.duration("min_backoff", 300.0, minimum=1),
        max_backoff=t.duration("max_backoff", 3600.0, minimum=1),
        probe_max=t.duration("probe_max", 60.0, minimum=1),
        batch=t.integer("batch", 100, lo=1, hi=10_000),
    )
    t.done()
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
        if isinstance(p, Path) and (why := _secret_file_problem(p)):
            t.loader.problem(t.name, key, why)
    for key, why in _tls_files_problems(section.ca_file):
        t.loader.problem(t.name, key, why)
    if (password_file or oauth_token_file) and not username:
        t.loader.problem(t.name, "username", "is required when a password or token is configured")
    if section.min_backoff > section.max_backoff:
        t.loader.problem(t.name, "min_backoff", "must not exceed max_backoff")
    return section


def _mqtt(t: _Table) -> MqttSection:
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
    )
    t.done()
    host = section.host
    if isinstance(host, str) and (why := check_host(host)):
        t.loader.problem(t.name, "host", why)
    for key in ("client_id", "username"):
        value = getattr(section, key)
        if isinstance(value, str) and (why := mqtt_string_problem(value)):
            t.loader.problem(t.name, key, why)
    if section.password_file and (why := _secret_file_problem(section.password_file)):
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
        for key, why in _tls_files_problems(section.ca_file, section.cert_file, section.key_file):
            t.loader.problem(t.name, key, why)
    return section


def _tls_files_problems(
    ca_file: Path | None, cert_file: Path | None = None, key_file: Path | None = None
) -> list[tuple[str, str]]:
    """Load the TLS files as the daemon will, so a bad one is a config error, not a crash
    when the source or the relay builds its context. Unreadable here is not an error:
    the daemon's user may read what the checking user cannot."""
    import ssl  # only when there are TLS files: check-config and the CLI start faster

    problems: list[tuple[str, str]] = []
    if ca_file is not None and ca_file.is_file() and os.access(ca_file, os.R_OK):
        try:
            ssl.create_default_context(cafile=str(ca_file))
        except (ssl.SSLError, OSError, ValueError) as exc:
            problems.append(("ca_file", f"{ca_file} holds no usable CA certificate: {exc}"))
    readable = [p for p in (cert_file, key_file) if p is not None]
    if cert_file is not None and all(p.is_file() and os.access(p, os.R_OK) for p in readable):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            ctx.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
        except (ssl.SSLError, OSError, ValueError) as exc:
            problems.append(
                (
                    "cert_file",
                    f"{cert_file} cannot be loaded with its key: {exc}; check the PEM files",
                )
            )
    return problems


def _serial(t: _Table) -> SerialSection:
    port = t.text("port") or ""
    if "port" in t.data and not port:
        t.loader.problem(t.name, "port", 'cannot be empty; write e.g. "/dev/ttyUSB0"')
    name = t.text("name", Path(port).name or "serial")
    # The name is a topic level (serial/<name>/<sensor>) and a status key.
    if isinstance(name, str) and (
        not name or any(c in name for c in "/+#") or mqtt_string_problem(name)
    ):
        t.loader.problem(
            t.name, "name", f"{name!r}: must be one topic level: no '/', '+', '#' or controls"
        )
    regex = t.text("line_regex", None)
    if regex is not None:
        try:
            unknown = set(re.compile(regex).groupindex) - _LINE_GROUPS
        except re.error as exc:
            t.loader.problem(t.name, "line_regex", f"is not a valid regular expression: {exc}")
        else:
            if unknown:
                t.loader.problem(
                    t.name,
                    "line_regex",
                    f"has named groups {', '.join(sorted(unknown))} that nothing reads; "
                    f"name groups only {', '.join(sorted(_LINE_GROUPS))}",
                )
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


# What the lines protocol takes from a line_regex match (sources/serial.py).
_LINE_GROUPS = {"sensor", "severity", "message"}


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
    to = _addresses(t, "to", t.strings("to") or ())
    cc = _addresses(t, "cc", t.strings("cc", ()) or ())
    if not to and "to" in t.data and isinstance(t.data["to"], list) and not t.data["to"]:
        t.loader.problem(t.name, "to", "needs at least one recipient")
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


def _addresses(t: _Table, key: str, texts: tuple[str, ...]) -> tuple[str, ...]:
    """The route's recipients as the relay will use them (ASCII, IDNA domains)."""
    found = []
    for text in texts:
        try:
            found.append(normalize_address(text))
        except ValueError as exc:
            t.loader.problem(t.name, key, str(exc))
    return tuple(found)


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
        # A digest due later than this is held back so long it may as well be lost.
        digest_every=t.duration("digest_every", 3600.0, minimum=1, maximum=7 * 86400) or 3600.0,
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
