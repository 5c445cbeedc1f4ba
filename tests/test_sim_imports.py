"""No import cycle runs through ``superfloat.sim``, nor through any other package (docs/DEVELOPING.md): neither at module level
nor through a lazy import inside a function. Imports are read with ``ast`` (every ``import`` /
``from ... import`` statement of every module of sim/, sw/, hw/), so a cycle that only closes at
run time is found too."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _package_dirs() -> dict[str, Path]:
    """The source folders of the packages (pyproject's package-dir mapping; read, not imported)."""
    return {f"superfloat.{d}": REPO / d for d in ("sim", "sw", "hw", "cli", "bench")}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, d in _package_dirs().items():
        for f in d.rglob("*.py"):
            rel = f.relative_to(d).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = f
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of ``known`` that ``name`` imports anywhere in its source."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                mod = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and not name.startswith(t + "."):  # not the importer's own parent package
                found.add(t)
    return found


def _cycles_through(graph: dict[str, set[str]], prefix: str) -> list[list[str]]:
    """Strongly connected components (Tarjan) with more than one module, holding a ``prefix`` module."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 and any(c.startswith(prefix) for c in comp):
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    graph = {name: _imports(name, path, known) for name, path in mods.items()}
    # a package's __init__ importing its own submodules is not a cycle of concern
    for name in graph:
        graph[name] = {t for t in graph[name] if not (name in known and t.startswith(name + ".")
                                                      and mods[name].name == "__init__.py")}
    return graph


def test_no_import_cycle_through_sim():
    graph = _graph()
    assert "superfloat.sim.packing" in graph["superfloat.sim.harness"]
    assert _cycles_through(graph, "superfloat.sim") == []


def test_no_import_cycle_in_any_package():
    """Issue 11: the library (sw, hw, sim), the CLI and the benches import one another without a cycle."""
    graph = _graph()
    assert "superfloat.sw.wasq.accelerator" in graph["superfloat.cli.wasq"]  # the graph spans the packages
    assert _cycles_through(graph, "superfloat.") == []


def test_the_checker_finds_a_lazy_cycle():
    """Self-test on a made-up graph: a cycle that closes through a lazy import is reported."""
    graph = {"superfloat.sim.a": {"superfloat.sim.b"}, "superfloat.sim.b": {"superfloat.sim.a"},
             "superfloat.sim.c": {"superfloat.sim.a"}}
    assert _cycles_through(graph, "superfloat.sim") == [["superfloat.sim.a", "superfloat.sim.b"]]
