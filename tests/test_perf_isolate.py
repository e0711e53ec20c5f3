"""A perf run with each variant in a child process (issue 31): a crashed child costs its variant
only, children share the parent's run_id so the table pairs them with the run's baseline, wide
layouts are a recorded choice, and memory nobody accounts for shows as a number."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from harness.perf import isolate
from harness.perf.benchmark import PerfConfig, cuda_fatal
from harness.perf.command import add_perf_parser, perf_config
from harness.perf.measure import allocated_before, held_tensors, tensor_bytes
from harness.perf.table import leaderboard_frame, load_records

TINY = ["--model", "qvlm-tiny-llava", "--device", "cpu", "--dtype", "fp32", "--batch", "1,2", "--reps", "1",
        "--warmup", "1", "--new-tokens", "3", "--text-tokens", "8", "--gate-tokens", "2", "--trained-gate", "off",
        "--no-compile"]


def test_a_crashed_child_costs_its_variant_only(tmp_path, monkeypatch, capsys):
    """w4a4 aborts after its first record, w8a8 aborts before any (os._exit(139)); the baseline and
    w4a16 after them are recorded ok, every cell of the run shares one run_id, and the table is written."""
    from harness.perf.command import main

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv(isolate.INJECT_ENV, "rtn:w4a4:after-first,rtn:w8a8:start:exit139")
    rc = main(["perf", *TINY, "--isolate", "on", "--schemes", "w4a4,w8a8,w4a16", "--out", str(tmp_path)])
    assert rc == 1  # some cells failed
    recs = [json.loads(x) for x in (tmp_path / "records.jsonl").read_text().splitlines()]
    cells = {(r["scheme"], r["batch_size"]): r for r in recs}
    assert sorted(cells) == sorted((s, b) for s in ("w16a16", "w4a4", "w8a8", "w4a16") for b in (1, 2))
    assert len(recs) == 8 and len({r["run_id"] for r in recs}) == 1
    for key in [("w16a16", 1), ("w16a16", 2), ("w4a4", 1), ("w4a16", 1), ("w4a16", 2)]:
        assert cells[key]["status"] == "ok", (key, cells[key]["error"])
    for key, how in [(("w4a4", 2), "SIGABRT"), (("w8a8", 1), "exit status 139"), (("w8a8", 2), "exit status 139")]:
        r = cells[key]
        assert r["status"] == "failed" and how in r["error"] and "injected fault" in r["error"], r["error"]
        assert r["isolation"]["stderr_tail"] and r["isolation"]["returncode"] in (-6, 139)
        assert r["method"] == "rtn" and r["quant_config"]["a_bits"] in (4, 8)
    # each child loaded the model once, its load time recorded; the baseline is its own child
    assert cells[("w4a16", 1)]["isolation"]["child"] == cells[("w4a16", 2)]["isolation"]["child"] == 3
    assert cells[("w16a16", 1)]["isolation"]["load_s"] > 0
    assert cells[("w8a8", 1)]["isolation"]["load_s"] > 0  # it died after loading: the parent knows
    df = leaderboard_frame(load_records(tmp_path / "records.jsonl"))
    w4 = df[(df.scheme == "w4a16") & (df.batch == 2)].iloc[0]
    assert w4["decode ×"] == w4["decode ×"] and w4["decode ×"] > 0  # paired with the run's baseline
    text = (tmp_path / "leaderboard.md").read_text()
    assert "SIGABRT" in text and "w4a16" in text
    assert "child process 1 killed by SIGABRT" in capsys.readouterr().out


def test_children_share_the_run_id_and_the_baseline_pairing(tmp_path, monkeypatch):
    """What the parent hands a child and takes back: the run_id, the budget's clock, the baseline's
    gate figures; the failure records it writes pair with the baseline in the table."""
    from harness.perf.benchmark import COMMON_KEYS, Budget, IsolatedRun, run_pairs
    from harness.perf.states import Case

    cfg = PerfConfig(schemes=["w4a16"], batches=[1, 8], out=tmp_path, device="cpu", dtype="fp32", isolate="on")
    run = IsolatedRun("m", cfg, log=lambda *a: None)
    assert run.cfg.isolate == "off" and run.cfg.leaderboard is False  # children run in process
    seen = []

    def fake_child(argv, *, timeout=None, log=print, env=None, tail=40):
        import pickle

        spec = pickle.load(open(argv[-1], "rb"))
        seen.append(spec)
        assert env["PYTHONPATH"].split(":")[0] == str(isolate.Path(isolate.__file__).resolve().parents[2])
        common = {k: None for k in COMMON_KEYS}
        common.update(model="m", metric="perf", run_id=spec.run_id, card="H100", workload={}, objective="generate",
                      isolation={"child": spec.child, "load_s": 2.0})
        isolate.Path(spec.common_path).write_text(json.dumps(common))
        from harness.perf.benchmark import PerfRecorder

        rec = PerfRecorder(run.path, common, overrides={}, reps=1)
        case = Case(spec.variant, spec.scheme, torch.float32)
        gate = {"passed": True, "e2e_rel_logit_err": 1e-3 * (spec.child + 1), "trained": {"exact": {"rel_logit_err": 0.5}}}
        for B in ([1] if spec.child else [1, 8]):  # the variant's child dies after its batch 1
            rec.write(case, B, status="ok", error=None, gate=gate, kernel="k",
                      latency={"decode_ms_per_token": 4.0 / (spec.child + 1), "prefill_ms": 10.0},
                      memory={"peak_bytes": 100})
        return isolate.ChildResult(-11 if spec.child else 0, False, 1.0, ["boom: illegal memory access"], 42, timeout)

    monkeypatch.setattr(isolate, "run_child_process", fake_child)
    budget = Budget(None, 2)
    pairs = run_pairs(cfg)
    recs = []
    for i, (var, s) in enumerate(pairs):
        recs += run.run_variant(var, s, torch.float32, "fp32", i, budget, tmp_path)
    assert [s.run_id for s in seen] == [run.run_id] * 2 and [s.child for s in seen] == [0, 1]
    assert seen[0].float_e2e == {} and seen[1].float_e2e == {"fp32": 1e-3}  # the baseline's, handed on
    assert seen[1].float_trained == {"fp32": {"rel_logit_err": 0.5}} and run.load_s == 2.0
    assert all(r["run_id"] == run.run_id for r in recs)
    failed = [r for r in recs if r["status"] == "failed"]
    assert [(r["scheme"], r["batch_size"]) for r in failed] == [("w4a16", 8)]  # child 1 died after batch 1
    assert "killed by SIGSEGV (exit -11)" in failed[0]["error"] and "illegal memory access" in failed[0]["error"]
    assert failed[0]["card"] == "H100" and failed[0]["quant_config"]["w_bits"] == 4
    df = leaderboard_frame(load_records(run.path))
    ok = df[(df.scheme == "w4a16") & (df.batch == 1)].iloc[0]
    assert ok["decode ×"] == pytest.approx(2.0)  # 4.0 / 2.0: the baseline of the same run


def test_a_child_is_killed_at_its_deadline_and_its_stderr_kept():
    code = "import sys, time; print('hello', flush=True); sys.stderr.write('last words\\n'); time.sleep(60)"
    lines = []
    res = isolate.run_child_process([sys.executable, "-c", code], timeout=3, log=lines.append)
    assert res.timed_out and not res.ok and res.wall_s < 30
    assert lines == ["hello"] and res.stderr_tail == ["last words"]
    assert "past the time budget" in res.reason()
    err = isolate.failure_error(res, "rtn w4a4 (fp16)", 8)
    assert "batch 8" in err and "last words" in err
    crash = isolate.run_child_process([sys.executable, "-c", "import os; os.abort()"], log=lines.append)
    assert crash.returncode == -6 and "SIGABRT" in crash.reason()
    assert isolate.ChildResult(139, False, 1.0, []).reason() == "exit status 139 (128 + SIGSEGV)"
    progress = isolate.ChildResult(1, False, 1.0, ["Loading: 100%|███| 3/3 [00:00<00:00, 58.2it/s]", "Error: x"])
    assert isolate.failure_error(progress, "v", 1).endswith("stderr: Error: x")


def test_isolation_and_wide_layouts_are_options(tmp_path):
    import argparse

    assert PerfConfig(device="cuda").isolate_on() and not PerfConfig(device="cpu").isolate_on()
    assert PerfConfig(device="cpu", isolate="on").isolate_on() and not PerfConfig(isolate="off").isolate_on()
    with pytest.raises(ValueError, match="--isolate"):
        PerfConfig(isolate="yes")
    parser = argparse.ArgumentParser()
    add_perf_parser(parser.add_subparsers())
    cfg = perf_config(parser.parse_args(["perf", "--model", "m", "--out", str(tmp_path)]), ["rtn"])
    assert (cfg.isolate, cfg.wide_layouts, cfg.layouts) == ("auto", False, "storage")
    cfg = perf_config(parser.parse_args(["perf", "--model", "m", "--isolate", "off", "--wide-layouts"]), ["rtn"])
    assert (cfg.isolate, cfg.wide_layouts, cfg.layouts) == ("off", True, "wide")


def test_wide_layout_rows_are_their_own_configuration(tiny_llava_path, tmp_path):
    from harness.perf.benchmark import run_perf

    common = dict(schemes=["w4a16"], batches=[1], out=tmp_path, new_tokens=3, text_tokens=8, warmup=1, reps=1,
                  gate_tokens=2, device="cpu", dtype="fp32", trained_gate="off", compile=False, graphs=False,
                  log=lambda *a: None)
    a = run_perf(str(tiny_llava_path), **common)
    b = run_perf(str(tiny_llava_path), wide_layouts=True, **common)
    assert a[1]["layouts"] == "storage" and b[1]["layouts"] == "wide" and a[1]["config_hash"] != b[1]["config_hash"]
    df = leaderboard_frame(load_records(tmp_path / "records.jsonl"))
    assert sorted(df[df.scheme == "w4a16"]["layouts for"]) == ["generate", "generate, wide"]
    assert "generate, wide" in (tmp_path / "leaderboard.md").read_text()


def test_memory_nobody_accounts_for_is_a_number():
    """The accounting behind ``allocated_before_bytes``, with CPU tensors standing in for the device's:
    known holders (a model with tied weights, deployed layers keeping codes in plain attributes, a
    gate reference in a dataclass) are subtracted once each; what is left is the leak."""
    from dataclasses import dataclass

    model = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False))
    model[1].weight = model[0].weight  # tied: one storage
    layer = torch.nn.Module()
    layer.register_buffer("scale", torch.zeros(4))
    layer.layouts = {"fp8w": torch.zeros(16, dtype=torch.uint8), "tinygemm": (torch.zeros(2, 2), 3)}
    layer.wdata = torch.zeros(4, dtype=torch.int8)

    @dataclass
    class Ref:
        logits: torch.Tensor
        io: dict

    ref = Ref(torch.zeros(3), {"l0": (torch.zeros(5), torch.zeros(5)[:2])})  # a view of its base: once
    known = tensor_bytes(held_tensors(model, [layer], ref), "cpu")
    assert known == 8 * 8 * 4 + 4 * 4 + 16 + 2 * 2 * 4 + 4 + 3 * 4 + 5 * 4 + 5 * 4
    leaked = 1234
    assert allocated_before(known + leaked, model, [layer], ref, device_type="cpu") == leaked
    assert allocated_before(None, model) is None  # off CUDA: nothing to say
    assert tensor_bytes(held_tensors(model), "cuda") == 0  # only the device's tensors count


def test_cuda_faults_are_told_from_other_errors():
    assert cuda_fatal(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not cuda_fatal(ValueError("shapes do not match"))
