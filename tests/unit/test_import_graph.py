"""The import graph of pipeline/, launch/ and stages/, read from the source with ast (imports
inside functions and under TYPE_CHECKING count: they are dependencies all the same, and a circle
hidden in a function is still a circle a reader has to untangle).

Rules: no import circle through launch/ or pipeline/; pipeline/ (the library) imports nothing from
launch/, stages/ or configs/; no module over MAX_LINES lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "launch", "stages")
PROJECT = (*PACKAGES, "configs")
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imported_modules(path: Path, module: str, known: set[str]) -> set[str]:
    """Project modules that ``module`` imports anywhere in its file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(node, module, path.name == "__init__.py")
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
            names = [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target
                     for a in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in PROJECT)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {name: imported_modules(path, name, known) - {name} for name, path in modules.items()}


def cycle_through(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """The shortest import circle [start, ..., start], or None (breadth-first search)."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt_frontier = []
        for node in frontier:
            for nxt in sorted(graph.get(node, ())):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if nxt not in parent:
                    parent[nxt] = node
                    nxt_frontier.append(nxt)
        frontier = nxt_frontier
    return None


def test_the_graph_sees_function_level_imports():
    """The reader must find what it is meant to find, or the other tests prove nothing."""
    graph = import_graph()
    assert "launch.runner" in graph["launch.cli"]  # imported inside handlers only
    assert "launch.graph" in graph["launch.runner"]  # module level
    assert cycle_through({"a": {"b", "d"}, "b": {"c"}, "c": {"a"}, "d": set()}, "a") == [
        "a", "b", "c", "a"]
    assert cycle_through({"a": {"b"}, "b": set()}, "a") is None


@pytest.mark.parametrize("package", ["launch", "pipeline"])
def test_no_import_circle(package):
    graph = import_graph()
    # A circle through another package (launch -> stages -> launch) counts as well.
    cycles: dict[frozenset, str] = {}  # one report per circle, whichever module it starts at
    for module in sorted(graph):
        if module.split(".")[0] == package and (cycle := cycle_through(graph, module)):
            cycles.setdefault(frozenset(cycle), " -> ".join(cycle))
    assert not cycles, f"import circles through {package}/: " + "; ".join(cycles.values())


def test_pipeline_imports_no_outer_package():
    graph = import_graph()
    bad = sorted(f"{module} imports {target}" for module, targets in graph.items()
                 if module.split(".")[0] == "pipeline"
                 for target in targets if target.split(".")[0] in ("launch", "stages", "configs"))
    assert not bad, "pipeline/ is the library; it must not import: " + "; ".join(bad)


def test_no_module_over_the_line_limit():
    long = sorted(f"{module_name(p)} ({n} lines)" for p in project_modules().values()
                  if (n := len(p.read_text().splitlines())) > MAX_LINES)
    assert not long, f"modules over {MAX_LINES} lines (split them by concept): {', '.join(long)}"
