"""The README's method example is real code: it registers, quantizes, keeps its promise, and runs
under the default suite (static per-tensor ranges, which the engine fills for it)."""

import re
from pathlib import Path

from harness.config import load_suite
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
    return available_methods()["clipped-rtn"]


def test_readme_method_example_runs_under_the_default_suite(tiny_lm, tmp_path, isolated_registry):
    cls = _register_readme_method()
    state = cls().quantize(tiny_lm, parse_scheme("w4a4"), None)
    assert state.proof()["quantized_linears"] == 14 and state.proof()["max_codes_per_row"] <= 16
    # the 0.9 clip shrinks every range: scales are 0.9x RTN's
    rtn = available_methods()["rtn"]().quantize(tiny_lm, parse_scheme("w4a4"), None)
    name = next(iter(state.linears))
    ratio = state.linears[name].scale / rtn.linears[name].scale
    assert abs(float(ratio.mean()) - 0.9) < 1e-5
    # `qvlm-bench run --methods fp16,rtn,clipped-rtn` on the default suite (one task, a few rows)
    suite = load_suite("default", overrides={"methods": ["fp16", "rtn", "clipped-rtn"], "schemes": ["w4a4"],
                                             "tasks": ["synth_vqav2"], "limit": 16, "output": str(tmp_path)})
    summary = run_suite(suite, show_progress=False)
    assert (summary.ok, summary.failed) == (3, 0), [r.get("error") for r in summary.records]
    recs = {r["variant"]: r for r in read_records(tmp_path / "records.jsonl")}
    mine = recs["clipped-rtn"]
    assert mine["act_ranges"]["stat"] == "minmax" and mine["act_ranges"]["filled"] == 28
    assert mine["proof"]["act_quantizers_fired"] == 28 and mine["method_options"] == {"clip": 0.9}
