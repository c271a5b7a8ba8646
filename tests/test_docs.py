"""The configuration reference must list exactly the keys the loader accepts."""

from __future__ import annotations

import re
from pathlib import Path

from gateway.config import known_keys, parse

DOC = Path(__file__).resolve().parent.parent / "docs" / "CONFIG.md"


def documented() -> dict[str, set[str]]:
    sections: dict[str, set[str]] = {}
    current = None
    for line in DOC.read_text().splitlines():
        if m := re.match(r"## \[+([\w.]+)\]+", line):
            current = m.group(1)
            sections[current] = set()
        elif current and (m := re.match(r"\| `(\w+)` \|", line)):
            sections[current].add(m.group(1))
    return sections


def test_reference_matches_the_schema() -> None:
    assert documented() == known_keys()


def test_metrics_section_rejects_unknown_keys() -> None:
    try:
        parse("[metrics]\nbogus = 1\n")
    except Exception as exc:
        assert "metrics.bogus: unknown key" in str(exc)
    else:
        raise AssertionError("an unknown key was accepted")
