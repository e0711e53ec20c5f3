"""The test set-up itself: pytest-benchmark is an extra, and the default run works with or
without it (``addopts = --benchmark-skip`` in pyproject.toml; the root conftest.py)."""

import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = Path(__file__).resolve().parents[1]


def _pytest(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_pytest_benchmark_is_not_a_runtime_dependency():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith("pytest")]
    for extra in ("test", "bench"):
        assert any(d.startswith("pytest-benchmark") for d in project["optional-dependencies"][extra])


def test_default_run_starts_without_the_plugin():
    """``-p no:benchmark`` is what a plain ``pip install -e .`` looks like to pytest: the
    ``--benchmark-skip`` in addopts must not be an unknown option, and benchmarks skip with the fix."""
    plain = _pytest("-p", "no:benchmark", "tests/test_layering.py::test_the_scan_sees_relative_and_lazy_imports")
    assert plain.returncode == 0 and "1 passed" in plain.stdout, plain.stdout + plain.stderr
    bench = _pytest("-p", "no:benchmark", "-rs", "benchmarks")
    assert bench.returncode == 0, bench.stdout + bench.stderr
    assert "needs pytest-benchmark: pip install -e '.[bench]'" in bench.stdout
    assert " passed" not in bench.stdout and "error" not in bench.stdout.lower()


def test_with_the_plugin_benchmarks_skip_by_default():
    pytest.importorskip("pytest_benchmark")
    out = _pytest("-rs", "benchmarks")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Skipping benchmark (--benchmark-skip active)" in out.stdout and " passed" not in out.stdout
