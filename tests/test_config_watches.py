"""[[silence]] and [selfalerts]: what check-config accepts the daemon runs; every refusal."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.config import ConfigError, parse
from tests.conftest import run_cli

ROUTE = '[[route]]\nname = "ops"\nto = ["ops@example.com"]\n'


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(ROUTE + text, source="gw.toml")
    return info.value.problems


def test_a_cold_room_example_parses() -> None:
    cfg = parse(
        ROUTE
        + '[[silence]]\nname = "cold-room"\nmatch = "alerts/cold-room-3/#"\nsensor = "temp1"\n'
        'expect_every = "15m"\nseverity = "critical"\nroute = "ops"\n'
        '[selfalerts]\nenabled = true\nroute = "ops"\nmin_interval = "1h"\noutbox_percent = 80\n'
    )
    [rule] = cfg.silence
    assert (rule.name, rule.match, rule.sensor, rule.expect_every, rule.severity, rule.route) == (
        "cold-room",
        "alerts/cold-room-3/#",
        "temp1",
        900.0,
        "critical",
        "ops",
    )
    assert cfg.selfalerts.enabled and cfg.selfalerts.min_interval == 3600.0
    assert parse(ROUTE).selfalerts.enabled is True  # on unless turned off


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[[silence]]\nmatch = "a/#"\n', "silence[0].expect_every: is required"),
        ('[[silence]]\nexpect_every = "1s"\n', "must be at least 2s"),
        ('[[silence]]\nexpect_every = "400d"\n', "must be at most"),
        ('[[silence]]\nexpect_every = "soon"\n', "not a duration"),
        ('[[silence]]\nexpect_every = "1m"\nmatch = "a/#/b"\n', "silence[0].match"),
        ('[[silence]]\nexpect_every = "1m"\nroute = "nope"\n', "silence[0].route: names no route"),
        ('[[silence]]\nexpect_every = "1m"\nseverity = "loud"\n', "must be one of"),
        ('[[silence]]\nexpect_every = "1m"\nsensor = ""\n', "silence[0].sensor"),
        ('[[silence]]\nexpect_every = "1m"\nname = "a b"\n', "silence[0].name"),
        ('[[silence]]\nexpect_every = "1m"\nevery = "1m"\n', "silence[0].every: unknown key"),
        (
            '[[silence]]\nexpect_every = "1m"\nname = "x"\n'
            '[[silence]]\nexpect_every = "1m"\nname = "x"\n',
            "two rules are named 'x'",
        ),
        ('[selfalerts]\nroute = "nope"\n', "selfalerts.route: names no route"),
        ("[selfalerts]\noutbox_percent = 100\n", "between 10 and 99"),
        ("[selfalerts]\ndisk_free_percent = 0\n", "between 1 and 50"),
        ('[selfalerts]\nmin_interval = "30d"\n', "must be at most 7d"),
        ('[selfalerts]\nenabled = "yes"\n', "true or false"),
        ("[selfalerts]\nmail = 1\n", "selfalerts.mail: unknown key"),
    ],
)
def test_refusals_name_their_key_and_line(text: str, expected: str) -> None:
    found = problems(text)
    assert any(expected in p for p in found), found
    assert all(p.startswith("gw.toml:") for p in found)


def test_route_test_shows_the_silence_rule(write_config: Callable[..., Path]) -> None:
    cfg = write_config(
        ROUTE + '[[silence]]\nname = "cold"\nmatch = "alerts/cold-room-3/#"\nexpect_every = "15m"\n'
    )
    out = run_cli("route-test", "-c", str(cfg), "alerts/cold-room-3/temp1").stdout
    assert "silence rule cold: a report expected every 15m" in out
    out = run_cli("route-test", "-c", str(cfg), "alerts/truck/temp1").stdout
    assert "no silence rule" in out
    out = run_cli(
        "route-test", "-c", str(cfg), "gateway/test-gw/silence/alerts/cold-room-3/t"
    ).stdout
    assert "→ route ops" in out


def _examples() -> list[str]:
    import re

    root = Path(__file__).resolve().parent.parent
    blocks = []
    for doc in (root / "README.md", root / "docs" / "CONFIG.md"):
        for block in re.findall(r"```toml\n(.*?)```", doc.read_text(), re.S):
            if "[[silence]]" in block or "[selfalerts]" in block:
                blocks.append(block)
    return blocks


@pytest.mark.parametrize("block", _examples())
def test_the_documented_examples_can_be_pasted(block: str) -> None:
    text = block if 'name = "ops"' in block else ROUTE + block
    cfg = parse(text)
    assert cfg.silence or cfg.selfalerts.enabled


def test_there_are_examples_to_paste() -> None:
    assert len(_examples()) >= 3
