"""Load the TOML configuration into frozen, typed values.

Every problem is collected (not just the first) and reported with its key, the
line it is on where the file gives it, and what to do. Unknown keys are errors:
a misspelt `max_mesages` silently meaning "use the default" is how a device ends
up with a queue bound nobody chose.

The package is a leaf: it imports nothing of the gateway but `gateway.errors`, so
every part may depend on config and config on none of them.

    values       the sections as frozen dataclasses, and storm's Policy
    units        durations, sizes, rates as text → numbers
    addresses    mail addresses and domains (RFC 5321, IDNA)
    checks       hosts, MQTT strings and topic filters, secret and TLS files
    loader       typed access to TOML tables, problems with key and line
    sections     [gateway], [outbox], [[serial]], [[route]], [metrics]
    watches      [[silence]], [selfalerts], [heartbeat]: the gateway's own alerts
    connections  [smtp], [mqtt]: credentials and TLS
    document     parse, load, known_keys: the file as a whole
"""

from gateway.config.addresses import (
    ascii_domain,
    check_address,
    check_helo_name,
    normalize_address,
)
from gateway.config.checks import (
    check_host,
    check_topic_filter,
    is_loopback_host,
    mqtt_string_problem,
)
from gateway.config.document import DEFAULT_PATH, known_keys, load, parse
from gateway.config.units import (
    MAX_DURATION,
    MAX_RATE_COUNT,
    MAX_RATE_PERIOD,
    format_duration,
    parse_duration,
    parse_rate,
    parse_size,
)
from gateway.config.values import (
    DEFAULT_KEY,
    DEFAULT_SUBJECT,
    SEVERITIES,
    Config,
    GatewaySection,
    HeartbeatSection,
    MetricsSection,
    MqttSection,
    OAuthSection,
    OutboxSection,
    Policy,
    RouteSection,
    SelfAlertsSection,
    SerialSection,
    SilenceSection,
    SmtpSection,
)
from gateway.errors import ConfigError

__all__ = [
    "DEFAULT_KEY",
    "DEFAULT_PATH",
    "DEFAULT_SUBJECT",
    "MAX_DURATION",
    "MAX_RATE_COUNT",
    "MAX_RATE_PERIOD",
    "SEVERITIES",
    "Config",
    "ConfigError",
    "GatewaySection",
    "HeartbeatSection",
    "MetricsSection",
    "MqttSection",
    "OAuthSection",
    "OutboxSection",
    "Policy",
    "RouteSection",
    "SelfAlertsSection",
    "SerialSection",
    "SilenceSection",
    "SmtpSection",
    "ascii_domain",
    "check_address",
    "check_helo_name",
    "check_host",
    "check_topic_filter",
    "format_duration",
    "is_loopback_host",
    "known_keys",
    "load",
    "mqtt_string_problem",
    "normalize_address",
    "parse",
    "parse_duration",
    "parse_rate",
    "parse_size",
]
