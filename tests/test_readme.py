"""The README's method example is real code: it registers, quantizes and keeps its promise."""

import re
from pathlib import Path

from harness.quant.config import parse_scheme
from harness.registry import available_methods

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_method_example_runs(tiny_lm, isolated_registry):
    text = README.read_text()
    section = text[text.index("## Adding a method"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    cls = available_methods()["clipped-rtn"]
    state = cls().quantize(tiny_lm, parse_scheme("w4a4"), None)
    assert state.proof()["quantized_linears"] == 14 and state.proof()["max_codes_per_row"] <= 16
    # the 0.9 clip shrinks every range: scales are 0.9x RTN's
    rtn = available_methods()["rtn"]().quantize(tiny_lm, parse_scheme("w4a4"), None)
    name = next(iter(state.linears))
    ratio = state.linears[name].scale / rtn.linears[name].scale
    assert abs(float(ratio.mean()) - 0.9) < 1e-5
