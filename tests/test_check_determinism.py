"""scripts/check_determinism.py (the driver of scripts/device_determinism.sh): its comparison on
hand-made records, and (slow) the whole device script in its CPU dry mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import check_determinism as cd  # noqa: E402

sys.path.remove(str(REPO / "scripts"))


def cell(value=50.0, answers=("red", "blue", "red", "no"), deps=(0.75, 0.97, 1.65), status="ok", **meta):
    rec = {"status": status, "value": value, "stderr": 25.0, "n": len(answers), "n_empty": 0, "n_unparsed": 0,
           "method_meta": {"dependencies": list(deps), "partition": [[0], [1, 2]], "h0": 0.9,
                           "search_cost_s": {"total": 12.5}, "veo": {"memory": {"free_gib": 70.1}, "steps": 4},
                           **meta},
           "error": None if status == "ok" else "quantize: RuntimeError: boom"}
    samples = {i: {"doc_id": i, "generation": a, "score": float(a == "red")} for i, a in enumerate(answers)}
    return {"record": rec, "samples": samples}


def test_identical_cells_are_identical_though_timings_and_memory_differ():
    a = cell()
    b = cell()
    b["record"]["method_meta"]["search_cost_s"] = {"total": 99.0}  # timings: never compared
    b["record"]["method_meta"]["veo"]["memory"] = {"free_gib": 12.0}
    row = cd.compare_cells(a, b)
    assert row["identical"] and row["answers_differ"] == 0 and row["meta_differ"] == 0 and row["n"] == 4


def test_answers_accuracy_and_dependency_scores_that_differ_are_counted():
    a = cell()
    b = cell(value=25.0, answers=("red", "blue", "blue", "yes"), deps=(0.75, 0.9701, 1.65))
    row = cd.compare_cells(a, b)
    assert not row["identical"]
    assert (row["answers_differ"], row["scores_differ"]) == (2, 1)
    assert row["record_differ"] == ["value"]
    assert row["meta_differ"] == 1 and row["meta_examples"] == ["dependencies[1]"]
    assert row["dependencies_max_abs"] == pytest.approx(1e-4)


def test_a_failed_or_missing_cell_is_never_identical_and_says_why():
    failed = cd.compare_cells(cell(), cell(status="failed", value=None))
    assert not failed["identical"] and failed["error"] == "quantize: RuntimeError: boom"
    runs = cd.compare_runs({("fp16", "w16a16", "t"): cell(), ("qvlm", "w4a4", "t"): cell()},
                           {("fp16", "w16a16", "t"): cell()})
    assert runs[("qvlm", "w4a4", "t")] == {"missing": "second", "identical": False}
    assert runs[("fp16", "w16a16", "t")]["identical"]
    text = cd.table({("false-1", "false-2"): runs},
                    [{"label": "false-1", "deterministic": False, "rc": 0, "wall_s": 40.0, "quantize_s": 10.0,
                      "eval_s": 2.0},
                     {"label": "true-1", "deterministic": True, "rc": 0, "wall_s": 50.0},
                     {"label": "false-2", "deterministic": False, "rc": 0, "wall_s": 45.0}])
    assert "| false-1 vs false-2 | fp16 / w16a16 / t | 50.00 / 50.00 | 0 of 4 | 0 | 0 | 0 | identical |" in text
    assert "missing in the second run" in text
    assert "cost: deterministic runs 50.0 s vs 42.5 s on average (1.18x" in text
    # the first run pays for cold caches: the second line compares the warm runs only
    assert "cost, the first run left out (it fills the machine's caches): deterministic runs 50.0 s vs 45.0 s" in text


def test_load_run_reads_records_and_samples_files(tmp_path):
    from harness.records import append_record, new_record
    from harness.samples import samples_path, write_samples

    rows = [{"doc_id": i, "prompt": f"q{i}", "generation": g, "score": 1.0} for i, g in enumerate(("a", "b"))]
    path = write_samples(samples_path(tmp_path, "k1", "t"), rows, "t")
    append_record(tmp_path / "records.jsonl", new_record(
        variant="fp16 (reference)", scheme="w16a16", task="t", status="ok", value=100.0,
        samples_file=str(path.relative_to(tmp_path)), method_meta={}))
    run = cd.load_run(tmp_path)
    (key,) = run
    assert key == ("fp16 (reference)", "w16a16", "t")
    assert [run[key]["samples"][i]["generation"] for i in (0, 1)] == ["a", "b"]
    assert cd.compare_runs(run, cd.load_run(tmp_path))[key]["identical"]


@pytest.mark.slow  # four `qvlm-bench run` processes on the CPU: ~2 minutes on 2 cores
def test_the_device_script_in_its_dry_mode(tmp_path):
    env = {**os.environ, "DRY": "1", "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(["bash", "scripts/device_determinism.sh"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["determinism.json", "determinism.md", "runs.tgz",
                                                          "versions.txt"]
    summary = json.loads((tmp_path / "determinism.json").read_text())
    assert [r["rc"] for r in summary["runs"]] == [0, 0, 0, 0]
    for pair in ("false-1 vs false-2", "true-1 vs true-2"):  # the CPU in float64 is deterministic anyway
        assert all(row["identical"] for row in summary["pairs"][pair].values())
        assert len(summary["pairs"][pair]) == 2  # the reference and Q-VLM
    with tarfile.open(tmp_path / "runs.tgz") as tar:
        names = tar.getnames()
    assert "runs/true-2/records.jsonl" in names and not any("/cache/" in n for n in names)
    recs = [json.loads(line) for line in tar_text(tmp_path / "runs.tgz", "runs/true-2/records.jsonl").splitlines()]
    assert all(r["deterministic"] is True for r in recs)


def tar_text(path: Path, member: str) -> str:
    with tarfile.open(path) as tar:
        return tar.extractfile(member).read().decode()
