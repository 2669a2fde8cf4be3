"""Imports point one way: no cycle among flypool's modules (issue: import cycles)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def _modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / "flypool").rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(path: Path, known: dict[str, Path]) -> set[str]:
    """Modules imported when ``path`` is imported (not under TYPE_CHECKING, not in functions)."""
    deps: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue
        for n in ast.walk(node):
            if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("flypool"):
                for alias in n.names:
                    full = f"{n.module}.{alias.name}"
                    deps.add(full if full in known else n.module)
            elif isinstance(n, ast.Import):
                deps.update(a.name for a in n.names if a.name.startswith("flypool"))
    return {d for d in deps if d in known}


def test_no_import_cycles() -> None:
    """A depth-first walk of the import graph finds no back edge."""
    mods = _modules()
    graph = {m: _imports(p, mods) - {m} for m, p in mods.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for dep in sorted(graph[m]):
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep) :], dep])
            elif dep not in state:
                walk(dep)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            walk(m)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_check_sees_imports() -> None:
    """The walk is not vacuous: the daemon imports the pool and the proxy."""
    mods = _modules()
    deps = _imports(mods["flypool.daemon"], mods)
    assert any(d.startswith("flypool.pool") for d in deps)
    assert any(d.startswith("flypool.http") for d in deps)
