"""The one direction of imports that docs/ARCHITECTURE.md draws, checked.

Read from the source with `ast`, so an import inside a function counts as much as one
at the top: a rule broken lazily is still broken.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports (absolute names, first-party or not)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from gateway.outbox import queue` imports the submodule gateway.outbox.queue
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


MODULES = {
    module_name(p): p for pkg in ("gateway", "firmware_bridge") for p in (ROOT / pkg).rglob("*.py")
}
GRAPH = {name: {m for m in imports_of(path) if m in MODULES} for name, path in MODULES.items()}


def inside(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def closure(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(GRAPH.get(name, ()))
            # A package's __init__ runs when any of its modules is imported.
            parent = name.rpartition(".")[0]
            if parent in MODULES:
                todo.append(parent)
    return seen


RULES = [
    # (who, may never import, why)
    ("firmware_bridge", ("gateway",), "the protocol is shared with firmware: no daemon in it"),
    (
        "gateway.outbox",
        (
            "gateway.sources",
            "gateway.relay",
            "gateway.routing",
            "gateway.service",
            "gateway.ingest",
            "gateway.cli",
            "gateway.status",
            "gateway.smtp",
        ),
        "storage stores: it neither routes, relays, nor knows where alerts come from",
    ),
    ("gateway.sources", ("gateway.relay", "gateway.smtp", "gateway.service", "gateway.cli"), ""),
    ("gateway.relay", ("gateway.sources", "gateway.service", "gateway.cli"), ""),
    (
        "gateway.alert",
        ("gateway.outbox", "gateway.sources", "gateway.routing", "gateway.relay"),
        "",
    ),
    ("gateway.clock", ("gateway.outbox", "gateway.alert", "gateway.config"), "a leaf"),
    ("gateway.runtime", ("gateway",), "a leaf: every layer counts in it"),
    ("gateway.config", ("gateway.storm", "gateway.outbox", "gateway.routing"), "a leaf"),
    ("gateway.errors", ("gateway.outbox", "gateway.alert", "gateway.config"), "a leaf"),
]


@pytest.mark.parametrize(("who", "never", "why"), RULES, ids=[r[0] for r in RULES])
def test_imports_point_one_way(who: str, never: tuple[str, ...], why: str) -> None:
    broken = sorted(
        f"{name} imports {dep}"
        for name, deps in GRAPH.items()
        if inside(name, who)
        for dep in deps
        if inside(dep, *never)
    )
    assert broken == [], why


def test_the_daemon_does_not_carry_the_lab() -> None:
    """The test CA and capture smarthost (gateway.lab) and the demo are for `mailgw demo`
    and the tests: nothing the daemon runs imports them."""
    daemon = closure("gateway.service")
    for part in ("gateway.sources.mqtt", "gateway.sources.serial", "gateway.relay"):
        daemon |= closure(part)
    assert not daemon & {"gateway.lab", "gateway.demo", "gateway.cli"}


def test_the_graph_has_no_cycles_between_packages() -> None:
    """Modules may import their siblings, but the packages' graph is acyclic."""

    def package(name: str) -> str:
        parts = name.split(".")
        return ".".join(parts[:2]) if parts[0] == "gateway" and len(parts) > 1 else parts[0]

    edges = {
        (package(a), package(b))
        for a, deps in GRAPH.items()
        for b in deps
        if package(a) != package(b) and package(b) != "gateway"
    }
    nodes = {n for edge in edges for n in edge}
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for a, b in edges:
            if a == n:
                if state.get(b) == 1:
                    raise AssertionError("import cycle: " + " -> ".join([*path, n, b]))
                if b not in state:
                    visit(b, [*path, n])
        state[n] = 2

    for n in sorted(nodes):
        if n not in state:
            visit(n, [])
