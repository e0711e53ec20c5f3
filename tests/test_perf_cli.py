"""``run_perf`` end to end on the tiny LLaVA on CPU: records carry the contract keys of docs/design.md."""

import json

from harness.perf.command import main

CONTRACT_KEYS = {"suite", "model", "method", "scheme", "quant_config", "task", "metric", "value", "stderr",
               "n", "n_empty", "n_unparsed", "latency", "memory", "kernel", "quantize_s", "eval_s",
               "device", "seed", "versions", "git", "config_hash", "status", "error", "proof"}


def test_perf_command_on_tiny_model(tiny_llava_path, tmp_path):
    rc = main(["perf", "--model", str(tiny_llava_path), "--device", "cpu", "--dtype", "fp32",
               "--schemes", "w4a16,w8a8", "--batch", "1", "--reps", "2", "--warmup", "1",
               "--new-tokens", "3", "--text-tokens", "8", "--gate-tokens", "2", "--out", str(tmp_path)])
    recs = [json.loads(x) for x in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert rc == 0 and [(r["method"], r["scheme"]) for r in recs] == [
        ("fp16", "w16a16"), ("rtn", "w4a16"), ("rtn", "w8a8")]
    for r in recs:
        assert CONTRACT_KEYS <= set(r), CONTRACT_KEYS - set(r)
        assert r["task"] is None and r["metric"] == "perf" and r["status"] == "ok"
        assert r["gate"]["passed"] and r["batch_size"] == 1 and r["workload"]["new_tokens"] == 3
    fp16, w4, w8 = recs
    assert fp16["latency"]["decode_ms_per_token"] > 0 and fp16["latency"]["iqr"]["decode_ms_per_token"] >= 0
    assert w4["proof"]["quantized_linears"] > 0 and w4["proof"]["max_codes_per_row"] <= 16
    assert w4["memory"]["weight_bytes_language_linears"] < fp16["memory"]["weight_bytes_language_linears"] / 4
    # no integer GPU kernels on a CPU-only machine without triton: the w8a8 decode is simulated
    assert w8["kernel"] == "simulated" and w8["latency"] is None
    assert "## " in (tmp_path / "leaderboard.md").read_text()
