"""The package's import graph is the picture docs/ARCHITECTURE.md draws: no cycle between modules, and no
import between layers that the document's layer table does not allow.

Every import counts, the late ones inside functions too: a late import hides a cycle from Python, not from
the design. The graph comes from the source (ast), so this test imports nothing of the package.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cptquant"
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"

# Edges the design rules out whatever the table says: the search knows nothing of ONNX, the exporter nothing
# of how a plan was chosen, the runtimes only read output folders (issue 16).
FORBIDDEN = {("exporter", "passes"), ("exporter", "runtimes"), ("exporter", "commands"),
             ("passes", "exporter"), ("passes", "runtimes"), ("passes", "onnx_io"),
             ("runtimes", "exporter"), ("quant", "passes"), ("quant", "exporter"), ("quant", "runtimes"),
             ("onnx_io", "exporter"), ("onnx_io", "runtimes"), ("onnx_io", "passes")}


TOP = "__init__"  # the package's own __init__.py (it re-exports the API)


def module_files() -> dict[str, Path]:
    """Dotted names below `cptquant` ("passes" for passes/__init__.py, TOP for the package's own) -> file."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that module `name` imports, anywhere in its body."""
    package = "" if name == TOP else name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [a.name[len("cptquant."):] if a.name.startswith("cptquant.") else "" for a in node.names
                          if a.name == "cptquant" or a.name.startswith("cptquant.")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                start = _join(".".join(base), node.module or "")
            elif node.module == "cptquant" or (node.module or "").startswith("cptquant."):
                start = node.module[len("cptquant."):] if node.module != "cptquant" else ""
            else:
                continue
            # `from .x import y`: y is a module when a file says so, else a name defined in .x
            candidates = [_join(start, a.name) if _join(start, a.name) in modules else start for a in node.names]
        else:
            continue
        for target in candidates:
            while target not in modules and target:
                target = target.rpartition(".")[0]
            target = target or TOP
            if target != name:
                targets.add(target)
    return targets


@functools.lru_cache(maxsize=1)
def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def documented_layers() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """ARCHITECTURE.md's layer table: layer -> its modules (a package stands for its modules too), and
    layer -> what it may import (layers, or single modules)."""
    text = ARCHITECTURE.read_text()
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    members: dict[str, list[str]] = {}
    allowed: dict[str, list[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("**"):
            continue
        layer = cells[0].strip("*")
        members[layer] = re.findall(r"`([\w.]*)`", cells[1])
        allowed[layer] = re.findall(r"`([\w.]*)`", cells[2])
    return members, allowed


def layer_of(module: str, members: dict[str, list[str]]) -> str | None:
    """The layer whose listed module is the longest prefix of `module`."""
    best, length = None, -1
    for layer, names in members.items():
        for listed in names:
            if (module == listed or module.startswith(listed + ".")) and len(listed) > length:
                best, length = layer, len(listed)
    return best


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_is_read_from_the_source():
    graph = import_graph()
    assert "exporter.pipeline" in graph and "passes.measurements" in graph
    assert "exporter.lowering" in graph["exporter.file_lowering"]  # from .lowering import ...
    assert "errors" in graph["exporter.pipeline"]  # from ..errors import ...
    assert "version" in graph["exporter.report"]  # from ..version import __version__
    assert "api" in graph[TOP]  # from .api import ...: the package itself
    assert "commands" in graph["commands.verify"]  # from . import user_errors: a name in commands/__init__


def test_no_import_cycle_between_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_a_cycle_is_found():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_module_belongs_to_one_documented_layer():
    members, allowed = documented_layers()
    assert {"core", "quant", "onnx_io", "passes", "exporter", "runtimes", "commands", "bench"} <= set(members)
    modules = module_files()
    assert [m for m in modules if layer_of(m, members) is None] == []
    listed = [name for names in members.values() for name in names]
    assert [name for name in listed if name not in modules] == [], "the table names modules that do not exist"
    assert len(listed) == len(set(listed))
    for layer, names in allowed.items():
        for name in names:
            assert name in members or name in modules, f"{layer} may import {name!r}: neither a layer nor a module"


def test_imports_between_layers_are_the_documented_ones():
    members, allowed = documented_layers()
    for edge in FORBIDDEN:
        assert edge[1] not in allowed[edge[0]], f"ARCHITECTURE.md allows {edge[0]} -> {edge[1]}, which the design forbids"
    wrong = []
    for module, targets in import_graph().items():
        source = layer_of(module, members)
        for target in targets:
            layer = layer_of(target, members)
            ok = layer == source or any(
                layer == name or target == name or target.startswith(name + ".")
                for name in allowed[source])
            if not ok:
                wrong.append(f"{module} ({source}) -> {target} ({layer})")
    assert wrong == [], "imports ARCHITECTURE.md's layer table does not allow:\n" + "\n".join(sorted(wrong))


@pytest.mark.parametrize("source,target", sorted(FORBIDDEN))
def test_forbidden_layer_edges_are_absent(source, target):
    members, _ = documented_layers()
    offending = sorted(f"{m} -> {t}" for m, ts in import_graph().items() for t in ts
                       if layer_of(m, members) == source and layer_of(t, members) == target)
    assert offending == []
