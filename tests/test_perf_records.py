"""Perf records, the leaderboard's ratios, the CLI parser and the architecture configs."""

import argparse
import json
import threading

import pytest
import torch

from harness.perf.arch import arch_config, architectures
from harness.perf.command import add_perf_parser, main, perf_methods, perf_schemes
from harness.perf.measure import quantiles
from harness.perf.table import leaderboard_frame, load_records, write_perf_table
from harness.records import append_record


def _rec(method, scheme, decode, ttft, peak, kernel="k", status="ok", run="r1", batch=1, gate=True):
    return {"suite": "perf", "model": "m", "method": method, "scheme": scheme, "task": None,
            "metric": "perf", "value": None, "batch_size": batch, "run_id": run, "card": "H100",
            "status": status, "kernel": kernel, "timestamp": "2026-01-01T00:00:00",
            "gate": {"passed": gate, "layerwise_max_rel_err": 1e-3, "e2e_rel_logit_err": 1e-3,
                     "e2e_tokens_match": True},
            "latency": {"decode_ms_per_token": decode, "ttft_ms": ttft, "prefill_ms": ttft - 1,
                        "vision_ms": 1.0, "tokens_per_s": 1.0, "iqr": {"decode_ms_per_token": 0.1}}
            if status == "ok" and kernel != "simulated" else None,
            "memory": {"peak_bytes": peak, "weight_bytes_language": peak // 2} if peak else None}


def test_append_is_whole_lines_and_concurrent_safe(tmp_path):
    """Threads appending to one file: every record a whole line of its own, no blank line (the
    torn-line check and the write are one locked step; unlocked, ~1 in 10 runs of 4 x 20 appends
    gained a spurious blank line), over several rounds so that a race has its chances."""
    for round_ in range(5):
        path = tmp_path / f"perf{round_}" / "records.jsonl"
        threads = [threading.Thread(target=lambda i=i: [append_record(path, _rec("rtn", f"w{i}a16", 1.0, 2.0, 10))
                                                        for _ in range(20)]) for i in range(4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        lines = path.read_text().split("\n")
        assert lines[-1] == "" and len(lines) == 81, round_
        assert all(json.loads(x)["metric"] == "perf" for x in lines[:-1])
        assert len(load_records(path)) == 80


def test_leaderboard_ratios_against_fp16_of_the_same_run(tmp_path):
    recs = [_rec("fp16", "w16a16", 8.0, 40.0, 1000), _rec("rtn", "w4a16", 2.0, 30.0, 300),
            _rec("rtn", "w4a4", 4.0, 20.0, 400, gate=False, status="failed"),
            _rec("rtn", "w6a6", 4.0, 20.0, 400, kernel="simulated"),
            _rec("fp16", "w16a16", 1.0, 1.0, 1, run="other", batch=8)]
    df = leaderboard_frame(recs)
    row = df[(df.scheme == "w4a16") & (df.batch == 1)].iloc[0]
    assert row["decode ×"] == pytest.approx(4.0) and row["peak / base"] == pytest.approx(0.3)
    assert row["prefill ×"] == pytest.approx(39 / 29)
    failed = df[df.scheme == "w4a4"].iloc[0]
    assert failed["gate"] == "FAIL" and (failed["decode ×"] is None or failed["decode ×"] != failed["decode ×"])
    sim = df[df.scheme == "w6a6"].iloc[0]
    assert sim["status"] == "simulated"
    path = tmp_path / "records.jsonl"
    for r in recs:
        append_record(path, r)
    text = write_perf_table(path, tmp_path / "leaderboard.md", command="python -m harness.perf.command x")
    assert "## m, batch 1" in text and "H100" in text and "python -m harness.perf.command x" in text


def test_quantiles():
    q = quantiles([1.0, 2.0, 3.0, 4.0, 100.0])
    assert q["median"] == 3.0 and q["iqr"] == pytest.approx(2.0) and q["n"] == 5
    assert quantiles([])["median"] is None


def test_parser_defaults_and_overrides():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_perf_parser(sub)
    args = parser.parse_args(["perf", "--model", "llava-1.5-7b", "--override", "w_group_size=128"])
    assert perf_schemes(args) == ["w4a16", "w8a8", "w4a4", "w6a6"] and args.batch == [1, 8, 32]
    # with a suite, its schemes by default
    suite_args = parser.parse_args(["perf", "--model", "qvlm-tiny-llava", "--methods-from", "default"])
    assert perf_schemes(suite_args) == ["w4a4", "w6a6"]
    assert perf_methods(args.methods) == ["rtn"] and args.reps >= 20 and args.warmup >= 5
    assert dict(args.override) == {"w_group_size": 128} and callable(args.func)


def test_leaderboard_only(tmp_path, capsys):
    append_record(tmp_path / "records.jsonl", _rec("fp16", "w16a16", 8.0, 40.0, 1000))
    assert main(["perf", "--model", "x", "--out", str(tmp_path), "--leaderboard-only"]) == 0
    assert (tmp_path / "leaderboard.md").exists()


@pytest.mark.parametrize("name,params", [("llava-1.5-7b", 7.06e9), ("llava-1.5-13b", 13.35e9)])
def test_shipped_architectures(name, params):
    from transformers import LlavaForConditionalGeneration

    assert name in architectures()
    cfg = arch_config(name)
    assert cfg.vision_config.image_size == 336 and cfg.vision_config.patch_size == 14
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=2e-3)


def test_no_eval_dependencies_on_the_perf_path():
    import subprocess
    import sys

    code = ("import sys, harness.perf.command, harness.perf.benchmark, harness.perf.engine, harness.perf.gate;"
            "bad=[m for m in sys.modules if m.split('.')[0] in ('lm_eval','datasets')]; print(bad); "
            "sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_table_keeps_the_newest_measurement_per_variant_with_its_own_runs_fp16():
    def at(rec, ts):
        return {**rec, "timestamp": ts}
    old = [at(_rec("fp16", "w16a16", 8.0, 40.0, 1000, run="a"), "2026-01-01"),
           at(_rec("rtn", "w4a4", 4.0, 20.0, 400, run="a"), "2026-01-01"),
           at(_rec("rtn", "w4a16", 4.0, 20.0, 400, run="a"), "2026-01-01")]
    new = [at(_rec("fp16", "w16a16", 6.0, 30.0, 1000, run="b"), "2026-02-01"),
           at(_rec("rtn", "w4a16", 2.0, 30.0, 300, run="b"), "2026-02-01"),
           at({**_rec("rtn", "w4a4", None, None, None, status="failed", run="b"),
               "error": "not run: time budget of 10s spent"}, "2026-02-01")]
    df = leaderboard_frame(old + new)
    assert len(df) == 3
    w4a4 = df[df.scheme == "w4a4"].iloc[0]  # the skip doesn't hide run a's measurement
    assert w4a4["run"] == "a" and w4a4["decode ×"] == pytest.approx(2.0)  # against run a's fp16
    w4a16 = df[df.scheme == "w4a16"].iloc[0]
    assert w4a16["run"] == "b" and w4a16["decode ×"] == pytest.approx(3.0)


def test_time_budget_gives_the_baseline_every_batch_and_the_rest_fair_shares(monkeypatch):
    from harness.perf import benchmark as runner

    now = [1000.0]
    monkeypatch.setattr(runner.time, "time", lambda: now[0])
    b = runner.Budget(100.0, shares=5)  # baseline + 4 variants
    now[0] += 40  # the baseline took 40 s of 100
    assert b.allow(0, first_batch=False)  # its larger batches still run
    b.reference_done()
    # 60 s remain: variant 1 may start larger batches until 40 + 60 * 1/4 = 55 s, variant 4 until 100 s
    now[0] = 1000 + 54
    assert b.allow(1, False) and b.allow(4, False)
    now[0] = 1000 + 56
    assert not b.allow(1, False) and b.allow(1, True) and b.allow(2, False)
    now[0] = 1000 + 101
    assert not b.allow(3, True) and not b.allow(0, False)
    assert runner.Budget(None, 3).allow(2, False)


def test_table_keeps_each_cards_rows_in_its_own_section(tmp_path):
    h100 = [{**_rec("fp16", "w16a16", 6.0, 30.0, 1000, run="a"), "timestamp": "2026-01-01"},
            {**_rec("rtn", "w4a16", 4.0, 30.0, 400, run="a"), "timestamp": "2026-01-01"}]
    h200 = [{**_rec("fp16", "w16a16", 4.5, 20.0, 1000, run="b"), "card": "H200", "timestamp": "2026-02-01"},
            {**_rec("rtn", "w4a16", 3.0, 20.0, 300, run="b"), "card": "H200", "timestamp": "2026-02-01",
             "dtype": "bf16", "reference": False},
            {**_rec("fp16", "w16a16", 4.4, 20.0, 1000, run="b"), "card": "H200", "timestamp": "2026-02-01",
             "dtype": "bf16", "reference": True}]
    df = leaderboard_frame(h100 + h200)
    assert len(df) == 5  # the H200 run does not replace the H100 rows
    bf = df[(df.card == "H200") & (df.scheme == "w4a16")].iloc[0]
    assert bf["dtype"] == "bf16" and bf["decode ×"] == pytest.approx(4.4 / 3.0)  # the bf16 baseline
    path = tmp_path / "records.jsonl"
    for r in h100 + h200:
        append_record(path, r)
    text = write_perf_table(path, tmp_path / "leaderboard.md")
    assert text.index("# H200") < text.index("# H100 (earlier runs, kept for reference)")


def test_rows_of_other_configurations_and_objectives_do_not_replace_each_other(tiny_llava_path, tmp_path):
    """A run with quantization overrides is its own variant, and layouts chosen for another
    objective are their own row: neither hides the default run's measurement."""
    from harness.perf.benchmark import run_perf

    common = dict(schemes=["w4a16"], batches=[1], out=tmp_path, new_tokens=3, text_tokens=8, warmup=1,
                  reps=1, gate_tokens=2, device="cpu", dtype="fp32", trained_gate="off", compile=False,
                  graphs=False, log=lambda *a: None)
    a = run_perf(str(tiny_llava_path), **common)
    b = run_perf(str(tiny_llava_path), overrides={"w_group_size": 128, "w_sym": True}, **common)
    c = run_perf(str(tiny_llava_path), objective="prefill", **common)
    assert [r["variant"] for r in a] == ["fp16", "rtn"] and b[0]["variant"] == "fp16"
    assert b[1]["variant"] == "rtn (w_group_size=128, w_sym=True)"
    assert b[1]["quant_config"]["w_group_size"] == 128 and b[1]["quant_config"]["w_sym"] is True
    assert c[1]["objective"] == "prefill"
    df = leaderboard_frame(load_records(tmp_path / "records.jsonl"))
    rows = sorted(zip(df["method"], df["layouts for"], df["run"]))
    assert rows == sorted([("fp16", "generate", b[0]["run_id"]), ("fp16", "prefill", c[0]["run_id"]),
                           ("rtn", "generate", a[1]["run_id"]), ("rtn", "prefill", c[1]["run_id"]),
                           ("rtn (w_group_size=128, w_sym=True)", "generate", b[1]["run_id"])])


def test_summary_shows_each_rows_ratios_per_batch_and_why_there_is_none(tmp_path):
    recs = [_rec("fp16", "w16a16", 8.0, 40.0, 1000), _rec("rtn", "w4a16", 2.0, 30.0, 300),
            _rec("rtn", "w4a4", 4.0, 20.0, 400, gate=False, status="failed"),
            _rec("rtn", "w6a6", 4.0, 20.0, 400, kernel="simulated"),
            _rec("fp16", "w16a16", 10.0, 100.0, 2000, batch=8),
            {**_rec("rtn", "w4a16", None, None, None, status="failed", batch=8),
             "error": "not run: time budget of 10s spent"}]
    path = tmp_path / "records.jsonl"
    for r in recs:
        append_record(path, r)
    text = write_perf_table(path, tmp_path / "leaderboard.md")
    summary = text.split("## Summary")[1].split("\n## ")[0]
    rows = {line.split("|")[3].strip(): [c.strip() for c in line.split("|")[6:9]]
            for line in summary.splitlines() if line.startswith("| m ")}
    assert rows["w16a16"] == ["8.00 ms/tok, 39.0 ms", "10.00 ms/tok, 99.0 ms", "1.00"]
    assert rows["w4a16"] == [f"4.00 / {39 / 29:.2f}", "not run", "0.30"]
    assert rows["w4a4"][:2] == ["gate FAIL (run r1)", "—"] and rows["w6a6"][:2] == ["simulated", "—"]
