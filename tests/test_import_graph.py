"""udg_lib's modules import each other without a circle, counting every import: at module level, inside
functions and under TYPE_CHECKING. A circle hidden in a function still ties the modules' designs together; a
piece two modules share moves into a module below both instead (`encoding`, `routing`)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "udg_lib"


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package's modules it imports (`from udg_lib import x` counts x when x is a module)."""
    modules = {module_name(p, package): p for p in package.rglob("*.py")}

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(package.name):
                targets = [resolve(f"{node.module}.{alias.name}") for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [resolve(alias.name) for alias in node.names if alias.name.startswith(package.name)]
            else:
                continue
            graph[name] |= {t for t in targets if t and t not in (name, package.name)}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_library_imports_form_no_circle():
    graph = import_graph()
    assert {"udg_lib.encoding", "udg_lib.routing", "udg_lib.families", "udg_lib.pretraining"} <= set(graph)
    assert "udg_lib.generation" in graph["udg_lib.pretraining"]  # at module level now: no circle to dodge
    assert circles(graph) == []


def test_the_circle_finder_finds_a_circle_through_a_function_level_import(tmp_path):
    package = tmp_path / "udg_lib"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from udg_lib.b import y\nx = 1\n")
    (package / "b.py").write_text("y = 2\ndef f():\n    from udg_lib import a\n    return a.x\n")
    (package / "c.py").write_text("from udg_lib import a\n")
    graph = import_graph(package)
    assert graph["udg_lib.b"] == {"udg_lib.a"} and graph["udg_lib.c"] == {"udg_lib.a"}
    assert circles(graph) == [["udg_lib.a", "udg_lib.b"]]


@pytest.mark.parametrize("module", ["udg_lib.report", "udg_lib.plots", "udg_lib.methods.names", "udg_lib.catalog"])
def test_light_modules_load_without_torch(module):
    """The report's command line, the figures and the names plots and the judge read stay light: loading torch
    and transformers (seconds) is for the stages that train, generate or score."""
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]", f"{module} loads {loaded.strip()}"
