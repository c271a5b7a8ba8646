"""Quantities as the config writes them: durations, sizes and rates, as text.

Each parser takes the operator's text and returns a plain number, or raises
ValueError with a message that shows the expected form. Bounds are part of the
parse where a value past them would break arithmetic downstream.
"""

from __future__ import annotations

import re

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


# "min" too: smarthosts publish their limits per minute ("30/min", Microsoft 365).
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*(min|[smhd])\s*$")
_RATE_UNITS = {"s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
MAX_RATE_COUNT = 1_000_000
MAX_RATE_PERIOD = 365 * 86400.0


def parse_rate(text: str) -> tuple[int, float]:
    """ "20/h" → (20, 3600.0); "5/10m" → (5, 600.0). Raises ValueError with the fix.

    The bucket refills at count/period per second (`storm.refill`) and starts full at `count`
    tokens: a zero period would divide by zero on every store on the route, and numbers
    past these bounds would overflow a float.
    """
    m = _RATE.match(text)
    if not m:
        raise ValueError(
            f'{text!r} is not a rate: write mails per period, like "20/h", "5/10m" or "1/s"'
        )
    digits, period_digits, unit = m.groups()
    # Compared as text lengths and integers first: int() refuses very long digit strings,
    # and float() of a long one is inf.
    count = int(digits) if len(digits) <= 9 else MAX_RATE_COUNT + 1
    seconds = int(period_digits or 1) * _RATE_UNITS[unit] if len(period_digits) <= 9 else -1
    if not 1 <= count <= MAX_RATE_COUNT:
        raise ValueError(
            f'{text!r}: write 1 to {MAX_RATE_COUNT} mails per period, like "20/h" or "5/10m"'
        )
    if not 1 <= seconds <= MAX_RATE_PERIOD:
        raise ValueError(
            f'{text!r}: write mails per period of 1 s to 365 d, like "20/h" or "100/d" '
            "(a zero period would divide by zero)"
        )
    return count, float(seconds)
