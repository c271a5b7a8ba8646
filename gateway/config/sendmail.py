"""[sendmail]: local mail from cron, smartd, apt... (gateway/sendmail.py, maildrop.py).

    [sendmail]
    max_size = "10 MiB"                       # larger messages are refused, never cut
    maildrop = "/var/spool/mailgw/maildrop"   # where `sendmail` drops them
    priority = 1                              # 0-9, as a route's
    rate = "20/min"                           # per local user (uid); "off": no limit
    burst = 20                                # mails a user may send at once (default: the count)
    allow_to = ["*@example.com"]              # addresses a user may name ([] : any)
    aliases_file = "/etc/aliases"             # Debian's alias file, read at each pickup
    [sendmail.aliases]                        # local names (no '@') → routes or addresses
    root = "ops"                              # a route name: its recipients
    cron = ["ops", "night@example.com"]
    "*" = "ops"                               # any other local name

A value naming neither a route nor an address is refused here, so the daemon never
meets an alias it cannot follow. Alias targets are routes or addresses, never other
local names: no loops to detect.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.utils import parseaddr
from pathlib import Path

from gateway.config.addresses import normalize_address
from gateway.config.loader import Table
from gateway.config.units import parse_rate

DEFAULT_MAILDROP = Path("/var/spool/mailgw/maildrop")
DEFAULT_MAX_SIZE = 10 * 1024 * 1024
# The daemon holds a message a few times over while it picks it up, rewrites and sends
# it, and its unit allows 128 MiB (MemoryMax) for that and everything else: two 25 MiB
# mails took it past the limit. 16 MiB leaves the alerts their room with margin.
MAX_MAX_SIZE = 16 * 1024 * 1024
_CAP_REASON = (
    "the daemon holds a message a few times over while it picks it up, rewrites and "
    "sends it, and its unit allows 128 MiB (MemoryMax=) for that and the alerts' work"
)
_LOCAL = re.compile(r"[A-Za-z0-9._+-]{1,64}|\*")
DEFAULT_RATE = (20, 60.0)
DEFAULT_ALIASES_FILE = Path("/etc/aliases")
# A pattern is an address with '*' for any run of characters: "*@example.com".
_PATTERN = re.compile(r"[!-~]{1,254}")
MAX_ALLOW_TO = 100  # the client reads the published list once per mail


@dataclass(frozen=True, slots=True)
class Alias:
    routes: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()  # bare addr-specs, ASCII


@dataclass(frozen=True, slots=True)
class SendmailSection:
    max_size: int = DEFAULT_MAX_SIZE
    maildrop: Path = DEFAULT_MAILDROP
    priority: int = 1
    aliases: tuple[tuple[str, Alias], ...] = ()
    # Mails per period per local user (uid), and how many at once; None: no limit.
    rate: tuple[int, float] | None = DEFAULT_RATE
    burst: int = DEFAULT_RATE[0]
    allow_to: tuple[str, ...] = ()  # lower-case patterns; empty: any address
    aliases_file: Path | None = DEFAULT_ALIASES_FILE

    def alias(self, name: str) -> Alias | None:
        """The alias of a local name (case-insensitive, as local mail is), else '*'."""
        found = dict(self.aliases)
        return found.get(name.lower()) or found.get("*")


def sendmail_section(t: Table) -> SendmailSection:
    d = SendmailSection()
    max_size = t.size("max_size", d.max_size, lo=1024)
    if isinstance(max_size, int) and max_size > MAX_MAX_SIZE:
        t.loader.problem(
            t.name,
            "max_size",
            f"{max_size} bytes is over the largest allowed, 16 MiB ({MAX_MAX_SIZE} bytes): "
            f"{_CAP_REASON}",
        )
        max_size = d.max_size
    maildrop = t.path("maildrop", d.maildrop)
    if isinstance(maildrop, Path) and not maildrop.is_absolute():
        t.loader.problem(t.name, "maildrop", f"{str(maildrop)!r}: must be an absolute path")
        maildrop = d.maildrop
    rate = _rate(t)
    burst = t.integer("burst", rate[0] if rate else d.burst, lo=1, hi=10_000)
    aliases_file = t.path("aliases_file", str(d.aliases_file))
    if isinstance(aliases_file, Path) and not aliases_file.is_absolute():
        t.loader.problem(t.name, "aliases_file", f"{str(aliases_file)!r}: must be an absolute path")
        aliases_file = d.aliases_file
    section = SendmailSection(
        max_size=max_size if isinstance(max_size, int) else d.max_size,
        maildrop=maildrop if isinstance(maildrop, Path) else d.maildrop,
        priority=t.integer("priority", d.priority, lo=0, hi=9),
        aliases=_aliases(t),
        rate=rate,
        burst=burst if isinstance(burst, int) else d.burst,
        allow_to=_allow_to(t),
        aliases_file=aliases_file if isinstance(aliases_file, Path) else None,
    )
    t.done()
    return section


def _rate(t: Table) -> tuple[int, float] | None:
    text = t.text("rate", None)
    if text is None:
        return DEFAULT_RATE
    if text == "off":
        return None
    try:
        count, period = parse_rate(text)
    except ValueError as exc:
        t.loader.problem(t.name, "rate", f'{exc}; or "off" for no limit')
        return DEFAULT_RATE
    return count, period


def _allow_to(t: Table) -> tuple[str, ...]:
    items = t.strings("allow_to", ())
    if not isinstance(items, tuple):
        return ()
    if len(items) > MAX_ALLOW_TO:
        t.loader.problem(t.name, "allow_to", f"{len(items)} patterns; at most {MAX_ALLOW_TO}")
        return ()
    out: list[str] = []
    for item in items:
        if not _PATTERN.fullmatch(item) or "@" not in item:
            t.loader.problem(
                t.name,
                "allow_to",
                f"{item!r} is not an address pattern: an address with '*' for any "
                'characters, like "*@example.com" or "ops@example.org"',
            )
            continue
        out.append(item.lower())
    return tuple(out)


def _aliases(t: Table) -> tuple[tuple[str, Alias], ...]:
    t.seen.add("aliases")
    raw = t.data.get("aliases", {})
    key = "aliases"
    if not isinstance(raw, dict):
        t.loader.problem(t.name, key, 'must be a table, e.g. aliases = { root = "ops" }')
        return ()
    out: list[tuple[str, Alias]] = []
    for name, value in raw.items():
        where = f"aliases.{name}"
        if not _LOCAL.fullmatch(name):
            t.loader.problem(
                t.name, where, "a local name: letters, digits, '.', '_', '+', '-' (or \"*\")"
            )
            continue
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items or not all(isinstance(v, str) for v in items):
            t.loader.problem(
                t.name, where, 'must be a route name, an address, or a list of them: "ops"'
            )
            continue
        routes: list[str] = []
        addresses: list[str] = []
        for item in items:
            if "@" not in item:
                routes.append(item)  # checked against [[route]] by the document
                continue
            try:
                addr = parseaddr(normalize_address(item))[1]
            except ValueError as exc:
                t.loader.problem(t.name, where, str(exc))
                continue
            addresses.append(addr)
        out.append((name.lower(), Alias(tuple(routes), tuple(addresses))))
    return tuple(out)


def check_alias_routes(t: Table, section: SendmailSection, route_names: set[str]) -> None:
    known = ", ".join(sorted(route_names)) or "none"
    for name, alias in section.aliases:
        for rt in alias.routes:
            if rt not in route_names:
                t.loader.problem(
                    t.name,
                    f"aliases.{name}",
                    f"{rt!r} names no route and is not an address; known routes: {known}",
                )
