"""Import layering over the whole tree (harness/, baselines/, methods/, tasks/): each layer's
modules and the layers they may import, declared once in ``LAYERS`` (bottom to top), and zero
import cycles.

Read from the source with ``ast`` (function-level imports included: a lazy import is still a
dependency; so are ``TYPE_CHECKING`` imports), not by importing, so an import that happens to
work today is still caught.
"""

import ast
import functools
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _imports(package: str) -> dict[str, set[str]]:
    """``{module: modules it imports}`` for every module under ``package`` (relative resolved)."""
    out = {}
    for f in sorted((REPO / package.replace(".", "/")).rglob("*.py")):
        parts = list(f.relative_to(REPO).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        here = ".".join(parts)
        deps = set()
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = parts if is_pkg else parts[:-1]
                    base = base[:len(base) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module
                deps.add(module)
                deps.update(f"{module}.{a.name}" for a in node.names)  # `from pkg import module`
        out[here] = deps
    return out


def test_the_scan_sees_relative_and_lazy_imports():
    """The checker itself: it resolves ``from ..quant.config import X`` and imports inside functions."""
    deps = _imports("harness.quant")
    assert "harness.models.layers" in deps["harness.quant.build"]  # from ..models.layers import ...
    assert "safetensors.torch" in deps["harness.quant.state"]  # imported inside a method


@functools.lru_cache(maxsize=1)
def _module_graph() -> dict[str, set[str]]:
    """Module → project modules it imports, over every source package (``from pkg import mod``
    resolved to the module where ``mod`` is one)."""
    graph: dict[str, set[str]] = {}
    for package in ("harness", "baselines", "methods", "tasks"):
        graph.update(_imports(package))
    modules = set(graph)
    out = {}
    for mod, deps in graph.items():
        resolved = set()
        for dep in deps:
            # `from a.b import c` is recorded as a.b and a.b.c: the longest that is a module counts
            while dep and dep not in modules:
                dep = dep.rpartition(".")[0]
            if dep and dep != mod and not mod.startswith(dep + ".") and dep not in (
                    "harness", "baselines", "methods", "tasks"):
                resolved.add(dep)
        out[mod] = resolved
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

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
                comps.append(sorted(comp))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


# The layers, bottom to top: ``name: (its modules, the layers it may import)``. A module is in the
# layer of its longest matching prefix; every module of the tree is in one; a layer imports only
# layers declared before it (so the table itself has no cycle). Within a layer any import goes,
# the cycle test below keeps it acyclic.
LAYERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # lm-eval tasks, scoring and rows: nothing of the harness
    "tasks": (("tasks",), ()),
    # loading, family adapters, layer lists, parts, capture; the model-side chat prompt
    "models": (("harness.models", "harness.prompting"), ()),
    # the method SDK: QuantConfig, quantizers, states, the simulated model, the block-wise loop
    "quant": (("harness.quant",), ("models",)),
    # what a state becomes on a GPU (real, select, fused, triton, gemlite, packing, online)
    "kernels": (("harness.kernels",), ("models", "quant")),
    # what a method is given: the registry (``Method``, the reference flag) and the calibration set
    "method API": (("harness.registry", "harness.calibration"), ("models", "quant")),
    # the methods: never the engine above the method API, the runner, the report or perf
    "methods": (("baselines", "methods"), ("models", "quant", "method API")),
    # the engine's modules: suites, cell identity, preparing a state, evaluation, records, the
    # deterministic mode a suite may ask for
    "engine": (("harness.suite_config", "harness.cells", "harness.prepare", "harness.evaluate",
                "harness.task_data", "harness.records", "harness.records_compact", "harness.resultsdir",
                "harness.samples",
                "harness.determinism"),
               ("tasks", "models", "quant", "method API")),
    # the board and its writers, contrasts, intervals: never the worker, the runner, perf or the CLI
    "report": (("harness.report",), ("quant", "method API", "engine")),
    # executing a group of cells: load, calibrate, quantize, evaluate, record
    "worker": (("harness.worker", "harness.sharding"), ("tasks", "models", "quant", "method API", "engine")),
    # the real-kernel benchmark: shares the engine's identity, records and registry
    "perf": (("harness.perf",), ("tasks", "models", "quant", "kernels", "method API", "engine", "report")),
    # planning a suite and handing its groups to workers, serially or on Ray
    "runner": (("harness.runner", "harness.executors"),
               ("tasks", "models", "quant", "method API", "engine", "report", "worker")),
    # the `qvlm-bench` commands: everything
    "cli": (("harness.cli",), ("tasks", "models", "quant", "kernels", "method API", "methods", "engine",
                               "report", "worker", "perf", "runner")),
}
# Declared packages that do not exist yet (a branch that creates them); any other prefix in
# LAYERS must name a module that exists.
PLANNED: tuple[str, ...] = ()
ROOTS = ("harness",)  # a bare package __init__ in no layer; it imports nothing of the project


def _layer_of(module: str) -> str | None:
    best = max(((len(p), name) for name, (prefixes, _) in LAYERS.items() for p in prefixes
                if module == p or module.startswith(p + ".")), default=None)
    return best[1] if best else None


def test_the_layer_table_is_ordered_and_names_what_exists():
    """Each layer imports only layers below it, and every prefix names a module that exists
    (or a package still PLANNED)."""
    names = list(LAYERS)
    for i, (name, (_, allowed)) in enumerate(LAYERS.items()):
        above = [a for a in allowed if a not in names[:i]]
        assert above == [], f"layer {name!r} may import {above}, which are not below it in LAYERS"
    modules = set(_module_graph())
    stale = [p for prefixes, _ in LAYERS.values() for p in prefixes if p not in PLANNED
             and not any(m == p or m.startswith(p + ".") for m in modules)]
    assert stale == [], f"LAYERS names {stale}, which do not exist (moved? drop or rename them)"


def test_layer_of_takes_the_longest_prefix():
    assert _layer_of("harness.prompting") == "models"
    assert _layer_of("harness.models.family") == "models"
    assert _layer_of("harness.perf.engine") == "perf"
    assert _layer_of("harness.kernels.real") == "kernels"
    assert _layer_of("harness.report.board") == "report"
    assert _layer_of("methods.qvlm.search") == "methods"
    assert _layer_of("harness.executors.ray_executor") == "runner"
    assert _layer_of("harness.cellsx") is None and _layer_of("harness") is None


def test_every_module_is_in_a_layer():
    orphans = [m for m in _module_graph() if _layer_of(m) is None and m not in ROOTS]
    assert orphans == [], f"{orphans} are in no layer: add them to LAYERS in tests/test_layering.py"
    graph = _module_graph()
    assert all(graph[r] == set() for r in ROOTS if r in graph)


@pytest.mark.parametrize("layer", list(LAYERS))
def test_a_layer_imports_only_the_layers_it_declares(layer):
    graph = _module_graph()
    allowed = set(LAYERS[layer][1]) | {layer}
    bad = [f"{mod} imports {dep} (layer {_layer_of(dep)!r})" for mod, deps in sorted(graph.items())
           if _layer_of(mod) == layer for dep in sorted(deps) if _layer_of(dep) not in allowed]
    assert bad == [], f"layer {layer!r} may import only {sorted(allowed)}"


def test_no_import_cycles_in_the_tree():
    """Zero import cycles over harness/, baselines/, methods/ and tasks/ (lazy imports count)."""
    assert _cycles(_module_graph()) == []


def _report_modules(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    return {m: deps for m, deps in graph.items() if m == "harness.report" or m.startswith("harness.report.")}


def test_the_report_has_no_import_cycle_and_the_board_is_below_its_writers():
    graph = _report_modules(_module_graph())
    assert "harness.report.board" in graph["harness.report.write"]  # the scan sees the package
    assert _cycles(graph) == []
    writers = {f"harness.report.{m}" for m in ("text", "page", "plots", "contrasts", "write")}
    below = {"harness.report.board", "harness.report.rows", "harness.report.scores", "harness.report.stats",
             "harness.report.aggregate"}
    assert [f"{m} imports {d}" for m in below for d in sorted(graph[m] & writers)] == []


def test_the_report_imports_project_code_at_the_top_of_its_modules():
    """No project import inside a function in harness/report (a lazy import hides a cycle from a
    reader; third-party ones, such as matplotlib, may load on demand)."""
    lazy = []
    for f in sorted((REPO / "harness" / "report").rglob("*.py")):
        tree = ast.parse(f.read_text(), str(f))
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if getattr(node, "level", 0) or any(n.split(".")[0] in ("harness", "baselines", "methods", "tasks")
                                                     for n in names):
                    lazy.append(f"{f.relative_to(REPO)}:{node.lineno}")
    assert lazy == []
