"""The Ray executor on a local Ray instance with CPU workers: dispatch to several workers, sharded
cells, a worker killed mid-cell, resume — each compared with the serial runner's records."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'qvlm-bench[distributed]' "
                                        "(scripts/setup.sh installs it)")

from harness.cli import main  # noqa: E402
from harness.suite_config import parse_suite  # noqa: E402
from harness.executors.ray_executor import RayExecutor  # noqa: E402
from harness.records import read_records  # noqa: E402
from harness.runner import SuiteRunner, run_suite  # noqa: E402
from toy_task import write_toy_task  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCORE_KEYS = ("value", "stderr", "n", "n_empty", "n_unparsed", "status")


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance for the module (starting one takes seconds); the executors join it."""
    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TOKENIZERS_PARALLELISM")
           if k in os.environ}
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, logging_level=logging.WARNING,
             runtime_env={"env_vars": {**env, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def toy_include(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    write_toy_task(folder, "toy_colors", n_test=13)
    write_toy_task(folder, "toy_small", n_test=5)
    write_toy_task(folder, "toy_long", n_test=96)
    return folder


def suite_dict(model, include, out, **over):
    d = {"name": "toy", "models": [str(model)], "methods": ["fp16", "rtn"], "schemes": ["w4a4", "w8a8"],
         "tasks": [{"name": "toy_colors", "shards": 3}, "toy_small"], "include_paths": [str(include)],
         "calibration": {"task": "toy_colors", "n": 8}, "batch_size": 4, "output": str(out),
         "device": "cpu", "threads": 1}
    d.update(over)
    return d


def ok_by_hash(out: Path) -> dict[str, dict]:
    recs = [r for r in read_records(out / "records.jsonl") if r["status"] == "ok"]
    by_hash = {r["config_hash"]: r for r in recs}
    assert len(by_hash) == len(recs), "a cell was recorded ok twice"
    return by_hash


def assert_same_results(out: Path, ref: Path) -> None:
    """Same cells, same numbers, same per-sample files (generations included) as the reference."""
    got, want = ok_by_hash(out), ok_by_hash(ref)
    assert set(got) == set(want)
    for key, r in want.items():
        assert {k: got[key][k] for k in SCORE_KEYS} == {k: r[k] for k in SCORE_KEYS}, r["task"]
        assert (out / got[key]["samples_file"]).read_bytes() == (ref / r["samples_file"]).read_bytes()


@pytest.fixture(scope="module")
def serial_runs(tiny_llava_path, toy_include, tmp_path_factory):
    """The serial runner's results for the suites below: the reference."""
    root = tmp_path_factory.mktemp("serial")
    for name, over in (("main", {}), ("kill", KILL_SUITE)):
        summary = run_suite(parse_suite(suite_dict(tiny_llava_path, toy_include, root / name, **over)),
                            show_progress=False)
        assert summary.failed == 0
    return root


# 96 questions one at a time: a cell takes seconds, so the kill lands inside one on any machine
KILL_SUITE = {"methods": ["fp16", "rtn"], "schemes": ["w4a4", "w6a6", "w8a8"], "tasks": ["toy_long"],
              "calibration": {"task": "toy_long", "n": 8}, "batch_size": 1}


def test_two_workers_match_the_serial_run_then_resume_skips_everything(
        ray_local, serial_runs, tiny_llava_path, toy_include, tmp_path, capsys):
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite_dict(tiny_llava_path, toy_include, tmp_path / "out")))
    assert main(["run", str(path), "--executor", "ray", "--workers", "2", "-q"]) == 0
    out = tmp_path / "out"
    assert_same_results(out, serial_runs / "main")
    recs = read_records(out / "records.jsonl")
    assert len(recs) == 6  # 3 groups × 2 tasks, nothing failed or duplicated
    assert {r["executor"]["worker"] for r in recs} == {0, 1}  # both workers got groups
    for r in recs:
        if r["task"] == "toy_colors":  # 13 questions in 3 batch-aligned shards, merged once
            assert [s["docs"] for s in r["shards"]] == [[0, 4], [4, 8], [8, 13]]
        else:
            assert "shards" not in r
    capsys.readouterr()
    assert main(["run", str(path), "--executor", "ray", "--workers", "2", "-q"]) == 0
    assert "toy: 0 ok, 0 failed, 6 already done" in capsys.readouterr().out
    assert read_records(out / "records.jsonl") == recs


def kill_once_mid_cell(executor: RayExecutor, killed: list, timeout: float = 600) -> threading.Thread:
    """SIGKILL the process of the first worker seen evaluating a cell (for at least 0.1 s)."""
    def watch():
        deadline = time.time() + timeout
        while time.time() < deadline:
            for slot in list(executor.slots):
                job = slot.job
                if job is not None and job.kind == "cell" and time.time() - slot.since > 0.1:
                    os.kill(slot.info["pid"], signal.SIGKILL)
                    killed.append(job.run.group.cells[job.cell].key)
                    return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_worker_killed_mid_cell_loses_nothing_and_duplicates_nothing(
        ray_local, serial_runs, tiny_llava_path, toy_include, tmp_path, caplog):
    suite = parse_suite(suite_dict(tiny_llava_path, toy_include, tmp_path / "out", **KILL_SUITE))
    records = tmp_path / "out" / "records.jsonl"

    # without retries the killed cell is recorded failed (never half-written), the rest go on
    killed: list = []
    ex = RayExecutor(suite, workers=2, retries=0, show_progress=False)
    watcher = kill_once_mid_cell(ex, killed)
    first = SuiteRunner(suite, show_progress=False, executor=ex).run()
    watcher.join(1)
    assert len(killed) == 1
    assert (first.ok, first.failed) == (3, 1)
    (failed,) = [r for r in read_records(records) if r["status"] != "ok"]
    assert failed["error"].startswith("worker died") and failed["value"] is None
    assert failed["config_hash"] == killed[0]  # the cell that was running, and only it

    # the next run recomputes that cell only; killed again mid-cell, Ray restarts the worker and
    # the driver resubmits the cell (one retry)
    killed.clear()
    caplog.set_level(logging.WARNING, logger="qvlm_bench")
    ex = RayExecutor(suite, workers=2, retries=1, show_progress=False)
    watcher = kill_once_mid_cell(ex, killed)
    second = SuiteRunner(suite, show_progress=False, executor=ex).run()
    watcher.join(1)
    assert len(killed) == 1 and "retrying (1/1)" in caplog.text
    assert (second.ok, second.failed, second.skipped) == (1, 0, 3)
    assert_same_results(tmp_path / "out", serial_runs / "kill")
    assert len(read_records(records)) == 5  # 4 ok + the one failed attempt, each line once
