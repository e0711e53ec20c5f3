"""The suite runner end to end on the tiny model and a toy task: records, resume, failures, plug-ins."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from harness.cli import main
from harness.suite_config import SuiteError, load_suite, parse_suite
from harness.records import read_records
from harness.registry import Method, available_methods, discover, register_method
from harness.runner import run_suite
from harness.samples import read_samples
from toy_task import write_toy_task

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy_include(tmp_path_factory):
    return write_toy_task(tmp_path_factory.mktemp("toy"))


def suite_dict(model, include, out, **over):
    d = {"name": "toy", "models": [str(model)], "methods": ["fp16", "rtn"],
         "schemes": ["w4a4", "w8a8"], "tasks": ["toy_colors"], "include_paths": [str(include)],
         "calibration": {"task": "toy_colors", "n": 8}, "batch_size": 4, "output": str(out),
         "device": "cpu"}
    d.update(over)
    return d


def test_suite_runs_writes_records_and_leaderboard_then_resumes(tiny_llava_path, toy_include, tmp_path):
    suite = parse_suite(suite_dict(tiny_llava_path, toy_include, tmp_path))
    first = run_suite(suite, show_progress=False)
    assert (first.ok, first.failed) == (3, 0)  # fp16 once + rtn × 2 schemes
    recs = read_records(tmp_path / "records.jsonl")
    assert {(r["method"], r["scheme"]) for r in recs} == {("fp16", "w16a16"), ("rtn", "w4a4"), ("rtn", "w8a8")}
    for r in recs:
        assert r["status"] == "ok" and r["n"] == 12 and 0 <= r["value"] <= 100
        assert r["quant_config"]["scheme"] == r["scheme"]
        assert (tmp_path / r["samples_file"]).exists()
    w4 = next(r for r in recs if r["scheme"] == "w4a4")
    assert w4["proof"]["quantized_linears"] == 14 and w4["proof"]["max_codes_per_row"] <= 16
    assert w4["proof"]["act_quantizers_fired"] == 14
    sample = read_samples(tmp_path / w4["samples_file"])[0]
    assert {"prompt", "generation"} <= set(sample)
    # second run: nothing new is computed or recorded
    again = run_suite(suite, show_progress=False)
    assert (again.ok, again.failed, again.skipped) == (0, 0, 3)
    assert len(read_records(tmp_path / "records.jsonl")) == 3
    assert main(["table", str(tmp_path)]) == 0
    md = (tmp_path / "leaderboard.md").read_text()
    assert "| rtn" in md and "Δ ref" in md
    assert "\\toprule" in (tmp_path / "leaderboard.tex").read_text()
    assert "<table" in (tmp_path / "leaderboard.html").read_text()
    csv = (tmp_path / "leaderboard.csv").read_text()
    assert "toy_colors stderr" in csv and "toy_colors n" in csv


class Exploding(Method):
    name = "test-exploding"
    summary = "raises during quantization"

    def quantize(self, lm, qcfg, calib):
        raise RuntimeError("boom at " + qcfg.scheme)


def test_failing_cell_is_recorded_and_suite_goes_on(tiny_llava_path, toy_include, tmp_path, isolated_registry):
    register_method(Exploding)
    suite = parse_suite(suite_dict(tiny_llava_path, toy_include, tmp_path,
                                   methods=["test-exploding", "rtn"], schemes=["w4a4"]))
    summary = run_suite(suite, show_progress=False)
    assert (summary.ok, summary.failed) == (1, 1)
    failed = [r for r in read_records(tmp_path / "records.jsonl") if r["status"] == "failed"]
    assert failed[0]["method"] == "test-exploding" and "boom at w4a4" in failed[0]["error"]
    # a re-run retries the failed cell only
    assert run_suite(suite, show_progress=False).skipped == 1


def test_failed_cells_print_their_error_on_the_console(tiny_llava_path, toy_include, tmp_path, capsys,
                                                       isolated_registry):
    register_method(Exploding)
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite_dict(tiny_llava_path, toy_include, tmp_path / "out",
                                              methods=["test-exploding", "rtn"], schemes=["w4a4"])))
    assert main(["run", str(path), "-q"]) == 1
    err = capsys.readouterr().err
    assert "1 cell(s) failed" in err
    assert "test-exploding / w4a4 / toy_colors: quantize: RuntimeError: boom at w4a4" in err


def test_a_broken_method_module_is_listed_and_the_rest_still_work(tmp_path, monkeypatch, capsys,
                                                                 isolated_registry):
    registry = isolated_registry
    pkg = tmp_path / "plugins"
    (pkg / "pluginpkg").mkdir(parents=True)
    (pkg / "pluginpkg" / "__init__.py").write_text("")
    (pkg / "pluginpkg" / "good.py").write_text(textwrap.dedent('''
        from harness.registry import Method, register_method
        from harness.quant.build import rtn_state

        @register_method
        class Good(Method):
            name = "plugin-good"
            summary = "works"

            def quantize(self, lm, qcfg, calib):
                return rtn_state(lm.model, qcfg, self.name)
    '''))
    (pkg / "pluginpkg" / "broken.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.setattr(registry, "IN_TREE_PACKAGES", registry.IN_TREE_PACKAGES + ("pluginpkg",))
    registry.discover(refresh=True)
    assert "plugin-good" in registry.available_methods() and "rtn" in registry.available_methods()
    assert "No module named 'no_such_dependency_xyz'" in registry.broken_methods()["pluginpkg.broken"]
    assert main(["list", "methods"]) == 0
    out = capsys.readouterr().out
    assert "plugin-good" in out and "pluginpkg.broken: ModuleNotFoundError" in out
    with pytest.raises(registry.UnknownMethodError, match="failed to import: pluginpkg.broken"):
        registry.get_method("plugin-broken")


def test_method_from_an_entry_point_runs_in_a_suite(tiny_llava_path, toy_include, tmp_path, monkeypatch,
                                                     isolated_registry):
    pkg = tmp_path / "site"
    (pkg / "extmethod").mkdir(parents=True)
    (pkg / "extmethod" / "__init__.py").write_text(textwrap.dedent('''
        from harness.registry import Method
        from harness.quant.build import rtn_state

        class HalfClip(Method):
            name = "ext-halfclip"
            summary = "RTN with weight ranges clipped to 90% (plug-in test)"

            def quantize(self, lm, qcfg, calib):
                from dataclasses import replace
                return rtn_state(lm.model, replace(qcfg, w_clip=0.9), self.name)
    '''))
    dist = pkg / "extmethod-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: extmethod\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[qvlm_bench.methods]\nhalfclip = extmethod:HalfClip\n")
    monkeypatch.syspath_prepend(str(pkg))
    discover(refresh=True)
    assert "ext-halfclip" in available_methods()
    suite = parse_suite(suite_dict(tiny_llava_path, toy_include, tmp_path / "out",
                                   methods=["ext-halfclip"], schemes=["w4a16"]))
    summary = run_suite(suite, show_progress=False)
    assert summary.ok == 1 and summary.records[0]["quant_config"]["w_clip"] == 1.0
    assert summary.records[0]["proof"]["max_codes_per_row"] <= 16


def test_unknown_method_exits_nonzero_listing_valid_ones(capsys):
    assert main(["run", "--methods", "fp16,nope", "--limit", "1"]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'nope'" in err and "rtn" in err and "fp16" in err


@pytest.mark.parametrize("mutation, message", [
    ({"methodz": ["rtn"]}, "unknown suite key(s) ['methodz']"),
    ({"schemes": ["w4a5x"]}, "in `schemes`"),
    ({"tasks": ["nope_task"]}, "unknown task 'nope_task' in `tasks`"),
    ({"calibration": {"size": 3}}, "unknown key(s) ['size'] in `calibration`"),
    ({"limit": -1}, "`limit` must be a non-negative integer"),
    ({"device": "tpu"}, "`device` is 'tpu'"),
    ({"methods": [{"name": "rtn", "options": {"alpha": 1}}]}, "has no option(s) ['alpha']"),
    ({"method_options": {"gptqq": {"percdamp": 0.1}}}, "unknown method(s) ['gptqq'] in `method_options`"),
    ({"method_options": {"rtn": {"alpha": 1}}}, "has no option(s) ['alpha']"),
])
def test_malformed_suite_points_at_the_key(tiny_llava_path, toy_include, tmp_path, mutation, message):
    data = suite_dict(tiny_llava_path, toy_include, tmp_path, **mutation)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SuiteError) as exc:
        load_suite(path)
    assert message in str(exc.value) and str(path) in str(exc.value)


def test_killed_run_resumes_without_losing_records(tiny_llava_path, toy_include, tmp_path):
    data = suite_dict(tiny_llava_path, toy_include, tmp_path / "out", methods=["fp16", "rtn"],
                      schemes=["w4a4", "w6a6", "w8a8"])
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(data))
    records = tmp_path / "out" / "records.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "run", str(path), "-q"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(read_records(records)) < 1:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = read_records(records)
    assert 1 <= len(done_before) < 4, "the kill should land mid-suite"
    summary = run_suite(load_suite(path), show_progress=False)
    assert summary.skipped == len(done_before) and summary.ok == 4 - len(done_before)
    final = read_records(records)
    assert len(final) == 4 and final[: len(done_before)] == done_before


def test_list_shows_methods_tasks_schemes_and_models(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("fp16", "rtn", "scienceqa_img", "vizwiz_vqa_val", "vqav2_val", "w4a4", "w_group_size"):
        assert name in out
    assert main(["list", "methods"]) == 0
    assert "scienceqa_img" not in capsys.readouterr().out


def test_help_on_each_command(capsys):
    for cmd in (["--help"], ["run", "--help"], ["table", "--help"], ["list", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(cmd)
        assert exc.value.code == 0
    assert "--methods" in capsys.readouterr().out


def test_method_options_apply_where_the_method_runs(tiny_llava_path, toy_include, tmp_path):
    suite = parse_suite(suite_dict(tiny_llava_path, toy_include, tmp_path, methods=["fp16", "gptq"],
                                   method_options={"gptq": {"percdamp": 0.05}, "awq": {"n_grid": 5}}))
    assert {m.name: m.options for m in suite.methods} == {"fp16": {}, "gptq": {"percdamp": 0.05}}


def test_static_activation_ranges_get_calibration_for_any_method(tiny_llava_path, toy_include, tmp_path):
    # RTN needs no data for per-token activations, but per-tensor static ranges come from data.
    suite = parse_suite(suite_dict(tiny_llava_path, toy_include, tmp_path, methods=["rtn"],
                                   schemes=["w4a4", "w8a8"], quant={"a_granularity": "per_tensor"}))
    summary = run_suite(suite, show_progress=False)
    assert (summary.ok, summary.failed) == (2, 0)
    recs = read_records(tmp_path / "records.jsonl")
    assert all(r["calibration"]["task"] == "toy_colors" for r in recs)
    per_token = parse_suite(suite_dict(tiny_llava_path, toy_include, tmp_path / "pt", methods=["rtn"],
                                       schemes=["w4a4"]))
    run_suite(per_token, show_progress=False)
    assert read_records(tmp_path / "pt" / "records.jsonl")[0]["calibration"] is None


def test_new_weights_recompute_every_cell(tiny_llava_path, toy_include, tmp_path):
    """Records and cached states are keyed by the model's weights, not only its name: retraining a
    model (as when the bundled one is replaced) must not re-serve the old model's results."""
    import shutil

    from safetensors.torch import load_file, save_file

    from harness.models.loading import model_fingerprint

    model = tmp_path / "model"
    shutil.copytree(tiny_llava_path, model)
    suite = parse_suite(suite_dict(model, toy_include, tmp_path / "out"))
    assert run_suite(suite, show_progress=False).ok == 3
    before = model_fingerprint(str(model))
    weights = load_file(model / "model.safetensors")
    name = next(k for k in sorted(weights) if k.endswith("lm_head.weight"))
    weights[name] = weights[name] * 1.5
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    assert model_fingerprint(str(model)) != before
    again = run_suite(suite, show_progress=False)
    assert (again.ok, again.skipped) == (3, 0)
    recs = read_records(tmp_path / "out" / "records.jsonl")
    assert len(recs) == 6 and len({r["config_hash"] for r in recs}) == 6


def test_fingerprints_follow_content_and_data_version(tiny_llava_path, tmp_path):
    import shutil

    from harness.models.loading import model_fingerprint
    from tasks import synth
    from tasks.sources import data_version

    copy = tmp_path / "copy"
    shutil.copytree(tiny_llava_path, copy)
    (copy / "model.safetensors").write_bytes((copy / "model.safetensors").read_bytes())  # new mtime, same bytes
    assert model_fingerprint(str(copy)) == model_fingerprint(str(tiny_llava_path))
    assert model_fingerprint("org/not-a-local-model") == "hub:org/not-a-local-model"
    assert data_version("synth_vqav2") == f"synth-v{synth.SYNTH_VERSION}"
    assert data_version("vqav2_val") is None


def test_hub_fingerprint_names_the_cached_snapshot(tmp_path, monkeypatch):
    """A Hub model's cache key follows the revision the local cache serves (read offline), so a
    newer snapshot pulled into the cache recomputes its cells instead of re-serving old records."""
    from harness.models import loading

    repo = tmp_path / "models--org--tiny-llava"
    for commit in ("a" * 40, "b" * 40):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    assert loading.cached_hub_commit("org/tiny-llava", cache_dir=tmp_path) == "a" * 40
    (repo / "refs" / "main").write_text("b" * 40)
    assert loading.cached_hub_commit("org/tiny-llava", cache_dir=tmp_path) == "b" * 40
    assert loading.cached_hub_commit("org/not-cached", cache_dir=tmp_path) is None
    monkeypatch.setattr(loading, "cached_hub_commit", lambda repo_id, cache_dir=None: "c" * 40)
    assert loading.model_fingerprint("org/tiny-llava") == "hub:org/tiny-llava@" + "c" * 40


def test_changed_method_default_recomputes_its_cells(tiny_llava_path, toy_include, tmp_path, monkeypatch):
    """The cell hash covers a method's resolved options, so changing a default in code (as when
    GPTQ's hessian_inputs default changed) recomputes that method's cells and only those."""
    from baselines.gptq import GPTQ

    suite = parse_suite(suite_dict(tiny_llava_path, toy_include, tmp_path, methods=["fp16", "gptq"],
                                   schemes=["w4a4"]))
    assert run_suite(suite, show_progress=False).ok == 2
    assert run_suite(suite, show_progress=False).skipped == 2
    monkeypatch.setitem(GPTQ.defaults, "percdamp", 0.02)
    again = run_suite(suite, show_progress=False)
    assert (again.ok, again.skipped) == (1, 1)  # gptq recomputed, fp16 kept
    recs = read_records(tmp_path / "records.jsonl")
    assert [r["method_options"]["percdamp"] for r in recs if r["method"] == "gptq"] == [0.01, 0.02]


def test_edited_method_code_recomputes_its_cells_and_states(tiny_llava_path, toy_include, tmp_path, monkeypatch,
                                                            isolated_registry):
    """Editing a method's source changes its code digest, which keys both its records and its
    cached quantization states: the next run recomputes that method's cells (and only those)."""
    import importlib

    from harness.registry import method_code_digest, method_source_files

    src = tmp_path / "edited_method_plugin.py"
    body = textwrap.dedent("""
        from baselines.rtn import RTN
        from harness.registry import register_method

        @register_method
        class EditedRTN(RTN):
            name = "rtn-edited-test"
            SCALE = {scale}
    """)
    src.write_text(body.format(scale=1))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("edited_method_plugin")
    assert method_source_files(available_methods()["rtn-edited-test"]) == [src]
    first = method_code_digest("rtn-edited-test")
    assert first is not None and method_code_digest("no-such-method") is None
    # a method in a package of its own is hashed over the whole package
    from methods.qvlm.method import QVLM

    assert {f.name for f in method_source_files(QVLM)} >= {"method.py", "search.py", "encoder.py"}

    suite = parse_suite(suite_dict(tiny_llava_path, toy_include, tmp_path / "out",
                                   methods=["fp16", "rtn-edited-test"], schemes=["w4a4"]))
    assert run_suite(suite, show_progress=False).ok == 2
    assert run_suite(suite, show_progress=False).skipped == 2
    states = len(list((tmp_path / "out" / "cache" / "states").iterdir()))
    src.write_text(body.format(scale=2))
    assert method_code_digest("rtn-edited-test") != first
    again = run_suite(suite, show_progress=False)
    assert (again.ok, again.skipped) == (1, 1)  # the edited method recomputed, fp16 kept
    recs = [r for r in read_records(tmp_path / "out" / "records.jsonl") if r["method"] == "rtn-edited-test"]
    assert [r["method_code"] for r in recs] == [first, method_code_digest("rtn-edited-test")]
    assert [r["state_cached"] for r in recs] == [False, False]  # the old state was not reused
    assert len(list((tmp_path / "out" / "cache" / "states").iterdir())) == states + 1


def test_a_full_disk_costs_the_state_cache_not_the_cell(tiny_llava_path, toy_include, tmp_path, monkeypatch,
                                                        caplog):
    """Too little free space (or a failing write) skips caching the state with a warning; the cells
    run and are recorded, and nothing half-written is left in the cache."""
    import errno
    import logging
    import shutil as sh

    from harness import worker

    suite = parse_suite(suite_dict(tiny_llava_path, toy_include, tmp_path / "out", methods=["rtn"],
                                   schemes=["w4a4"]))
    real_usage = sh.disk_usage
    monkeypatch.setattr(worker.shutil, "disk_usage",
                        lambda p: real_usage(p)._replace(free=worker.CACHE_RESERVE_BYTES - 1))
    with caplog.at_level(logging.WARNING, logger="qvlm_bench"):
        assert run_suite(suite, show_progress=False).ok == 1
    assert "not caching the quantization state" in caplog.text and "GB free" in caplog.text
    states = tmp_path / "out" / "cache" / "states"
    assert not list(states.glob("*/state.json"))

    import safetensors.torch

    def enospc(tensors, filename, *args, **kwargs):  # the disk fills halfway through the state
        Path(filename).write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(worker.shutil, "disk_usage", real_usage)
    monkeypatch.setattr(safetensors.torch, "save_file", enospc)
    suite = parse_suite(suite_dict(tiny_llava_path, toy_include, tmp_path / "out2", methods=["rtn"],
                                   schemes=["w4a4"]))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qvlm_bench"):
        assert run_suite(suite, show_progress=False).ok == 1
    assert "No space left on device" in caplog.text
    assert not list((tmp_path / "out2" / "cache" / "states").iterdir())  # the partial write removed
    recs = read_records(tmp_path / "out2" / "records.jsonl")
    assert [r["status"] for r in recs] == ["ok"] and recs[0]["state_cached"] is False


def test_state_nbytes_counts_what_save_writes(tiny_lm, tmp_path):
    from harness.quant.build import rtn_state
    from harness.quant.config import parse_scheme
    from harness.worker import state_nbytes

    state = rtn_state(tiny_lm.model, parse_scheme("w4a4"), "rtn")
    n = state_nbytes(state)
    state.save(tmp_path / "s")
    stored = (tmp_path / "s" / "state.safetensors").stat().st_size
    assert n > 0 and n <= stored <= n + 64 * 1024  # safetensors adds its JSON header only
