"""The import graph of ``src/mcsd`` has no circles (DESIGN.md section 5, "No import circles"),
and no runtime module imports the benchmark package.

The graph is read from the sources with ``ast``, not by importing them: every ``import`` and
``from ... import`` of an mcsd module counts, at module level, inside a function, or under
``if TYPE_CHECKING`` (a circle that only a type checker sees still ties the two modules'
designs together). ``from mcsd.x import y`` counts as an edge to ``mcsd.x.y`` when that is a
module, else to ``mcsd.x``; an edge to a package is an edge to its ``__init__``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import mcsd

SRC = Path(mcsd.__file__).parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(SRC.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The mcsd modules ``name`` (at ``path``) imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                origin = ".".join([*base, *([node.module] if node.module else [])])
            else:
                origin = node.module or ""
            for alias in node.names:
                child = f"{origin}.{alias.name}"
                found.add(child if child in known else origin)
    edges = set()
    for target in found:
        # ``import mcsd.a.b`` also runs ``mcsd.a``; the edge that matters is the deepest module
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target.startswith("mcsd") and target != name and target != "mcsd":
            edges.add(target)
    return edges


def import_graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports_of(name, path, known) for name, path in found.items()}


def circles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """Strongly connected components of more than one module (Tarjan), as sorted tuples."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[tuple[str, ...]] = set()

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for child in sorted(graph.get(node, ())):
            if child not in index:
                visit(child)
                low[node] = min(low[node], low[child])
            elif child in on_stack:
                low[node] = min(low[node], index[child])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.add(tuple(sorted(component)))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def describe(component: tuple[str, ...], graph: dict[str, set[str]]) -> str:
    inside = set(component)
    edges = [f"{a} -> {b}" for a in component for b in sorted(graph[a] & inside)]
    return f"{', '.join(component)} ({'; '.join(edges)})"


def test_the_walk_sees_every_kind_of_import(tmp_path):
    source = tmp_path / "walked.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "import mcsd.tree\n"  # module level
        "from mcsd.verify import rules\n"  # a module named in a from-import
        "from .sampling import warp\n"  # relative, a name in a module
        "from . import stats\n"  # relative, a module
        "if TYPE_CHECKING:\n"
        "    from mcsd.config import SpecConfig\n"
        "def f():\n"
        "    from mcsd.models.base import score\n"  # inside a function
        "    import json\n"  # not mcsd
    )
    known = set(modules())
    assert imports_of("mcsd.walked", source, known) == {
        "mcsd.tree",
        "mcsd.verify.rules",
        "mcsd.sampling",
        "mcsd.stats",
        "mcsd.config",
        "mcsd.models.base",
    }
    assert "mcsd.server.app" in import_graph()["mcsd.server"]  # a package's __init__
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {("a", "b", "c")}
    assert circles({"a": {"b"}, "b": set()}) == set()


def test_no_import_circles():
    graph = import_graph()
    found = sorted(circles(graph))
    assert not found, "import circles:\n" + "\n".join(describe(c, graph) for c in found)


def test_no_runtime_module_imports_bench():
    graph = import_graph()
    # the benchmark, the commands, and the capture script that records draft/target pairs on the
    # benchmark's prompts (python -m mcsd.checks.capture, run by hand)
    outside = ("mcsd.bench", "mcsd.commands", "mcsd.cli", "mcsd.checks.capture")
    offenders = sorted(
        f"{name} -> {target}"
        for name, targets in graph.items()
        if not name.startswith(outside)
        for target in targets
        if target.startswith("mcsd.bench")
    )
    assert not offenders, "runtime modules importing mcsd.bench:\n" + "\n".join(offenders)
