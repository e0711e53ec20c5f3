"""The README's method example is real code: it registers, quantizes as ``baselines/smoothquant.py``
does (the full method it abbreviates), and runs under the default suite (static per-tensor
ranges, which the engine fills for it from the smoothed model)."""

import re
from pathlib import Path

import torch

from harness.suite_config import load_suite
from harness.quant.config import parse_scheme
from harness.records import read_records
from harness.registry import available_methods
from harness.runner import run_suite

README = Path(__file__).resolve().parents[1] / "README.md"


def _register_readme_method() -> type:
    text = README.read_text()
    section = text[text.index("## Adding a method"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    return available_methods()["smooth-rtn"]


def test_readme_method_example_runs_under_the_default_suite(tiny_lm, tiny_calib, tmp_path, isolated_registry):
    cls = _register_readme_method()
    assert cls.needs_calibration and cls.defaults == {"alpha": 0.5}
    qcfg = parse_scheme("w4a4")
    before = {n: p.detach().clone() for n, p in tiny_lm.model.named_parameters()}
    state = cls().quantize(tiny_lm, qcfg, tiny_calib)
    assert all(torch.equal(p, before[n]) for n, p in tiny_lm.model.named_parameters())
    assert state.proof()["quantized_linears"] == 14 and state.proof()["max_codes_per_row"] <= 16
    # the example is SmoothQuant on the language model: the same norms and codes as the method
    # (which computes its scales in float64; the example in the model's float32)
    full = available_methods()["smoothquant"]().quantize(tiny_lm, qcfg, tiny_calib)
    assert sorted(state.float_params) == sorted(full.float_params) and len(state.float_params) == 4
    for path, value in full.float_params.items():
        torch.testing.assert_close(state.float_params[path], value, rtol=1e-5, atol=0)
    same = sum(int((state.linears[n].codes == lq.codes).sum()) for n, lq in full.linears.items())
    assert same >= 0.999 * sum(lq.codes.numel() for lq in full.linears.values())
    # `qvlm-bench run --methods fp16,rtn,smooth-rtn` on the default suite (one task, a few rows)
    suite = load_suite("default", overrides={"methods": ["fp16", "rtn", "smooth-rtn"], "schemes": ["w4a4"],
                                             "tasks": ["synth_vqav2"], "limit": 16, "output": str(tmp_path)})
    summary = run_suite(suite, show_progress=False)
    assert (summary.ok, summary.failed) == (3, 0), [r.get("error") for r in summary.records]
    recs = {r["variant"]: r for r in read_records(tmp_path / "records.jsonl")}
    mine = recs["smooth-rtn"]
    assert mine["act_ranges"]["stat"] == "minmax" and mine["act_ranges"]["filled"] == 28
    assert mine["proof"]["act_quantizers_fired"] == 28 and mine["method_options"] == {"alpha": 0.5}
    assert mine["calibration"]["task"] == "synth_scienceqa"
