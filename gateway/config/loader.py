"""Reading TOML tables into typed values while collecting every problem.

The section builders ask a `Table` for each key with its type and bounds; a wrong
value becomes a problem (with the key and, where the text shows it, the line) and the
builder carries on with the default, so one run of check-config reports them all.
A `Table` remembers the keys it was asked for: `done()` turns every other key into an
"unknown key" problem, and `known_keys()` reads the schema off the same calls.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from gateway.config.units import MAX_DURATION, format_duration, parse_duration, parse_size


class Lines:
    """Map (table, key) → line number, by a light scan of the TOML text.

    tomllib gives no positions for values, and a full position-keeping parser
    is not worth its weight here: tables and keys at the start of a line cover
    every config we document.
    """

    _HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.-]+)\s*\]\]?")
    _KEY = re.compile(r"^\s*([A-Za-z0-9_-]+|\"[^\"]*\")\s*=")

    def __init__(self, text: str) -> None:
        self._lines: dict[tuple[str, str], int] = {}
        counts: dict[str, int] = {}
        table = ""
        for no, line in enumerate(text.splitlines(), 1):
            m = self._HEADER.match(line)
            if m:
                name = m.group(2)
                if m.group(1) == "[[":
                    index = counts.get(name, 0)
                    counts[name] = index + 1
                    table = f"{name}[{index}]"
                else:
                    table = name
                self._lines.setdefault((table, ""), no)
                continue
            m = self._KEY.match(line)
            if m:
                self._lines.setdefault((table, m.group(1).strip('"')), no)

    def find(self, table: str, key: str) -> int | None:
        return self._lines.get((table, key)) or self._lines.get((table, ""))


T = TypeVar("T")
_MISSING: Any = object()


class Table:
    """Typed access to one TOML table, collecting problems instead of raising."""

    def __init__(self, loader: Loader, name: str, data: object) -> None:
        self.loader = loader
        self.name = name
        self.seen: set[str] = set()
        if isinstance(data, dict):
            self.data: dict[str, Any] = data
        else:
            loader.problem(name, "", f"must be a table, got {type(data).__name__}")
            self.data = {}

    def _get(self, key: str, default: T, kind: str, check: Callable[[Any], bool]) -> Any:
        self.seen.add(key)
        if key not in self.data:
            if default is _MISSING:
                self.loader.problem(self.name, key, "is required")
                return None
            return default
        value = self.data[key]
        if not check(value):
            self.loader.problem(
                self.name, key, f"must be {kind}, got {type(value).__name__} {value!r}"
            )
            return None if default is _MISSING else default
        return value

    def text(self, key: str, default: Any = _MISSING, choices: tuple[str, ...] = ()) -> Any:
        value = self._get(key, default, "a string", lambda v: isinstance(v, str))
        if choices and isinstance(value, str) and value not in choices:
            self.loader.problem(
                self.name, key, f"must be one of {', '.join(choices)}; got {value!r}"
            )
            return None if default is _MISSING else default
        return value

    def integer(self, key: str, default: Any = _MISSING, lo: int = 0, hi: int = 2**63 - 1) -> Any:
        value = self._get(
            key,
            default,
            "an integer",
            lambda v: isinstance(v, int) and not isinstance(v, bool),
        )
        if isinstance(value, int) and not lo <= value <= hi:
            self.loader.problem(self.name, key, f"must be between {lo} and {hi}; got {value}")
            return default if default is not _MISSING else None
        return value

    def flag(self, key: str, default: Any = _MISSING) -> Any:
        return self._get(key, default, "true or false", lambda v: isinstance(v, bool))

    def duration(
        self,
        key: str,
        default: Any = _MISSING,
        minimum: float = 0.0,
        maximum: float = MAX_DURATION,
    ) -> Any:
        value = self._get(
            key, default, 'a duration string like "30s"', lambda v: isinstance(v, str)
        )
        if not isinstance(value, str):
            return value
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            self.loader.problem(self.name, key, str(exc))
            return default if default is not _MISSING else None
        if seconds < minimum:
            self.loader.problem(self.name, key, f"must be at least {minimum:g}s; got {value!r}")
        elif not seconds <= maximum:
            self.loader.problem(
                self.name, key, f"must be at most {format_duration(maximum)}; got {value!r}"
            )
            return default if default is not _MISSING else None
        return seconds

    def size(self, key: str, default: Any = _MISSING, lo: int = 1, hi: int = 2**63 - 1) -> Any:
        self.seen.add(key)
        if key not in self.data:
            return default
        try:
            value = parse_size(self.data[key])
        except ValueError as exc:
            self.loader.problem(self.name, key, str(exc))
            return default
        if not lo <= value <= hi:
            self.loader.problem(self.name, key, f"must be between {lo} and {hi} bytes; got {value}")
            return default
        return value

    def strings(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(
            key,
            default,
            "a list of strings",
            lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
        )
        return tuple(value) if isinstance(value, list) else value

    def path(self, key: str, default: Any = None, must_exist: bool = False) -> Any:
        value = self.text(key, default)
        if not isinstance(value, str):
            return value
        if "\0" in value:
            self.loader.problem(self.name, key, f"{value!r} contains NUL; fix the path")
            return default
        p = Path(value)
        if must_exist and not p.exists():
            self.loader.problem(self.name, key, f"{p} does not exist; create it or fix the path")
        return p

    def done(self) -> None:
        for key in self.data:
            if key not in self.seen:
                self.loader.problem(
                    self.name,
                    key,
                    "unknown key; check its spelling against the "
                    "configuration reference (docs/CONFIG.md)",
                )


class Loader:
    def __init__(self, text: str, source: str) -> None:
        self.lines = Lines(text)
        self.source = source
        self.problems: list[str] = []
        self.opened: list[Table] = []

    def problem(self, table: str, key: str, message: str) -> None:
        dotted = ".".join(p for p in (table, key) if p)
        line = self.lines.find(table, key)
        where = f"{self.source}:{line}" if line else self.source
        self.problems.append(f"{where}: {dotted}: {message}")

    def table(self, name: str, data: object) -> Table:
        t = Table(self, name, data)
        self.opened.append(t)
        return t

    def tables(self, name: str, data: object) -> Iterator[Table]:
        if data is None:
            return
        if not isinstance(data, list):
            self.problem(name, "", f"must be an array of tables, written [[{name}]]")
            return
        for i, item in enumerate(data):
            yield self.table(f"{name}[{i}]", item)
