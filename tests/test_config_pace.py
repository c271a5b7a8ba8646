"""[smtp] rate_limit, throttle_max and return_jitter: defaults, and nonsense refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, SmtpSection, parse
from tests.conftest import run_cli

BASE = """
[gateway]
device_id = "truck-042"
state_dir = "/var/lib/mailgw"

[smtp]
host = "smtp.example.com"
from = "Gateway <gw@example.com>"
{extra}
[[route]]
match = "alerts/#"
to = ["ops@example.com"]
"""


def smtp(extra: str = "") -> SmtpSection:
    cfg = parse(BASE.format(extra=extra))
    assert cfg.smtp is not None
    return cfg.smtp


def test_defaults_no_limit_a_ten_minute_throttle_cap_and_thirty_seconds_of_jitter() -> None:
    s = smtp()
    assert (s.rate_limit, s.throttle_max, s.return_jitter) == (None, 600.0, 30.0)


@pytest.mark.parametrize(
    ("text", "value"),
    [("30/min", (30, 60.0)), ("30/m", (30, 60.0)), ("1000/h", (1000, 3600.0)), ("5/s", (5, 1.0))],
)
def test_rate_limit_takes_the_storm_control_syntax(text: str, value: tuple[int, float]) -> None:
    assert smtp(f'rate_limit = "{text}"').rate_limit == value


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("0/m", "1 to"),
        ("-5/m", "not a rate"),
        ("5/0s", "period"),
        ("1000/s", "over 100 mails a second"),
        ("1/2d", "under one mail a day"),
        ("lots", "not a rate"),
    ],
)
def test_nonsense_rate_limits_are_refused(text: str, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        smtp(f'rate_limit = "{text}"')
    assert any("rate_limit" in p and why in p for p in info.value.problems), info.value.problems


@pytest.mark.parametrize(
    "line",
    [
        'throttle_max = "0s"',
        'throttle_max = "2d"',
        'return_jitter = "-1s"',
        'return_jitter = "2h"',
        "return_jitter = 5",
    ],
)
def test_nonsense_durations_are_refused(line: str) -> None:
    with pytest.raises(ConfigError):
        smtp(line)


def test_return_jitter_zero_disables_it() -> None:
    assert smtp('return_jitter = "0s"').return_jitter == 0.0


def test_check_config_refuses_an_absurd_rate_limit_with_its_line(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(BASE.format(extra='rate_limit = "0/min"\n'))
    line = cfg.read_text().splitlines().index('rate_limit = "0/min"') + 1
    r = run_cli("check-config", "-c", str(cfg))
    assert r.returncode == 2, r.stdout
    assert f"{cfg}:{line}: smtp.rate_limit: " in r.stderr, r.stderr
    cfg.write_text(BASE.format(extra='rate_limit = "30/min"\n'))
    assert run_cli("check-config", "-c", str(cfg)).returncode == 0
