"""`make bench`: run every benchmark, write bench/results.json and print a table.

python -m bench            all benchmarks
python -m bench outbox     one of them
"""

from __future__ import annotations

import importlib
import json
import platform
import sys
import time
from pathlib import Path

from bench.common import table

BENCHMARKS = [
    "outbox",
    "relay",
    "mqtt",
    "serial",
    "daemon",
    "memory",
    "recovery",
    "drain",
    "sendmail",
    "local_mail",
]


def main(argv: list[str]) -> int:
    names = argv or BENCHMARKS
    rows = []
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        print(f"running bench/{name}.py ...", file=sys.stderr, flush=True)
        for r in module.run():
            r["bench"] = name
            rows.append(r)
    result = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(),
        },
        "results": rows,
    }
    out = Path(__file__).parent / "results.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))
    print(f"\nwritten to {out}")
    return 0


raise SystemExit(main(sys.argv[1:]))
