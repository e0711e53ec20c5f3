"""A suite's ``deterministic: true`` (issue 29.7): parsed, in the cell identity only when true (the
default suite keeps its keys), recorded, and in effect in every process that computes cells (the
serial runner's, a Ray worker's); an op with no deterministic implementation fails its cell with
an error naming the op. Whether two GPU runs then agree is measured on the GPU:
scripts/device_determinism.sh (docs/reliability.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from harness import cells as cells_mod
from harness import determinism
from harness.records import read_records
from harness.registry import Method, register_method
from harness.runner import run_suite
from harness.suite_config import SuiteError, load_suite, parse_suite
from toy_task import write_toy_task

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy_include(tmp_path_factory):
    return write_toy_task(tmp_path_factory.mktemp("toy"), n_test=4, n_train=8)


def suite_dict(model, include, out, **over):
    d = {"name": "toy", "models": [str(model)], "methods": ["fp16", "rtn"], "schemes": ["w4a4"],
         "tasks": ["toy_colors"], "include_paths": [str(include)],
         "calibration": {"task": "toy_colors", "n": 4}, "batch_size": 4, "output": str(out),
         "device": "cpu", "threads": 1}
    d.update(over)
    return d


@pytest.fixture
def torch_modes_restored():
    """The process-wide settings ``determinism.enable`` changes, put back after the test."""
    prev = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
            os.environ.get(determinism.CUBLAS_ENV))
    yield
    torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev[2], prev[3]
    if prev[4] is None:
        os.environ.pop(determinism.CUBLAS_ENV, None)
    else:
        os.environ[determinism.CUBLAS_ENV] = prev[4]


# ---- the suite key ----------------------------------------------------------------------------

def test_the_suite_key_and_the_command_line_flag(tiny_llava_path, toy_include, tmp_path):
    from harness.cli import build_parser

    base = suite_dict(tiny_llava_path, toy_include, tmp_path)
    assert parse_suite(base).deterministic is False
    assert parse_suite({**base, "deterministic": None}).deterministic is False
    assert parse_suite({**base, "deterministic": True}).deterministic is True
    for bad in ("yes", 1, "true"):
        with pytest.raises(SuiteError, match="`deterministic` must be true or false"):
            parse_suite({**base, "deterministic": bad})
    parser = build_parser()
    assert parser.parse_args(["run"]).deterministic is None  # the suite's own value stands
    assert parser.parse_args(["run", "--deterministic"]).deterministic is True
    assert parser.parse_args(["run", "--no-deterministic"]).deterministic is False


# ---- identity ---------------------------------------------------------------------------------

def test_the_bundled_default_suite_keeps_its_committed_cell_keys():
    """Adding the option changed no key of a suite without it: every cell the bundled default suite
    plans has the key of its committed record (results/default). If this fails after an edit of
    the engine or a method, the committed results are stale: regenerate them (docs/results.md)."""
    suite = load_suite("default")
    assert suite.deterministic is False
    planned = [c.key for c in cells_mod.plan_cells(suite, "cpu")]
    # the folder keeps superseded records (re-keyed cells run again into it; tables take the newest)
    committed = {r["config_hash"] for r in read_records(REPO / "results" / "default" / "records.jsonl")
                 if r.get("status") == "ok"}
    missing = sorted(set(planned) - committed)
    assert len(planned) == 51 and not missing, f"{len(missing)} planned cells have no committed record"


def test_deterministic_is_in_the_identity_only_when_true(tiny_llava_path, toy_include, tmp_path):
    base = suite_dict(tiny_llava_path, toy_include, tmp_path)
    absent = cells_mod.plan_cells(parse_suite(base), "cpu")
    false = cells_mod.plan_cells(parse_suite({**base, "deterministic": False}), "cpu")
    true = cells_mod.plan_cells(parse_suite({**base, "deterministic": True}), "cpu")
    assert [c.key for c in absent] == [c.key for c in false]
    assert all("deterministic" not in c.identity for c in absent)
    assert all(c.identity["deterministic"] is True for c in true)
    # every cell and every state is another one: no result computed without it is reused
    assert not {c.key for c in true} & {c.key for c in absent}
    assert not {c.state_key for c in true} & {c.state_key for c in absent}


# ---- in effect where cells are computed --------------------------------------------------------

def test_the_serial_runner_computes_under_it_and_records_say_so(tiny_llava_path, toy_include, tmp_path,
                                                                torch_modes_restored):
    torch.use_deterministic_algorithms(False)
    os.environ.pop(determinism.CUBLAS_ENV, None)
    plain = run_suite(parse_suite(suite_dict(tiny_llava_path, toy_include, tmp_path / "plain")),
                      show_progress=False)
    assert plain.failed == 0 and not torch.are_deterministic_algorithms_enabled()
    assert all("deterministic" not in r for r in read_records(tmp_path / "plain" / "records.jsonl"))

    det = run_suite(parse_suite(suite_dict(tiny_llava_path, toy_include, tmp_path / "det", deterministic=True)),
                    show_progress=False)
    assert (det.ok, det.failed) == (2, 0)
    assert determinism.in_effect()
    s = determinism.settings()
    assert s[determinism.CUBLAS_ENV] == ":4096:8" and s["cudnn_deterministic"] and not s["cudnn_benchmark"]
    recs = read_records(tmp_path / "det" / "records.jsonl")
    assert [r["deterministic"] for r in recs] == [True, True]
    # on the CPU (float64) the mode changes no number
    by = {r["method"]: r for r in read_records(tmp_path / "plain" / "records.jsonl")}
    for r in recs:
        assert (r["value"], r["n"]) == (by[r["method"]]["value"], by[r["method"]]["n"])


WORKER_PROCESS = textwrap.dedent("""
    import json, sys
    from harness.suite_config import parse_suite
    from harness.executors.ray_executor import WorkerActor
    suite = parse_suite(json.loads(sys.argv[1]))
    actor = WorkerActor(suite, "cpu", 1)  # what a Ray worker process constructs first
    print(json.dumps(actor.hello(sys.argv[2])["determinism"]))
""")


@pytest.mark.parametrize("deterministic", [True, False])
def test_a_worker_process_takes_the_settings_itself(tiny_llava_path, toy_include, tmp_path, deterministic):
    """A fresh process (as a Ray worker is) with no cuBLAS variable in its environment: the worker
    it starts sets everything before any cell runs; a suite without the option changes nothing."""
    env = {k: v for k, v in os.environ.items() if k != determinism.CUBLAS_ENV}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    d = suite_dict(tiny_llava_path, toy_include, tmp_path, deterministic=deterministic)
    out = subprocess.run([sys.executable, "-c", WORKER_PROCESS, json.dumps(d), str(tmp_path)], env=env,
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["pid"] != os.getpid()
    assert determinism.in_effect(got) is deterministic
    assert got[determinism.CUBLAS_ENV] == (":4096:8" if deterministic else None)
    assert got["use_deterministic_algorithms"] is deterministic


def test_ray_workers_start_in_deterministic_mode(tiny_llava_path, toy_include, tmp_path, torch_modes_restored):
    """The Ray executor starts its workers with the cuBLAS variable in their environment and
    refuses a worker that reports the mode off; their records say deterministic."""
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'qvlm-bench[distributed]'")
    import ray

    from harness.executors.ray_executor import RayExecutor
    from harness.runner import SuiteRunner

    suite = parse_suite(suite_dict(tiny_llava_path, toy_include, tmp_path / "out", methods=["fp16"],
                                   deterministic=True))
    if ray.is_initialized():
        ray.shutdown()
    ex = RayExecutor(suite, workers=1, retries=0, show_progress=False)
    seen = []
    real_start = ex._start_workers

    def start():
        real_start()
        seen.extend(s.info for s in ex.slots)
    ex._start_workers = start
    summary = SuiteRunner(suite, show_progress=False, executor=ex).run()
    assert (summary.ok, summary.failed) == (1, 0)
    (info,) = seen
    assert info["pid"] != os.getpid() and determinism.in_effect(info["determinism"])
    (rec,) = read_records(tmp_path / "out" / "records.jsonl")
    assert rec["deterministic"] is True and rec["executor"]["pid"] == info["pid"]


class NoDeterministicOp(Method):
    name = "test-nondeterministic-op"
    summary = "calls put_, which has no deterministic implementation"
    quantizes = False

    def quantize(self, lm, qcfg, calib):
        torch.zeros(3).put_(torch.tensor([0]), torch.tensor([1.0]))
        raise AssertionError("put_ ran although deterministic algorithms are on")


def test_an_op_without_a_deterministic_implementation_fails_its_cell_naming_it(
        tiny_llava_path, toy_include, tmp_path, isolated_registry, torch_modes_restored):
    register_method(NoDeterministicOp)
    suite = parse_suite(suite_dict(tiny_llava_path, toy_include, tmp_path, deterministic=True,
                                   methods=["test-nondeterministic-op", "fp16"]))
    summary = run_suite(suite, show_progress=False)
    assert (summary.ok, summary.failed) == (1, 1)  # the suite goes on
    (failed,) = [r for r in read_records(tmp_path / "records.jsonl") if r["status"] == "failed"]
    assert failed["error"].startswith("quantize: RuntimeError: put_ has no deterministic implementation, "
                                      "and the suite sets `deterministic: true`")
    assert failed["deterministic"] is True


def test_explain_leaves_other_errors_alone():
    assert determinism.explain(RuntimeError("CUDA out of memory")) is None
    msg = determinism.explain(RuntimeError(
        "upsample_bilinear2d_backward_out_cuda does not have a deterministic implementation, but you set "
        "'torch.use_deterministic_algorithms(True)'. You can turn off determinism just for this operation"))
    assert msg.startswith("upsample_bilinear2d_backward_out_cuda has no deterministic implementation")


def test_the_kernels_take_a_fixed_configuration_under_it(torch_modes_restored):
    from harness.kernels.triton_matmul import fixed_config

    torch.use_deterministic_algorithms(False)
    assert fixed_config(["a", "b", "c"]) == ["a", "b", "c"]
    determinism.enable()
    assert fixed_config(["a", "b", "c"]) == ["a"]
