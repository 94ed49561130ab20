"""The package's import graph has no circle (issue 13 item 8), lazy imports included.

Every ``import`` and ``from ... import`` in ``src/kldiv`` (at module level or inside functions:
a lazy import is still a dependency) becomes an edge between kldiv's modules. The facade
``kldiv/__init__.py`` is left out: it sits above everything and installs the backend loader, and
modules reach the public functions through it only lazily.
"""
import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "kldiv"


def _module_name(path):
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules():
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _resolve(mod, is_pkg, node):
    if node.level == 0:
        return node.module or ""
    base = mod.split(".")
    if not is_pkg:
        base = base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _graph():
    mods = _modules()
    graph = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_pkg, node)
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for t in targets:
                # the longest kldiv module that the target names
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != mod and t != "kldiv":
                    graph[mod].add(t)
    return graph


def _parents(mod):
    """Importing a.b.c runs a/__init__ and a/b/__init__ first: edges to the parent packages."""
    parts = mod.split(".")
    return {".".join(parts[:i]) for i in range(2, len(parts))}


def _cycles(graph):
    full = {m: {t for t in ts} | (_parents(m) - {m}) for m, ts in graph.items()}
    # a package's own __init__ importing its submodules is the normal re-export: not a circle
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in full.items()}
    seen, stack, on, found = set(), [], set(), []

    def visit(m):
        seen.add(m)
        stack.append(m)
        on.add(m)
        for t in sorted(edges.get(m, ())):
            if t == "kldiv":
                continue
            if t in on:
                found.append(stack[stack.index(t):] + [t])
            elif t not in seen:
                visit(t)
        stack.pop()
        on.discard(m)

    for m in sorted(edges):
        if m != "kldiv" and m not in seen:
            visit(m)
    return found


def test_core_imports_no_backend_and_no_layer_above_it():
    graph = _graph()
    core = [m for m in graph if m.startswith("kldiv._core")]
    for m in core:
        bad = {t for t in graph[m] if not t.startswith("kldiv._core")}
        assert not bad, f"{m} imports {sorted(bad)}: the core must import nothing of kldiv above it"


def test_backends_import_no_layer_above_them():
    graph = _graph()
    allowed = ("kldiv._core", "kldiv.backends", "kldiv._ext", "kldiv.compare.kernel")
    for m in [m for m in graph if m.startswith("kldiv.backends")]:
        bad = {t for t in graph[m] if not t.startswith(allowed)}
        assert not bad, f"{m} imports {sorted(bad)}"


def test_no_import_circle_between_core_backends_and_io():
    cycles = [c for c in _cycles(_graph())
              if any(x.startswith(("kldiv._core", "kldiv.backends", "kldiv.io")) for x in c)]
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)
