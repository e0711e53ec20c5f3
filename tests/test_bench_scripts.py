"""The quantization-cost benchmark scripts run end to end on their tiny shape (CPU smoke test):
the GPU numbers in docs/benchmarks come from the same code at the 7B shape."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _bench():
    sys.path.insert(0, str(SCRIPTS))
    try:
        import bench_quantize_cost
    finally:
        sys.path.remove(str(SCRIPTS))
    return bench_quantize_cost


def test_bench_shapes_are_the_shipped_architecture():
    """The 7B shape is the shipped llava-1.5-7b config (no second copy of it); the tiny one
    overrides sizes only, keeping the wiring (image token, feature layer, projector)."""
    from harness.perf.arch import arch_config

    bench = _bench()
    big = arch_config("llava-1.5-7b")
    with torch.device("meta"):
        model, config = bench.build_model("7b", 2, torch.float16, "meta")
    assert config.text_config.num_hidden_layers == 2 and config.text_config.hidden_size == 4096
    assert config.vision_config.to_dict() == big.vision_config.to_dict()
    tiny_model, tiny = bench.build_model("tiny", None, torch.float32, "cpu")
    assert (tiny.image_token_index, tiny.vision_feature_layer, tiny.image_seq_length) == (
        big.image_token_index, big.vision_feature_layer, 4)
    assert (tiny.vision_config.image_size // tiny.vision_config.patch_size) ** 2 == tiny.image_seq_length
    calib = bench.calibration(tiny, n=3, batch=2, seq=12, device="cpu", dtype=torch.float32)
    batch = next(calib.inputs())
    assert int((batch["input_ids"] == tiny.image_token_index).sum(1)[0]) == 4
    with torch.no_grad():  # the placeholders match the tower's output: the forward runs
        out = tiny_model(**batch, use_cache=False)
    assert out.logits.shape[:2] == (2, 12)


def test_quantize_cost_runs_on_the_tiny_shape(tmp_path, capsys):
    bench = _bench()
    assert bench.main(["--shape", "tiny", "--device", "cpu", "--n", "2", "--batch", "2", "--seq", "16",
                       "--jobs", "rtn:w4a16,gptq:w4a16", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in res["runs"]] == ["rtn", "gptq"]
    # every linear of the two decoder layers (7 each) is quantized, and timed
    assert all(r["quantized_linears"] == 14 and r["wall_s"] >= 0 for r in res["runs"])
    assert "| gptq | w4a16 | language |" in capsys.readouterr().out


def test_suite_7b_script_runs_on_its_tiny_shape(tmp_path):
    """scripts/bench_suite_7b.py end to end on a tiny random LLaVA folder with llava-hf's processor
    (the Llama-2 tokenizer from ../shared/data) and the real ScienceQA rows: per-stage timings from
    the records and the bridge-vs-plain throughput."""
    import shutil

    from conftest import shared_data

    tok = shared_data("llama2_tokenizer")
    data = tmp_path / "data" / "scienceqa_img"
    data.mkdir(parents=True)
    shutil.copy(shared_data("scienceqa_img_sample", "test.parquet"), data / "test.parquet")
    sys.path.insert(0, str(SCRIPTS))
    try:
        import bench_suite_7b
    finally:
        sys.path.remove(str(SCRIPTS))
    assert bench_suite_7b.main(["--shape", "tiny", "--device", "cpu", "--limit", "4", "--calib", "4",
                                "--batch", "4", "--methods", "fp16,rtn", "--tokenizer", str(tok),
                                "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "suite_7b.json").read_text())
    assert (result["ok"], result["failed"]) == (2, 0)
    rtn = next(c for c in result["cells"] if c["variant"] == "rtn")
    assert rtn["quantize_s"] > 0 and rtn["eval_s"] > 0
    assert abs(rtn["overhead_s"] - (rtn["wall_s"] - rtn["quantize_s"] - rtn["eval_s"])) < 0.02
    tp = result["throughput"]
    assert tp["questions"] == 4 and tp["plain_q_per_s"] > 0 and tp["bridge_q_per_s"] > 0


def scienceqa_rows(folder: Path, n: int) -> Path:
    """``folder/scienceqa_img/test.parquet``: ``n`` rows in the schema of HF ``lmms-lab/ScienceQA``
    (``ScienceQA-IMG``; the synthetic ScienceQA task's rows, which share it), what
    ``--data-dir`` of the benchmark scripts reads."""
    import pandas as pd

    from tasks.synth import generate_rows, rows_to_records

    (folder / "scienceqa_img").mkdir(parents=True)
    rows = rows_to_records(generate_rows("synth_scienceqa", "test", n=n))
    pd.DataFrame(rows).to_parquet(folder / "scienceqa_img" / "test.parquet", index=False)
    return folder


@pytest.mark.slow  # ~30 s on a busy CPU: the folder (its tokenizer trained here) and two cells
def test_suite_7b_script_runs_qwen25_vl_on_its_tiny_shape(tmp_path):
    """--arch qwen2.5-vl-7b --shape tiny: a random Qwen2.5-VL folder with Qwen2's vocabulary and
    special-token ids, its tokenizer built offline, loaded by the harness's normal path; the
    suite runs the reference and a calibrated method on 3 ScienceQA-schema rows, and the
    per-stage table has every stage of every cell."""
    from harness.models.loading import load_model

    sys.path.insert(0, str(SCRIPTS))
    try:
        import bench_suite_7b
    finally:
        sys.path.remove(str(SCRIPTS))
    data = scienceqa_rows(tmp_path / "data", 3)
    out = tmp_path / "out"
    assert bench_suite_7b.main(["--arch", "qwen2.5-vl-7b", "--shape", "tiny", "--device", "cpu",
                                "--limit", "3", "--calib", "3", "--batch", "3", "--methods", "fp16,awq",
                                "--skip-throughput", "--data-dir", str(data), "--out", str(out)]) == 0
    result = json.loads((out / "suite_7b.json").read_text())
    assert (result["ok"], result["failed"], result["dtype"]) == (2, 0, "fp32")
    assert [c["variant"] for c in result["cells"]] == ["fp32 (reference)", "awq"]
    for cell in result["cells"]:
        assert all(isinstance(cell[k], float) for k in bench_suite_7b.STAGES), cell
        assert cell["eval_s"] > 0 and cell["load_s"] >= 0
        assert abs(cell["unstaged_s"] - (cell["wall_s"] - sum(cell[k] for k in bench_suite_7b.STAGES))) < 0.02
    awq = result["cells"][1]
    assert awq["quantize_s"] > 0 and awq["calibrate_s"] > 0  # the first calibrated cell encodes the rows
    table = (out / "stages.md").read_text().splitlines()
    assert table[0].startswith("| variant | wall | load | calibrate | quantize | finalize | apply | eval | record")
    assert len(table) == 4 and all(c.strip() != "–" for row in table[2:] for c in row.split("|")[2:10])
    assert not list((out / "suite" / "cache" / "states").glob("*/state.json"))  # dropped after each record

    lm = load_model(result["folder"], dtype="fp32")  # the folder the script ran: Qwen2's ids and schema
    tok, cfg = lm.processor.tokenizer, lm.model.config
    assert lm.family == "qwen2.5-vl" and type(tok).__name__ == "Qwen2Tokenizer"
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>", "<|image_pad|>"]) == [151643, 151645, 151655]
    assert cfg.image_token_id == 151655 and len(tok) == 151665 <= cfg.text_config.vocab_size == 152064
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    from transformers.models.qwen2 import tokenization_qwen2

    from harness.perf.random_folder import PRETOKENIZE_REGEX
    assert PRETOKENIZE_REGEX == tokenization_qwen2.PRETOKENIZE_REGEX  # Qwen2's split, kept in step


@pytest.mark.slow  # ~20 s: the device script's CPU dry run, one cell
def test_device_suite_7b_script_dry_run(tmp_path):
    """scripts/device_suite_7b.sh with DRY=1 (the tiny Qwen2.5-VL shape on the CPU, no wheels):
    the files the device call brings back land in $OUT."""
    import os
    import subprocess

    data = scienceqa_rows(tmp_path / "data", 2)
    out = tmp_path / "out"
    env = {**os.environ, "DRY": "1", "OUT": str(out), "PYTHON": sys.executable, "DATA_DIR": str(data),
           "METHODS": "fp16", "WORK": str(tmp_path / "work"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(SCRIPTS / "device_suite_7b.sh")], cwd=SCRIPTS.parent, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert {p.name for p in out.iterdir()} == {"log.txt", "versions.txt", "stages.md", "suite_7b.json",
                                               "records.jsonl"}
    result = json.loads((out / "suite_7b.json").read_text())
    assert result["arch"] == "qwen2.5-vl-7b" and result["shape"] == "tiny" and result["ok"] == 1
    assert "| fp32 (reference) |" in proc.stdout
