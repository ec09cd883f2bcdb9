"""The package's import graph: no cycle, and layers that hold.

Read from the source with ``ast`` (nothing is imported), every import: those inside functions too. Layers, low to high, following the data
flow: ``core`` and the ``registry`` leaf; ``config`` (the param, parsed and validated: every component's
``parse`` may read it); ``data`` and ``nn`` (independent of each other);
``evaluation`` (post-processing, matching, metrics, plots); ``backend``; ``training``;
``inference`` (trained models on frames and stacks); the CLI modules at the top. A module may import
its own subpackage and lower layers only, at module level or inside a function. Only
``backend/decode.py`` imports ``decode``.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "decode_var"
CLI = ("train", "eval_cli", "fit", "quickstart", "render_cli", "calibration_cli", "init_cli", "run_cli")
#: "" is the package's own namespace (``__version__``, the ``register_with_decode`` facade)
RANK = {"core": 0, "registry": 0.5, "config": 0.75, "data": 1, "nn": 1, "evaluation": 2, "backend": 3,
        "training": 4, "inference": 5, "cli": 6, "": 7}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def resolve(name: str) -> str:
    """The decode_var module an imported name lives in (a name of a package's namespace: the package)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def imports(path: Path, top_level_only: bool, name: str = ""):
    """(imported module, line) of every import of ``decode_var`` and ``decode`` in a file (of module ``name``,
    default: from its path)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # module level, also inside if / try blocks there
        nodes = [n for stmt in tree.body for n in ast.walk(stmt)
                 if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    name = name or module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                yield f"{base}.{alias.name}" if base.startswith("decode_var") else base, node.lineno


def edges(top_level_only: bool):
    for mod, path in MODULES.items():
        for target, line in imports(path, top_level_only):
            if target == "decode_var" or target.startswith("decode_var."):
                yield mod, resolve(target), line
            elif target == "decode" or target.startswith("decode."):
                yield mod, "decode", line


def layer(mod: str) -> str:
    name = mod.split(".")[1] if "." in mod else ""
    return "cli" if name in CLI else name


def test_the_graph_is_read():
    found = {(a, b) for a, b, _ in edges(False)}
    assert ("decode_var.training.trainer", "decode_var.training.tasks") in found
    assert ("decode_var.backend.decode", "decode") in found
    assert all(layer(m) in RANK for m in MODULES), sorted(m for m in MODULES if layer(m) not in RANK)


def import_cycles(modules: dict) -> list:
    """Every cycle found by a depth-first walk of the imports of ``modules`` (name -> path), module level
    and inside functions alike: a function-level import is still an edge of the real graph."""
    graph = {m: set() for m in modules}
    for mod, path in modules.items():
        for target, _ in imports(path, top_level_only=False, name=mod):
            b = resolve(target) if target.startswith("decode_var") else None
            if b in modules and b != mod:
                graph[mod].add(b)
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    return cycles


def test_no_import_cycle():
    """No cycle among all imports, those inside functions included (a lazy import hides a cycle, not removes it)."""
    assert import_cycles(MODULES) == []


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    """spline_psf imports accumulate at module level; an import of spline_psf inside a function of
    accumulate closes a cycle that a reader of module-level imports alone would miss."""
    name = "decode_var.data.accumulate"
    injected = tmp_path / "accumulate.py"
    injected.write_text(MODULES[name].read_text() + "\n\ndef _lazy():\n    from decode_var.data.spline_psf import SplinePSF\n")
    cycles = import_cycles(dict(MODULES, **{name: injected}))
    assert any(set(c) == {name, "decode_var.data.spline_psf"} for c in cycles), cycles


@pytest.mark.parametrize("top_level_only", [False])
def test_layers_hold(top_level_only):
    bad = []
    for a, b, line in edges(top_level_only):
        if b == "decode":
            continue
        la, lb = layer(a), layer(b)
        if la == lb or lb == "":  # anyone may read the package's namespace (its version)
            continue
        if RANK[lb] >= RANK[la]:
            bad.append(f"{a} (line {line}) imports {b}: layer {la or 'decode_var'} may not import {lb}")
    assert bad == []


def test_core_and_registry_import_nothing_of_ours_above_core():
    bad = [f"{a} imports {b}" for a, b, _ in edges(False)
           if layer(a) in ("core", "registry") and b != "decode" and layer(b) not in ("core", "")]
    assert bad == []


def test_data_and_nn_never_import_training():
    bad = [f"{a} imports {b}" for a, b, _ in edges(False) if layer(a) in ("data", "nn") and layer(b) == "training"]
    assert bad == []


def test_only_the_bridge_imports_decode():
    users = sorted({a for a, b, _ in edges(False) if b == "decode"})
    assert users == ["decode_var.backend.decode"]


def test_no_function_is_longer_than_60_lines():
    """A function a reader can hold in view (issue 23): split longer ones into named steps."""
    long = []
    for mod, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 60:
                    long.append(f"{mod}.{node.name}: {n} lines")
    assert long == []
