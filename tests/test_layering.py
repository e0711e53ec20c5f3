"""Import layering: tasks/ knows nothing of the harness, and harness.models nothing of
harness.quant, so neither pair can import each other in a cycle again.

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
    ("harness.models", ("harness.quant", "harness.runner", "harness.registry", "harness.perf")),
    ("harness.quant", ("harness.perf", "harness.runner", "harness.cells", "harness.worker")),
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


def test_no_import_cycles_in_the_tree():
    """Zero import cycles over harness/, baselines/, methods/ and tasks/ (lazy imports count)."""
    assert _cycles(_module_graph()) == []
