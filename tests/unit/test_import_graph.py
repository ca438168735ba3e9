"""The import graph of flux_edge/, built from the source's AST: no cycles, and each third-party
library imported by its one adapter module only.

Imports under ``if TYPE_CHECKING:`` are left out (they never run). Imports inside functions
count: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "flux_edge"

# Cycles known today, to be removed by the structure issue's config work (the config package still
# calls the rules engine, the rule replayer and the Modbus planner from inside its checks). The
# test fails on any other cycle, and on one of these if it grows; when one disappears, strike it.
KNOWN_CYCLES: list[frozenset[str]] = []


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """Every module name that ``module`` imports, outside TYPE_CHECKING blocks."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            # `from pkg import sub` may name a submodule
            found.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _graph() -> dict[str, set[str]]:
    files = {
        _module_name(p): p for p in PACKAGE.rglob("*.py") if "templates" not in p.parts
    }
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        targets = _imports(tree, name, path.name == "__init__.py")
        # an import of a.b.c also runs a and a.b: only edges to modules of this tree count
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[frozenset[str]] = []
    counter = 0

    def strong(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_the_graph_is_read() -> None:
    graph = _graph()
    assert "flux_edge.cli" in graph
    assert "flux_edge.errors" in graph["flux_edge.cli"]  # an edge the test must see


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [
        frozenset({"a", "b", "c"})
    ]


def test_type_checking_imports_are_left_out() -> None:
    tree = ast.parse(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import flux_edge.x\n"
        "def f():\n    import flux_edge.y\n"
    )
    assert _imports(tree, "flux_edge.m", False) == {"typing", "typing.TYPE_CHECKING", "flux_edge.y"}


def test_no_import_cycles() -> None:
    cycles = _cycles(_graph())
    unexpected = [sorted(c) for c in cycles if c not in KNOWN_CYCLES]
    assert not unexpected, f"import cycles in flux_edge/: {unexpected}"


# third-party library -> the one module (or package) of flux_edge allowed to import it
ADAPTERS = {
    "wasmtime": "flux_edge.plugins.ffi",
    "paho": "flux_edge.mqtt",
    "pymodbus": "flux_edge.sources.modbus",
    "serial": "flux_edge.sources.serial",
    "sdnotify": "flux_edge.runtime.systemd",
    "cel_expr_python": "flux_edge.rules.cel",
    "tomlkit": "flux_edge.config",
}


@pytest.mark.parametrize("library", sorted(ADAPTERS))
def test_each_library_has_one_adapter(library: str) -> None:
    users = []
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        imported = _imports(tree, name, path.name == "__init__.py")
        if any(i == library or i.startswith(library + ".") for i in imported):
            users.append(name)
    allowed = ADAPTERS[library]
    # the simulators (never imported by production code) may use the libraries they simulate
    strays = [
        u for u in users
        if not (u == allowed or u.startswith(allowed + ".")) and not u.startswith("flux_edge.sim")
    ]
    assert users, f"nothing imports {library}: the adapter table is stale"
    assert not strays, f"{library} is imported outside {allowed}: {strays}"
