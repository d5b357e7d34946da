"""The floor plan, checked from the source: contract, runtime, storage and losses at the bottom; gateway and workers
above them; the CLI on top. No import runs back up a floor, no two modules import each other in a circle, and the
gateway process loads no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

FLOORS: dict[str, int] = {
    "bus_events": 0,
    "artifact_store": 1, "loss_plugins": 1,
    "bus_runtime": 2,
    "bus_gateway": 3, "trainer_consumer": 3, "sampler_consumer": 3, "metrics_stream": 3,
    "tinker_bus": 4,
}
# Packages on one floor that must not know each other: the parts talk only through Kafka.
STRANGERS = {("bus_gateway", "trainer_consumer"), ("bus_gateway", "sampler_consumer"),
             ("trainer_consumer", "sampler_consumer"), ("artifact_store", "loss_plugins"),
             ("bus_gateway", "metrics_stream"), ("trainer_consumer", "metrics_stream"),
             ("sampler_consumer", "metrics_stream")}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module of ours `path` imports, at the top or inside a function (a lazy import is still an arrow)."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module_name(path).rsplit(".", 0 if path.name == "__init__.py" else 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in FLOORS}


def _graph() -> dict[str, set[str]]:
    files = [f for pkg in FLOORS for f in (REPO / pkg).rglob("*.py")]
    modules = {_module_name(f): f for f in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(path):
            # `from pkg import name` names a module when pkg.name is one; else it names something in pkg
            target = imported if imported in modules else imported.rsplit(".", 1)[0]
            if target in modules and target != name:
                targets.add(target)
        graph[name] = targets
    return graph


def test_no_import_runs_up_a_floor_or_between_strangers() -> None:
    wrong = []
    for source, targets in _graph().items():
        src_pkg = source.split(".")[0]
        for target in targets:
            dst_pkg = target.split(".")[0]
            if FLOORS[dst_pkg] > FLOORS[src_pkg] or tuple(sorted((src_pkg, dst_pkg))) in STRANGERS:
                wrong.append(f"{source} -> {target}")
    assert wrong == []


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            out.append(component)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in graph:
        if node not in index:
            visit(node)
    return out


def test_no_import_cycles() -> None:
    graph = _graph()
    # a package's __init__ re-exporting its own modules is not a cycle worth naming: only arrows between modules
    cycles = [sorted(c) for c in _strongly_connected(graph) if len(c) > 1]
    assert cycles == []


def test_the_cycle_check_sees_a_cycle() -> None:
    assert _strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["c", "b", "a"], ["d"]]


@pytest.mark.parametrize("module", ["bus_gateway.app", "bus_runtime.settings", "artifact_store", "loss_plugins",
                                    "metrics_stream.worker"])
def test_importing_loads_no_torch(module: str) -> None:
    code = f"import sys, {module}; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0, f"{module} imports torch"
