"""The package imports one way: lower layers know nothing above them, and no module imports
itself back through another.

Read from the source with ``ast`` (every ``import`` statement, function-level ones included:
a lazy import still makes a circle), so nothing is imported to run the check.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "t5x_like"

# The lower layers, and what they may import from the package: each other and the two
# utilities below everything (errors.py; storage.py, local or gs:// paths), which import
# nothing of the package themselves (checked below).
LOWER = ("t5x_like.models", "t5x_like.objectives", "t5x_like.data", "t5x_like.losses")
BOTTOM = ("t5x_like.errors", "t5x_like.storage")
LOWER_MAY_IMPORT = (*LOWER, *BOTTOM)


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The package modules ``name`` imports (``from a import b`` counts as ``a.b`` when that
    is a module, else ``a``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _inside(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_the_graph_was_read():
    """A parser that found nothing would pass everything below."""
    assert "t5x_like.models.encoder" in MODULES and "t5x_like.train" in MODULES
    assert "t5x_like.models.layers" in GRAPH["t5x_like.models.encoder"]
    assert "t5x_like.evaluation.loop" in GRAPH["t5x_like.train"]


@pytest.mark.parametrize("layer", LOWER)
def test_lower_layers_import_nothing_above_them(layer):
    bad = sorted(f"{m} imports {d}" for m, deps in GRAPH.items() if _inside(m, (layer,))
                 for d in deps if not _inside(d, LOWER_MAY_IMPORT))
    assert not bad, "; ".join(bad)


@pytest.mark.parametrize("module", BOTTOM)
def test_the_bottom_utilities_import_nothing_of_the_package(module):
    assert GRAPH[module] == set()


def test_evaluation_does_not_import_the_trainer():
    bad = sorted(m for m, deps in GRAPH.items()
                 if _inside(m, ("t5x_like.evaluation",)) and "t5x_like.train" in deps)
    assert not bad, f"{bad} import t5x_like.train"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_cycle_finder_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_no_import_circles():
    """A package's ``__init__`` re-exporting its own submodules is not a circle; anything
    else is (e.g. models/encoder <-> compress/quantize, decoding <-> beam_search)."""
    graph = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in GRAPH.items()}
    assert _cycles(graph) == []
