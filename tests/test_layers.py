"""The package's import graph: no circle anywhere, and no import running back up the layers.

Every import counts, function-local ones included (a circle hidden behind a late import is still
a circle). Layers, lowest first: config, ops/kernels, model, moe, stages, parallel, training, eval.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = "megatron_evomoe"
PKG_DIR = ROOT / PKG

# (importer prefix, forbidden imported prefixes)
FORBIDDEN = [
    ("model", ("moe", "stages", "parallel", "training", "eval")),
    ("moe", ("stages", "parallel", "training", "eval")),
    ("ops", ("model", "moe", "stages", "parallel", "training", "eval")),
    ("kernels", ("model", "moe", "stages", "parallel", "training", "eval")),
    ("stages", ("parallel", "training", "eval")),
    ("parallel", ("training", "eval")),
    ("training", ("eval",)),
]


def _module_files() -> dict[str, Path]:
    """dotted module name (without the package prefix) -> file; kernels/ installs as PKG.kernels."""
    out = {}
    for base, prefix in ((PKG_DIR, ""), (ROOT / "kernels", "kernels")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join(([prefix] if prefix else []) + parts)
            out[name] = path
    return out


def _resolve(importer: str, is_pkg: bool, node: ast.AST, modules: dict) -> list[str]:
    """Modules of this package that an import statement names (most specific existing module)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = importer.split(".") if importer else []
            base = base if is_pkg else base[:-1]
            base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
            mod = ".".join(base + ([node.module] if node.module else []))
        else:
            mod = node.module or ""
            if not (mod == PKG or mod.startswith(PKG + ".")):
                return []
            mod = mod[len(PKG) + 1:]
        names = [f"{mod}.{a.name}" if mod else a.name for a in node.names] + [mod]
    found = []
    for name in names:
        if name.startswith(PKG + "."):
            name = name[len(PKG) + 1:]
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name:
            found.append(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _module_files()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                deps.update(_resolve(name, path.name == "__init__.py", node, modules))
        deps.discard(name)
        # a package's __init__ is executed by importing any of its modules: not an edge of interest
        graph[name] = {d for d in deps if not name.startswith(d + ".")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

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
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _layer(name: str) -> str:
    return name.split(".")[0]


def test_the_graph_is_real():
    graph = import_graph()
    # the walk sees the edges that are there (a broken resolver would pass every check below)
    assert "parallel.training_hooks" in graph["training.trainer"]
    assert "model.llm" in graph["moe.evolution"] or "model.llm" in graph["moe.experts"] or any(
        d.startswith("model") for m, ds in graph.items() if m.startswith("moe") for d in ds)
    assert "stages.structure" in graph["parallel.stage_structure"]


def test_no_import_circle():
    assert _cycles(import_graph()) == []


def test_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("importer,forbidden", FORBIDDEN)
def test_no_import_back_up_the_layers(importer, forbidden):
    bad = sorted(f"{m} -> {d}" for m, deps in import_graph().items() if _layer(m) == importer
                 for d in deps if _layer(d) in forbidden)
    assert bad == []


def test_no_python_file_over_500_lines():
    long = sorted(f"{p.relative_to(ROOT)}: {n}" for p in _module_files().values()
                  if (n := len(p.read_text().splitlines())) > 500)
    assert long == []


@pytest.mark.parametrize("package", ["megatron_evomoe.parallel", "megatron_evomoe.data", "megatron_evomoe.ops"])
def test_no_exported_name_is_also_a_submodule(package):
    """Importing a submodule sets the package attribute of its name: a function exported under the same name
    would then be replaced by the module (as `parallel.parallelize` was by `parallel/parallelize.py`)."""
    import importlib
    import pkgutil
    pkg = importlib.import_module(package)
    submodules = {info.name for info in pkgutil.iter_modules(pkg.__path__)}
    exported = set(getattr(pkg, "__all__", ()))
    assert exported, package
    assert exported & submodules == set()
