"""Import layering: tasks/ knows nothing of the harness, harness.models nothing of harness.quant,
and harness.kernels nothing of the perf benchmark, the runner or the CLI, and harness.report (the
board below its writers) nothing of the runner, perf or the CLI, so none of these pairs can import
each other in a cycle again.

Read from the source with ``ast`` (function-level imports included: a lazy import is still a
dependency), not by importing, so a cycle that happens to import fine today is still caught.
"""

import ast
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


def _reaching(package: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{mod} imports {dep}" for mod, deps in _imports(package).items() for dep in sorted(deps)
            if any(dep == f or dep.startswith(f + ".") for f in forbidden)]


@pytest.mark.parametrize("package,forbidden", [
    ("tasks", ("harness", "baselines", "methods")),
    ("harness.models", ("harness.quant", "harness.runner", "harness.registry", "harness.perf",
                        "harness.kernels")),
    ("harness.quant", ("harness.perf", "harness.kernels", "harness.runner", "harness.cells",
                       "harness.worker")),
    # the kernels (what a state becomes on a GPU) sit below the perf benchmark and the harness's top
    ("harness.kernels", ("harness.perf", "harness.runner", "harness.cli", "harness.report", "harness.worker")),
    # the report sits above models and quant (it reads records and scheme names) and below the CLI
    ("harness.report", ("harness.runner", "harness.worker", "harness.executors", "harness.perf", "harness.cli")),
])
def test_lower_layer_does_not_import_upper(package, forbidden):
    assert _reaching(package, forbidden) == []


def test_the_scan_sees_relative_and_lazy_imports():
    """The checker itself: it resolves ``from ..quant.config import X`` and imports inside functions."""
    deps = _imports("harness.quant")
    assert "harness.models.layers" in deps["harness.quant.build"]  # from ..models.layers import ...
    assert "safetensors.torch" in deps["harness.quant.state"]  # imported inside a method


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


# Cycles not yet broken (remove an entry once its cycle is gone). Each edits code whose digest keys
# every cell (scoring code; the model code a state depends on), so it waits for the next
# regeneration of results/: family.py's name-based fallbacks belong in family.py, and
# stratified_indices in a module of its own below sources.py and subset.py.
KNOWN_CYCLES = [["harness.models.family", "harness.models.layers"], ["tasks.sources", "tasks.subset"]]


def test_no_import_cycles_in_the_tree():
    """Zero import cycles over harness/, baselines/, methods/ and tasks/ (lazy imports count)."""
    cycles = _cycles(_module_graph())
    assert [c for c in cycles if c not in KNOWN_CYCLES] == []
    assert [c for c in KNOWN_CYCLES if c not in cycles] == [], "a known cycle is gone: drop it from KNOWN_CYCLES"


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
