"""The whole configuration file: read it, build every section, check across sections.

`parse` reports every problem at once (ConfigError lists them), each with its key and
line, so an operator fixes a config in one round rather than one error per restart.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from gateway.config.connections import (
    fallback_section,
    mqtt_section,
    oauth_section,
    smtp_section,
)
from gateway.config.loader import Loader
from gateway.config.sections import (
    gateway_section,
    metrics_section,
    outbox_section,
    route_section,
    serial_section,
)
from gateway.config.sendmail import check_alias_routes, sendmail_section
from gateway.config.values import (
    Config,
    GatewaySection,
    HeartbeatSection,
    RouteSection,
    SelfAlertsSection,
    SerialSection,
    SilenceSection,
)
from gateway.config.watches import heartbeat_section, selfalerts_section, silence_section
from gateway.errors import ConfigError

DEFAULT_PATH = Path("/etc/mailgw/gateway.toml")

_SECTIONS = {
    "gateway",
    "outbox",
    "smtp",
    "mqtt",
    "serial",
    "route",
    "metrics",
    "silence",
    "selfalerts",
    "heartbeat",
    "sendmail",
}


def parse(text: str, source: str = "<config>", path: Path | None = None) -> Config:
    """Parse and validate config text; raise ConfigError listing every problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: not valid TOML: {exc}"]) from None
    loader = Loader(text, source)
    for key in data:
        if key not in _SECTIONS:
            loader.problem("", key, f"unknown section; known: {', '.join(sorted(_SECTIONS))}")
    gateway = gateway_section(loader.table("gateway", data.get("gateway", {})))
    outbox = outbox_section(loader.table("outbox", data.get("outbox", {})))
    smtp = smtp_section(loader.table("smtp", data["smtp"])) if "smtp" in data else None
    mqtt = mqtt_section(loader.table("mqtt", data["mqtt"])) if "mqtt" in data else None
    serial = tuple(serial_section(t) for t in loader.tables("serial", data.get("serial")))
    routes = tuple(
        route_section(t, i) for i, t in enumerate(loader.tables("route", data.get("route")))
    )
    metrics = metrics_section(loader.table("metrics", data.get("metrics", {})))
    silence = tuple(
        silence_section(t, i) for i, t in enumerate(loader.tables("silence", data.get("silence")))
    )
    selfalerts = selfalerts_section(loader.table("selfalerts", data.get("selfalerts", {})))
    heartbeat = heartbeat_section(loader.table("heartbeat", data.get("heartbeat", {})))
    sendmail_t = loader.table("sendmail", data.get("sendmail", {}))
    sendmail = sendmail_section(sendmail_t)
    check_alias_routes(sendmail_t, sendmail, {r.name for r in routes})
    _check_names(loader, gateway, serial, routes)
    _check_watches(loader, routes, silence, selfalerts, heartbeat)
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
        silence=silence,
        selfalerts=selfalerts,
        heartbeat=heartbeat,
        sendmail=sendmail,
    )


def _check_names(
    loader: Loader,
    gateway: GatewaySection,
    serial: tuple[SerialSection, ...],
    routes: tuple[RouteSection, ...],
) -> None:
    """Names that other sections, topics and Message-IDs refer to must be unique and exist."""
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


def _check_watches(
    loader: Loader,
    routes: tuple[RouteSection, ...],
    silence: tuple[SilenceSection, ...],
    selfalerts: SelfAlertsSection,
    heartbeat: HeartbeatSection,
) -> None:
    """The routes that silence rules and self-alerts name must exist; rule names are
    unique (the outbox keeps each source's state under its rule's name)."""
    route_names = {r.name for r in routes}
    known = ", ".join(sorted(route_names)) or "none"
    for i, rule in enumerate(silence):
        if rule.route is not None and rule.route not in route_names:
            loader.problem(f"silence[{i}]", "route", f"names no route; known routes: {known}")
    names = [r.name for r in silence]
    for dup in {n for n in names if names.count(n) > 1}:
        loader.problem("silence", "name", f"two rules are named {dup!r}; give each a unique name")
    for name, route in (("selfalerts", selfalerts.route), ("heartbeat", heartbeat.route)):
        if route is not None and route not in route_names:
            loader.problem(name, "route", f"names no route; known routes: {known}")


def known_keys() -> dict[str, set[str]]:
    """Every key each section accepts, read off the loader itself (for the docs test)."""
    loader = Loader("", "<schema>")
    gateway_section(loader.table("gateway", {}))
    outbox_section(loader.table("outbox", {}))
    smtp_section(loader.table("smtp", {}))
    oauth_section(loader.table("smtp.oauth", {}))
    fallback_section(
        loader.table("smtp.fallback", {}), smtp_section(Loader("", "").table("smtp", {}))
    )
    mqtt_section(loader.table("mqtt", {}))
    serial_section(loader.table("serial", {}))
    route_section(loader.table("route", {}), 0)
    metrics_section(loader.table("metrics", {}))
    silence_section(loader.table("silence", {}), 0)
    selfalerts_section(loader.table("selfalerts", {}))
    heartbeat_section(loader.table("heartbeat", {}))
    sendmail_section(loader.table("sendmail", {}))
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
