"""`qvlm-bench run --executor ...`: flags checked before anything starts, and a clear message when
Ray is not installed (these tests need no Ray)."""

from __future__ import annotations

import sys

import pytest

from harness.cli import main


def test_ray_flags_without_the_ray_executor_are_refused(capsys):
    assert main(["run", "--workers", "2", "--limit", "1"]) == 2
    assert "--workers only apply to --executor ray" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--device", "cuda:1"], "device 'cuda:1' pins one GPU; with --executor ray every worker gets its own GPU"),
    (["--workers", "0"], "--workers must be at least 1, got 0"),
    (["--shard-size", "-1"], "--shard-size must not be negative"),
])
def test_bad_ray_options_name_the_fix(flags, message, capsys):
    assert main(["run", "--executor", "ray", "--limit", "1", *flags]) == 2
    assert message in capsys.readouterr().err


def test_missing_ray_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert main(["run", "--executor", "ray", "--limit", "1"]) == 2
    assert "pip install 'qvlm-bench[distributed]'" in capsys.readouterr().err
