"""The package's rooms: no module imports one that imports it back, directly or through others, at module
level or inside a function (a submodule reading its own package's face excepted); the engine knows no task."""

from __future__ import annotations

import ast
from pathlib import Path

import cnnkit

SRC = Path(cnnkit.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cnnkit") and not node.level:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("cnnkit")]
            for t in targets:
                if t in modules and t != name and not name.startswith(t + "."):  # not its own package's face
                    graph[name].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_rooms_below_the_engine_import_nothing_above_them():
    graph = import_graph()
    low = ("cnnkit.errors", "cnnkit.utils", "cnnkit.taskapi", "cnnkit.ops", "cnnkit.data", "cnnkit.models")
    high = ("cnnkit.engine", "cnnkit.tasks", "cnnkit.report", "cnnkit.cli", "cnnkit.demo")
    bad = sorted(f"{m} -> {t}" for m, targets in graph.items() if m.startswith(low)
                 for t in targets if t.startswith(high))
    assert bad == []
