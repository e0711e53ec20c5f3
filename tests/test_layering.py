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
                    deps.add(".".join(base + ([node.module] if node.module else [])))
                else:
                    deps.add(node.module)
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
