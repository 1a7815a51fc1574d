"""The rooms stay in order: no import cycles anywhere, no import of a room above, small functions.

Read from the source with `ast` (no import): every `import` and `from ... import`, at module level or
inside a function, is an edge from the module that holds it to the module it names. A package's own
`__init__` running when one of its submodules is imported is not counted (that is how packages load);
`from pkg import name` counts as an import of `pkg` unless `name` is a submodule.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
# the rooms below the engine, and what they may not import
LOWER_ROOMS = ("cnnkit.utils", "cnnkit.errors", "cnnkit.taskapi", "cnnkit.plots", "cnnkit.ops", "cnnkit.data",
               "cnnkit.models", "cnnkit.explain")
UPPER_ROOMS = ("cnnkit.engine", "cnnkit.tasks", "cnnkit.report", "cnnkit.cli", "cnnkit.demo")
MAX_LINES, MAX_PARAMS = 80, 8


def _modules() -> dict[str, tuple[Path, bool]]:
    mods = {}
    for path in (SRC / "cnnkit").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return mods


def _targets(node: ast.AST, module: str, is_pkg: bool, mods: dict) -> set[str]:
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in mods}
    base = module.split(".")[: None if is_pkg else -1]
    if node.level:
        base = base[: len(base) - node.level + 1]
        name = ".".join(base + ([node.module] if node.module else []))
    else:
        name = node.module or ""
    subs = {f"{name}.{a.name}" for a in node.names if f"{name}.{a.name}" in mods}
    plain = [a for a in node.names if f"{name}.{a.name}" not in mods]
    return subs | ({name} if plain and name in mods else set())


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for module, (path, is_pkg) in mods.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= _targets(node, module, is_pkg, mods)
        graph[module] = edges - {module}
    return graph


def _in(module: str, rooms: tuple[str, ...]) -> bool:
    return any(module == r or module.startswith(r + ".") for r in rooms)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_below_the_engine():
    graph = _graph()
    lower = {m: {t for t in ts if _in(t, LOWER_ROOMS)} for m, ts in graph.items() if _in(m, LOWER_ROOMS)}
    assert _cycles(lower) == []


def test_no_import_cycles_anywhere():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_engine_imports_no_task():
    wrong = sorted(f"{m} -> {t}" for m, ts in _graph().items() if _in(m, ("cnnkit.engine",))
                   for t in ts if _in(t, ("cnnkit.tasks",)))
    assert wrong == []


def test_lower_rooms_do_not_import_the_rooms_above():
    wrong = sorted(f"{m} -> {t}" for m, ts in _graph().items() if _in(m, LOWER_ROOMS)
                   for t in ts if _in(t, UPPER_ROOMS))
    assert wrong == []


def _long_functions(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        a = node.args
        params = [x for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
        n_params = len(params) + bool(a.vararg) + bool(a.kwarg)
        lines = node.end_lineno - node.lineno + 1
        # a network's constructor takes its hyper-parameters (timm, torchvision do the same)
        constructor = node.name == "__init__" and n_params > MAX_PARAMS and lines <= MAX_LINES
        if lines > MAX_LINES or (n_params > MAX_PARAMS and not constructor):
            out.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name}: {lines} lines, {n_params} parameters")
    return out


@pytest.mark.parametrize("room", ["data", "models", "ops", "explain", "engine", "tasks", "."])
def test_functions_are_short(room):
    folder = SRC / "cnnkit" / room
    files = sorted(folder.glob("*.py") if room == "." else folder.rglob("*.py"))
    assert [f for path in files for f in _long_functions(path)] == []
