from __future__ import annotations

import socket
from pathlib import Path

import pytest

from gateway.config import (
    ConfigError,
    check_topic_filter,
    load,
    parse,
    parse_duration,
    parse_size,
)
from tests.conftest import run_cli

MINIMAL = """
[gateway]
device_id = "truck-042"
state_dir = "/var/lib/mailgw"

[smtp]
host = "smtp.example.com"
from = "Gateway <gw@example.com>"

[[route]]
match = "alerts/#"
to = ["ops@example.com"]
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text, source="gw.toml")
    return info.value.problems


def test_minimal_config_has_documented_defaults() -> None:
    cfg = parse(MINIMAL)
    assert cfg.gateway.device_id == "truck-042"
    assert cfg.smtp is not None
    assert (cfg.smtp.port, cfg.smtp.tls) == (587, "starttls")
    assert cfg.outbox.max_messages == 100_000
    assert cfg.outbox.max_age == 5 * 86400
    assert cfg.outbox_path == Path("/var/lib/mailgw/outbox.db")
    assert cfg.routes[0].to == ("ops@example.com",)
    assert cfg.mqtt is None and cfg.serial == ()


def test_design_example_config_is_valid(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("secret\n")
    pw.chmod(0o600)
    text = f"""
[gateway]
device_id = "truck-042"
state_dir = "/var/lib/mailgw"
[outbox]
max_messages = 100000
max_age = "5d"
[smtp]
host = "smtp.example.com"
port = 587
tls = "starttls"
username = "gw@example.com"
password_file = "{pw}"
from = "Gateway truck-042 <gw@example.com>"
[mqtt]
host = "127.0.0.1"
port = 1883
topics = ["alerts/#"]
[[serial]]
port = "/dev/ttyUSB0"
baudrate = 115200
protocol = "framed"
[[route]]
match = "alerts/#"
min_severity = "warning"
to = ["ops@example.com"]
subject = "[{{severity}}] {{device_id}}/{{sensor}}: {{message}}"
"""
    cfg = parse(text)
    assert cfg.serial[0].name == "ttyUSB0"
    assert cfg.mqtt is not None and cfg.mqtt.topics == ("alerts/#",)


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        ("[outbox]\nmax_mesages = 5\n", "outbox.max_mesages: unknown key"),
        ('[outbox]\nmax_messages = "lots"\n', "outbox.max_messages: must be an integer"),
        ('[outbox]\nmax_age = "5 days"\n', "outbox.max_age: not a duration"),
        ("[outbox]\nmax_age = 5\n", "outbox.max_age: must be a duration"),
        ('[smtp]\nhost = "mx.example.com"\nfrom = "not-an-address"\n', "smtp.from:"),
        (
            '[smtp]\nhost = "mx.example.com"\nfrom = "a@b.c"\ntls = "none"\n',
            'smtp.tls: "none" is only allowed for a loopback host',
        ),
        (
            '[smtp]\nhost = "127.0.0.1"\nfrom = "a@b.c"\ntls = "none"\nusername = "u"\n',
            'smtp.tls: "none" cannot be combined with AUTH',
        ),
        (
            '[smtp]\nhost = "mx.example.com"\nfrom = "a@b.c"\ntls = "ssl"\n',
            "smtp.tls: must be one of starttls, implicit, none",
        ),
        (
            '[smtp]\nhost = "mx.example.com"\nfrom = "a@b.c"\nport = 70000\n',
            "smtp.port: must be between 1 and 65535",
        ),
        ('[smtp]\nfrom = "a@b.c"\n', "smtp.host: is required"),
        ('[mqtt]\ntopics = ["alerts/#/x"]\n', "mqtt.topics:"),
        ('[[route]]\nmatch = "a/b+"\nto = ["x@y.z"]\n', "route[0].match:"),
        ('[[route]]\nto = ["not an address"]\n', "route[0].to:"),
        ("[[route]]\nto = []\n", "route[0].to: needs at least one recipient"),
        ('[[route]]\nto = ["a@b.c"]\nmin_severity = "loud"\n', "route[0].min_severity"),
        ('[gateway]\ndefault_route = "nope"\n', "gateway.default_route: names no route"),
        ("[surprise]\nx = 1\n", "surprise: unknown section"),
        ('[[serial]]\nport = "/dev/ttyS0"\nprotocol = "binary"\n', "serial[0].protocol"),
        ('[[serial]]\nport = "/dev/ttyS0"\nline_regex = "("\n', "serial[0].line_regex"),
    ],
)
def test_each_problem_names_its_key(snippet: str, expected: str) -> None:
    found = problems(snippet)
    assert any(expected in p for p in found), found


def test_problems_carry_line_numbers_and_all_are_reported() -> None:
    text = '[outbox]\nmax_messages = "x"\n\n[smtp]\nhost = "h.example"\nfrom = "bad"\nport = 0\n'
    found = problems(text)
    assert len(found) == 3
    assert any(p.startswith("gw.toml:2: outbox.max_messages") for p in found), found
    assert any(p.startswith("gw.toml:6: smtp.from") for p in found), found
    assert any(p.startswith("gw.toml:7: smtp.port") for p in found), found


def test_toml_syntax_error_reports_position() -> None:
    found = problems("[gateway\n")
    assert "not valid TOML" in found[0] and "line 1" in found[0]


def test_password_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("secret")
    pw.chmod(0o644)
    text = f'[smtp]\nhost = "h.example"\nfrom = "a@b.c"\nusername = "u"\npassword_file = "{pw}"\n'
    found = problems(text)
    assert any("readable by others (mode 0644); chmod 600" in p for p in found), found
    pw.chmod(0o640)
    parse(text)  # root:mailgw 0640 is the packaged layout


def test_missing_password_file_is_an_error(tmp_path: Path) -> None:
    text = (
        f'[smtp]\nhost = "h.example"\nfrom = "a@b.c"\nusername = "u"\n'
        f'password_file = "{tmp_path / "none"}"\n'
    )
    assert any("does not exist" in p for p in problems(text))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("15m", 900), ("1h30m", 5400), ("5d", 432000), ("500ms", 0.5), ("1w", 604800)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5", "5x", "s", "1h 3", "-5s"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_sizes() -> None:
    assert parse_size("64KiB") == 65536
    assert parse_size(100) == 100
    with pytest.raises(ValueError):
        parse_size("lots")


def test_topic_filters() -> None:
    assert check_topic_filter("a/+/c/#") is None
    assert check_topic_filter("#") is None
    assert check_topic_filter("a/#/c")
    assert check_topic_filter("a+/b")
    assert check_topic_filter("")


def test_load_missing_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "nope.toml")
    assert "pass -c PATH" in str(info.value)


def test_check_config_cli_exit_codes(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(MINIMAL)
    r = run_cli("check-config", "-c", str(good))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok: ") and "smtp.example.com:587" in r.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(MINIMAL + '\n[outbox]\nmax_age = "forever"\nbogus = 1\n')
    r = run_cli("check-config", "-c", str(bad))
    assert r.returncode == 2
    assert "outbox.max_age" in r.stderr and "outbox.bogus: unknown key" in r.stderr
    assert "2 problem(s)" in r.stderr


def test_route_test_explains_routing(tmp_path: Path) -> None:
    cfg = tmp_path / "g.toml"
    cfg.write_text(
        MINIMAL.replace(
            'to = ["ops@example.com"]', 'to = ["ops@example.com"]\nmin_severity = "warning"'
        )
    )
    r = run_cli("route-test", "-c", str(cfg), "alerts/fridge/temp", "--severity", "critical")
    assert r.returncode == 0 and "route route0" in r.stdout and "ops@example.com" in r.stdout
    r = run_cli("route-test", "-c", str(cfg), "alerts/fridge/temp", "--severity", "info")
    assert "matches no route" in r.stdout
    r = run_cli("route-test", "-c", str(cfg), "other/x")
    assert "unrouted" in r.stdout


def test_default_device_id_is_hostname() -> None:
    cfg = parse("")
    assert cfg.gateway.device_id == socket.gethostname()
