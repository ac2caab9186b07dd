"""The core's shape: no circular imports, no particular target named outside the built-in plugins."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "mtlbench"


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """mtlbench modules imported at run time anywhere in the file (inside functions too; not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("mtlbench"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mtlbench"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def graph() -> dict[str, set[str]]:
    mods = {module_name(p): p for p in PKG.rglob("*.py")}
    out = {}
    for name, path in mods.items():
        deps = set()
        for imp in imports(path):
            while imp and imp not in mods:  # "from mtlbench.api import Task" -> mtlbench.api
                imp = imp.rpartition(".")[0]
            if imp and imp != name and imp != "mtlbench":
                deps.add(imp)
        out[name] = deps
    return out


def test_import_graph_has_no_cycle():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1:
                cycle = stack[stack.index(m):] + [m]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n)


def test_api_imports_nothing_of_mtlbench_at_module_level():
    tree = ast.parse((PKG / "api.py").read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not [ast.unparse(n) for n in top if "mtlbench" in ast.unparse(n)]


def test_core_names_no_particular_target():
    """Outside mtlbench/builtin/ nothing mentions heatmaps: the landmark task is an ordinary plugin."""
    hits = [
        f"{p.relative_to(PKG.parent)}:{i}"
        for p in PKG.rglob("*.py")
        if "builtin" not in p.relative_to(PKG).parts
        for i, line in enumerate(p.read_text().splitlines(), start=1)
        if re.search("heatmap", line, re.I)
    ]
    assert hits == []


def test_core_never_imports_a_builtin():
    offenders = [
        name for name, deps in graph().items()
        if not name.startswith("mtlbench.builtin") and any(d.startswith("mtlbench.builtin") for d in deps)
    ]
    assert offenders == []
