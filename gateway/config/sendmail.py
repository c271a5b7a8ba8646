"""[sendmail]: local mail from cron, smartd, apt... (gateway/sendmail.py, maildrop.py).

    [sendmail]
    max_size = "10 MiB"                       # larger messages are refused, never cut
    maildrop = "/var/spool/mailgw/maildrop"   # where `sendmail` drops them
    priority = 1                              # 0-9, as a route's
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

DEFAULT_MAILDROP = Path("/var/spool/mailgw/maildrop")
DEFAULT_MAX_SIZE = 10 * 1024 * 1024
# The daemon holds a message a few times over while it rewrites and sends it, and its
# unit allows 128 MiB (MemoryMax): beyond this a single mail could get it OOM-killed.
MAX_MAX_SIZE = 25 * 1024 * 1024
_LOCAL = re.compile(r"[A-Za-z0-9._+-]{1,64}|\*")


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

    def alias(self, name: str) -> Alias | None:
        """The alias of a local name (case-insensitive, as local mail is), else '*'."""
        found = dict(self.aliases)
        return found.get(name.lower()) or found.get("*")


def sendmail_section(t: Table) -> SendmailSection:
    d = SendmailSection()
    max_size = t.size("max_size", d.max_size, lo=1024, hi=MAX_MAX_SIZE)
    maildrop = t.path("maildrop", d.maildrop)
    if isinstance(maildrop, Path) and not maildrop.is_absolute():
        t.loader.problem(t.name, "maildrop", f"{str(maildrop)!r}: must be an absolute path")
        maildrop = d.maildrop
    section = SendmailSection(
        max_size=max_size if isinstance(max_size, int) else d.max_size,
        maildrop=maildrop if isinstance(maildrop, Path) else d.maildrop,
        priority=t.integer("priority", d.priority, lo=0, hi=9),
        aliases=_aliases(t),
    )
    t.done()
    return section


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
