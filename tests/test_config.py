from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.config import (
    ConfigError,
    check_topic_filter,
    load,
    parse,
    parse_duration,
    parse_rate,
    parse_size,
)
from gateway.smtp import UplinkDown, read_secret
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


def test_rates() -> None:
    assert parse_rate("20/h") == (20, 3600.0)
    assert parse_rate("5/10m") == (5, 600.0)
    assert parse_rate(" 1 / s ") == (1, 1.0)
    for bad in ("20", "0/h", "x/h", "20/y", "-1/s", "20/h/2"):
        with pytest.raises(ValueError, match="mails per period"):
            parse_rate(bad)


def test_topic_filters() -> None:
    assert check_topic_filter("a/+/c/#") is None
    assert check_topic_filter("#") is None
    assert check_topic_filter("a/#/c")
    assert check_topic_filter("a+/b")
    assert check_topic_filter("")


def test_config_is_a_leaf() -> None:
    """Every part may import config; config imports no part but the error classes."""
    probe = (
        "import sys, gateway.config\n"
        "print('\\n'.join(m for m in sys.modules if m.startswith('gateway.')))"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=root
    ).stdout.split()
    assert "gateway.config" in out
    inside = ("gateway.errors", "gateway.config")
    outside = [m for m in out if m not in inside and not m.startswith("gateway.config.")]
    assert outside == []


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


# --- invariant 10: what check-config accepts, the daemon runs -----------------------

SMTP_BLOCK = '[smtp]\nhost = "mx.example.com"\nfrom = "gw@example.com"\n'
ROUTE_BLOCK = '[[route]]\nmatch = "#"\n'


def _check_config_refuses(path: Path, key: str, line_marker: str, says: str) -> None:
    """check-config exits 2 and names `key` on the line holding `line_marker`."""
    lines = path.read_text().splitlines()
    line = next(i for i, text in enumerate(lines, 1) if text.startswith(line_marker))
    r = run_cli("check-config", "-c", str(path))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert f"{path}:{line}: {key}: " in r.stderr, r.stderr
    assert says in r.stderr, r.stderr


@pytest.mark.parametrize(
    ("extra", "key", "marker", "says"),
    [
        # 1. addresses: non-ASCII domains are IDNA-encoded, or refused when they cannot be
        (
            SMTP_BLOCK + ROUTE_BLOCK + f'to = ["ops@{"ä" * 70}.de"]\n',
            "route[0].to",
            "to =",
            "cannot be encoded as an international domain name",
        ),
        (
            SMTP_BLOCK + ROUTE_BLOCK + 'to = ["jürgen@example.com"]\n',
            "route[0].to",
            "to =",
            "needs SMTPUTF8",
        ),
        (
            SMTP_BLOCK + ROUTE_BLOCK + 'to = ["ops@example.com"]\ncc = ["nüll@example.com"]\n',
            "route[0].cc",
            "cc =",
            "needs SMTPUTF8",
        ),
        (
            '[smtp]\nhost = "mx.example.com"\nfrom = "Gateway <gw@straße.de>"\n',
            "smtp.from",
            "from =",
            "write the domain in its xn-- form",
        ),
        # 2. helo_name: an RFC 5321 Domain or address literal
        (
            SMTP_BLOCK + 'helo_name = "my host"\n',
            "smtp.helo_name",
            "helo_name",
            "is not a host name",
        ),
        (
            SMTP_BLOCK + 'helo_name = "gw-müller"\n',
            "smtp.helo_name",
            "helo_name",
            "write its IDNA form 'xn--gw-mller-",
        ),
        (SMTP_BLOCK + 'helo_name = "[300.1.1.1]"\n', "smtp.helo_name", "helo_name", "literal"),
        # 4. durations and rates that divide by zero or overflow
        (
            SMTP_BLOCK + ROUTE_BLOCK + 'to = ["a@example.com"]\nrate_limit = "1/0s"\n',
            "route[0].rate_limit",
            "rate_limit",
            "a zero period would divide by zero",
        ),
        (
            SMTP_BLOCK + ROUTE_BLOCK + 'to = ["a@example.com"]\nrate_limit = "0/h"\n',
            "route[0].rate_limit",
            "rate_limit",
            "mails per period",
        ),
        (
            SMTP_BLOCK + ROUTE_BLOCK + f'to = ["a@example.com"]\ndedupe_window = "{"9" * 400}s"\n',
            "route[0].dedupe_window",
            "dedupe_window",
            "must be at most 3650d",
        ),
        (
            SMTP_BLOCK + ROUTE_BLOCK + 'to = ["a@example.com"]\ndigest_every = "0s"\n',
            "route[0].digest_every",
            "digest_every",
            "must be at least 1s",
        ),
        ('[outbox]\ncommit_interval = "1h"\n', "outbox.commit_interval", "commit_interval", "1s"),
        (SMTP_BLOCK + 'timeout = "30d"\n', "smtp.timeout", "timeout", "must be at most 1h"),
        # 5. one address per entry, no controls, nothing the parser would rewrite
        (
            SMTP_BLOCK + ROUTE_BLOCK + 'to = ["a@example.com, b@example.com"]\n',
            "route[0].to",
            "to =",
            "write one address per list entry",
        ),
        (
            SMTP_BLOCK + ROUTE_BLOCK + 'to = ["ops@example.com\\u0007"]\n',
            "route[0].to",
            "to =",
            "control character",
        ),
        (
            SMTP_BLOCK + ROUTE_BLOCK + 'to = ["ops @example.com"]\n',
            "route[0].to",
            "to =",
            "would be read as 'ops@example.com'",
        ),
        # 6. MQTT credentials only over TLS unless the broker is on loopback
        (
            '[mqtt]\nhost = "broker.example.com"\nusername = "gw"\n',
            "mqtt.tls",
            "[mqtt]",
            "credentials would travel in clear",
        ),
        # 7. other values that would stop a source or the relay later
        ("[mqtt]\nport = 0\n", "mqtt.port", "port", "between 1 and 65535"),
        ("[mqtt]\ntopics = []\n", "mqtt.topics", "topics", "at least one topic filter"),
        ('[mqtt]\ntopics = ["alerts/\\u0001"]\n', "mqtt.topics", "topics", "U+0001"),
        ("[mqtt]\nmax_payload = 0\n", "mqtt.max_payload", "max_payload", "between 1 and"),
        ('[mqtt]\nhost = ""\n', "mqtt.host", "host", "not a host name or IP address"),
        (
            '[smtp]\nhost = "mx.example.com:587"\nfrom = "gw@example.com"\n',
            "smtp.host",
            "host",
            "put the port in `port`",
        ),
        ("[outbox]\nmax_messages = -5\n", "outbox.max_messages", "max_messages", "between"),
        (
            '[[serial]]\nport = "/dev/ttyS0"\nprotocol = "lines"\n'
            'line_regex = "(?P<sensr>\\\\w+): (?P<message>.*)"\n',
            "serial[0].line_regex",
            "line_regex",
            "named groups sensr that nothing reads",
        ),
        ('[[serial]]\nport = "/dev/ttyS0"\nname = "a/b"\n', "serial[0].name", "name", "topic"),
        ('[[serial]]\nport = ""\n', "serial[0].port", "port", "cannot be empty"),
    ],
)
def test_check_config_refuses_what_the_daemon_cannot_run(
    write_config: Callable[..., Path], extra: str, key: str, marker: str, says: str
) -> None:
    path = write_config(extra)
    _check_config_refuses(path, key, marker, says)


def _secret(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "secret"
    path.write_bytes(content)
    path.chmod(0o600)
    return path


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ('[smtp]\nhost = "mx.example.com"\nfrom = "gw@example.com"\nusername = "gw"\n', "smtp"),
        ('[mqtt]\nhost = "127.0.0.1"\nusername = "gw"\n', "mqtt"),
    ],
)
def test_check_config_refuses_a_password_file_that_is_not_utf8(
    tmp_path: Path, write_config: Callable[..., Path], section: str, key: str
) -> None:
    pw = _secret(tmp_path, "pässwort\n".encode("latin-1"))
    path = write_config(f'{section}password_file = "{pw}"\n')
    _check_config_refuses(path, f"{key}.password_file", "password_file", "is not UTF-8 text")
    r = run_cli("check-config", "-c", str(path))
    assert "pässwort" not in r.stderr and "0xe4" not in r.stderr  # no part of the secret


def test_check_config_refuses_an_oauth_token_file_that_is_not_utf8(
    tmp_path: Path, write_config: Callable[..., Path]
) -> None:
    token = _secret(tmp_path, b"\xff\xfetoken")
    path = write_config(SMTP_BLOCK + f'username = "gw"\noauth_token_file = "{token}"\n')
    _check_config_refuses(path, "smtp.oauth_token_file", "oauth_token_file", "is not UTF-8")


def test_relay_reads_a_non_utf8_secret_as_a_clear_error(tmp_path: Path) -> None:
    """The file may change after check-config: the relay says what to fix, no traceback."""
    pw = _secret(tmp_path, b"s3cret\n")
    cfg = parse(f'{SMTP_BLOCK}username = "gw"\npassword_file = "{pw}"\n')
    assert cfg.smtp is not None
    assert read_secret(cfg.smtp) == ("password", "s3cret")
    pw.write_bytes("pässwort".encode("latin-1"))
    with pytest.raises(UplinkDown, match="is not UTF-8 text") as info:
        read_secret(cfg.smtp)
    assert "pässwort" not in str(info.value)


def test_idna_recipient_and_non_ascii_sender_name_are_relayed(tmp_path: Path) -> None:
    """check-config accepts them, so the daemon must relay them: RCPT gets the IDNA form,
    the headers are well-formed, the display name survives as RFC 2047."""
    from tests.parts import DaemonProcess, SmtpServer

    with SmtpServer(None, "none") as smtp:
        cfg = tmp_path / "gw.toml"
        cfg.write_text(
            f'[gateway]\ndevice_id = "gw-idna"\nstate_dir = "{tmp_path}/state"\n'
            f'runtime_dir = "{tmp_path}/run"\n'
            f'[smtp]\nhost = "127.0.0.1"\nport = {smtp.port}\ntls = "none"\n'
            'from = "Kühlraum Süd <gw@example.com>"\ntimeout = "2s"\n'
            '[[route]]\nname = "ops"\nmatch = "#"\nto = ["alarm@müller-kälte.de"]\n'
            'cc = ["Jörg Bäcker <joerg@bäckerei.example>"]\n'
        )
        r = run_cli("check-config", "-c", str(cfg))
        assert r.returncode == 0, r.stderr
        gw = DaemonProcess(cfg, tmp_path / "daemon.log").start()
        gw.wait_ready()
        sent = run_cli("send", "-c", str(cfg), "--sensor", "door", "--severity", "warning", "open")
        assert sent.returncode == 0, sent.stderr
        (got,) = smtp.wait_for(1, timeout=20)
        assert gw.terminate() == 0
    assert got.sender == "gw@example.com"
    assert got.recipients == ["alarm@xn--mller-klte-w5a5z.de", "joerg@xn--bckerei-5wa.example"]
    assert got.data.isascii()
    msg = got.message
    (to,) = msg["To"].addresses
    assert (to.display_name, to.addr_spec) == ("", "alarm@xn--mller-klte-w5a5z.de")
    (cc,) = msg["Cc"].addresses
    assert (cc.display_name, cc.addr_spec) == ("Jörg Bäcker", "joerg@xn--bckerei-5wa.example")
    (sender,) = msg["From"].addresses
    assert (sender.display_name, sender.addr_spec) == ("Kühlraum Süd", "gw@example.com")
    assert not msg.defects and not any(msg[h].defects for h in ("From", "To", "Cc"))
