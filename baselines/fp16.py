"""The float reference: no quantization. Every leaderboard's Δ column is measured against it.

Named for the papers' fp16 rows; it runs in the suite's dtype (fp16 on GPUs, fp64 on the CPU),
and its row is labelled with that dtype."""

from harness.quant.config import QuantConfig
from harness.quant.state import QuantState
from harness.registry import Method, register_method


@register_method
class FloatReference(Method):
    name = "fp16"
    summary = "float model, no quantization (the reference row; runs in the suite's dtype)"
    reference = True
    quantizes = False

    def quantize(self, lm, qcfg: QuantConfig, calib) -> QuantState:
        return QuantState(method=self.name, config=QuantConfig())
