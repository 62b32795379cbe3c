"""The package's import graph, read from the source with `ast`: no cycles, no private names across modules.

Every import counts, also those inside functions (they run later, but they are still a dependency),
and so do type-only ones under `if TYPE_CHECKING:`. An edge is drawn to the module an import names
(`from lorakit.io import x` -> lorakit.io; `from lorakit import nf4` -> lorakit.nf4).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "lorakit"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every lorakit import in module `name`."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names if alias.name.split(".")[0] == "lorakit"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from .x import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "lorakit":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in MODULES:  # `from lorakit import nf4`: the submodule itself
                    found.append((sub, [], node.lineno))
                else:
                    found.append((base, [alias.name], node.lineno))
    return found


def _graph() -> dict[str, set[str]]:
    return {name: {target for target, _, _ in _imports(name) if target != name} for name in MODULES}


def test_the_graph_reads_every_module_and_finds_known_edges():
    graph = _graph()
    assert "lorakit.layers" in graph and "lorakit.serve.engine" in graph
    assert "lorakit.errors" in graph["lorakit.adapters"]
    assert "lorakit.layers" in graph["lorakit.adapters"]


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_private_names_imported_from_another_module():
    bad = []
    for name in MODULES:
        for target, names, line in _imports(name):
            bad += [f"{name}:{line} imports {target}.{n}" for n in names if n.startswith("_") and target != name]
    assert not bad, "\n".join(bad)


def test_no_private_attributes_of_another_lorakit_module():
    """`from lorakit import nf4` then `nf4._replace(...)` is a private import by another route."""
    bad = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "lorakit":
                aliases.update({a.asname or a.name: f"lorakit.{a.name}" for a in node.names})
            elif isinstance(node, ast.Import):
                aliases.update({a.asname: a.name for a in node.names if a.asname and a.name.startswith("lorakit")})
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in aliases and node.attr.startswith("_") and not node.attr.startswith("__"):
                bad.append(f"{name}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("top", ["lorakit.cli"])
def test_nothing_below_the_command_line_imports_it(top):
    users = [name for name, targets in _graph().items() if top in targets and name != "lorakit.__main__"]
    assert not users, f"{', '.join(users)} import {top}; option helpers live in lorakit.options"


def test_no_module_reaches_the_package_facade():
    """`import lorakit` inside the package hides which module it needs (and can hide a cycle)."""
    users = [name for name, targets in _graph().items() if "lorakit" in targets and name != "lorakit"]
    assert not users, f"{', '.join(users)} import the lorakit package itself; import the module that owns the name"
