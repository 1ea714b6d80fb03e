"""The import graph of ``msplora/`` (every import, module-level and inside functions): no circles,
and no floor imports a higher one (DESIGN.md §2, docs/design.md).

Read from the source with ``ast``, so a function-local import counts as much as a top-level one:
it is a circle the moment that function runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "msplora"

# Floors, bottom to top (DESIGN.md §2). A module may import its own floor and those below it.
CORE = 1  # the pyramid as data and its injection: torch + transformers only
FLOORS: dict[str, int] = {
    "msplora": CORE,  # the package's own __init__: the core's public names
    "msplora.errors": CORE,
    "msplora.io": CORE,
    "msplora.config": CORE,
    "msplora.resources": CORE,
    "msplora.pyramid": CORE,
    "msplora.hf": CORE,
    "msplora.layers": CORE,
    "msplora.inject": CORE,
    "msplora.export": CORE,
    "msplora.peft": 2,  # beside the core: imports it, never imported by it
    "msplora.analysis": 3,
    "msplora.training": 4,
    "msplora.search": 5,
    "msplora.ablation": 6,
    # Command-line doors over everything: nothing of the library imports them.
    "msplora.__main__": 7,
    "msplora.export_cli": 7,
    "msplora.bench": 7,
    "msplora.gpu_check": 7,  # `make gpu-check`: times fits and the peft baseline
    "msplora.memory": 7,  # `python -m msplora.memory --config ...`: reads recipes through the CLI
}
NAMED = ("training", "search", "ablation", "analysis", "peft")  # what the core never imports

# A submodule importing its own package inside a function would be listed here, by name, so that
# no other one slips in (ablation/cli.py read the package's docstring that way; it holds its text now).
KNOWN_PACKAGE_SELF_IMPORTS: set[tuple[str, str]] = set()


def _modules(root: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module a dotted name lives in (``msplora.config.Level`` -> ``msplora.config``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the msplora modules it imports anywhere in its source."""
    modules = _modules(root)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the importing module's package
                    pkg = name.split(".") if is_package else name.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (node.level - 1)]
                    base = ".".join(pkg + ([node.module] if node.module else []))
                # `from pkg import sub` imports the submodule; `from mod import name` the module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                if t == "msplora" or t.startswith("msplora."):
                    resolved = _resolve(t, modules)
                    if resolved and resolved != name:
                        found.add(resolved)
        graph[name] = found
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def floor(module: str) -> int:
    while module not in FLOORS:
        if "." not in module:
            raise KeyError(module)
        module = module.rpartition(".")[0]
    return FLOORS[module]


def _graph_without_known() -> dict[str, set[str]]:
    graph = import_graph()
    for a, b in KNOWN_PACKAGE_SELF_IMPORTS:
        graph[a].discard(b)
    return graph


def test_the_graph_sees_top_level_local_relative_and_from_package_imports(tmp_path):
    pkg = tmp_path / "msplora"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from msplora.a import x\n")
    (pkg / "a.py").write_text("def f():\n    from msplora.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("from . import b\n")
    (pkg / "sub" / "b.py").write_text("import msplora.a\nfrom ..a import y\n")
    graph = import_graph(pkg)
    assert graph == {
        "msplora": {"msplora.a"},
        "msplora.a": {"msplora.sub.b"},  # the function-local import counts
        "msplora.sub": {"msplora.sub.b"},
        "msplora.sub.b": {"msplora.a"},
    }
    assert cycles(graph) == [["msplora.a", "msplora.sub.b"]]


def test_every_module_has_a_floor():
    unplaced = []
    for m in import_graph():
        try:
            floor(m)
        except KeyError:
            unplaced.append(m)
    assert unplaced == [], f"add these to FLOORS (and to docs/design.md's floors): {unplaced}"


def test_no_import_circles():
    assert cycles(_graph_without_known()) == []


def test_known_self_imports_are_still_there():
    """The exception above is not stale: once the import is gone, drop it from the list."""
    graph = import_graph()
    assert all(b in graph[a] for a, b in KNOWN_PACKAGE_SELF_IMPORTS)


def test_no_floor_imports_a_higher_one():
    upward = [
        f"{a} (floor {floor(a)}) imports {b} (floor {floor(b)})"
        for a, targets in sorted(_graph_without_known().items())
        for b in sorted(targets)
        if floor(b) > floor(a)
    ]
    assert upward == []


@pytest.mark.parametrize("module", sorted(m for m, f in FLOORS.items() if f == CORE))
def test_the_core_imports_no_training_search_ablation_analysis_or_peft(module):
    graph = import_graph()
    assert module in graph, f"FLOORS names {module}, which is not in msplora/"
    bad = [t for t in graph[module] if t.split(".")[1:2] and t.split(".")[1] in NAMED]
    assert bad == []


def _room(module: str) -> str:
    """A module's room: ``msplora.<first part>`` (a package with its submodules, or one file)."""
    return ".".join(module.split(".")[:2])


def underscored_imports_across_rooms(root: Path = PACKAGE) -> list[str]:
    """``from msplora.X... import _name`` written in another room than X's: a private name used
    through a seam (a room's underscored names are its own business)."""
    modules = _modules(root)
    out = []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if not isinstance(node, ast.ImportFrom) or node.level or not (node.module or "").startswith("msplora"):
                continue
            for a in node.names:
                private = a.name.startswith("_") and not a.name.startswith("__")
                if private and _room(node.module) != _room(name):
                    out.append(f"{name}: from {node.module} import {a.name}")
    return out


def test_no_room_imports_another_rooms_underscored_names():
    assert underscored_imports_across_rooms() == []
