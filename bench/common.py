"""Helpers shared by the benchmarks: timing, disk-write accounting, the table."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_bytes() -> int:
    """Bytes this process caused to be written to storage (/proc/self/io)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


def best_rate(fn: Callable[[], int], repeats: int = 3) -> float:
    """Median items/s over `repeats` runs of fn (which returns the item count)."""
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def row(
    name: str,
    value: float,
    unit: str,
    ceiling: float | None = None,
    ceiling_name: str = "",
    goal: str = "",
) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "value": round(value, 2), "unit": unit}
    if ceiling:
        entry.update(
            ceiling=round(ceiling, 2), ceiling_name=ceiling_name, ratio=round(value / ceiling, 3)
        )
    if goal:
        entry["goal"] = goal
    return entry


def table(rows: list[dict[str, Any]]) -> str:
    out = [f"{'benchmark':44} {'value':>12} {'unit':10} {'ceiling':>12} {'ratio':>6}  goal"]
    for r in rows:
        ceiling = f"{r['ceiling']:>12,.0f}" if "ceiling" in r else f"{'':>12}"
        ratio = f"{r['ratio']:>6.2f}" if "ratio" in r else f"{'':>6}"
        out.append(
            f"{r['name'][:44]:44} {r['value']:>12,.1f} {r['unit'][:10]:10} {ceiling} "
            f"{ratio}  {r.get('goal', '')}"
        )
    return "\n".join(out)
