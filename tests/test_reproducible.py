"""Same inputs, same numbers on another CPU: cells under other SIMD paths and thread counts.

Runs a slice of the default suite (the bundled model, static W4A4 ranges, the baselines and the
clipping search, which picks argmins over nearly equal errors) in two fresh processes — this
machine's native kernels with one thread, and ATen's portable ``default`` kernels with oneDNN
held to SSE4.1 and two threads, i.e. what an older x86 machine would compute — and requires
every accuracy and every generated answer to be identical (docs/design.md, "Reproducible").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness.samples import read_samples

SUITE = {
    "name": "repro", "models": ["qvlm-tiny-llava"],
    # AWQ's grids shortened for time; its searches are the ones float32 made machine-dependent
    "methods": ["rtn", {"name": "rtn", "act_clip_search": True}, "gptq",
                {"name": "awq", "label": "awq", "options": {"n_grid": 8, "clip_n_grid": 8}},
                {"name": "qvlm", "label": "qvlm", "options": {"search_batches": 1, "veo_epochs": 1,
                                                              "veo_report": False, "veo_jacobian_batches": 1}}],
    "schemes": ["w4a4"], "tasks": ["synth_vqav2"], "limit": 40, "batch_size": 40,
    "calibration": {"task": "synth_scienceqa", "split": "train", "n": 16, "batch_size": 8},
    "quant": {"a_granularity": "per_tensor"}, "device": "cpu",
}


def _run(tmp: Path, name: str, env: dict, threads: int) -> dict[str, tuple]:
    suite = tmp / "suite.yaml"
    suite.write_text(yaml.safe_dump(SUITE))
    out = tmp / name
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "run", str(suite), "--output", str(out),
                           "--threads", str(threads), "-q"], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cells = {}
    for line in (out / "records.jsonl").read_text().splitlines():
        r = json.loads(line)
        gens = [s["generation"] for s in read_samples(out / r["samples_file"])]
        cells[r["variant"]] = (r["config_hash"], r["value"], gens)
    return cells


@pytest.mark.slow
def test_cells_are_identical_under_other_cpu_kernel_paths(tmp_path):
    native = _run(tmp_path, "native", {}, threads=1)
    portable = _run(tmp_path, "portable", {"ATEN_CPU_CAPABILITY": "default", "DNNL_MAX_CPU_ISA": "SSE41"},
                    threads=2)
    assert set(native) == {"rtn", "rtn+clip", "gptq", "awq", "qvlm"}
    for variant, (key, value, gens) in native.items():
        other_key, other_value, other_gens = portable[variant]
        assert other_key == key  # the same cell (the thread count is not part of its identity)
        assert other_value == value, variant
        assert other_gens == gens, variant
