"""The float reference: no quantization. Every leaderboard's Δ column is measured against it."""

from harness.quant.config import QuantConfig
from harness.quant.state import QuantState
from harness.registry import Method, register_method


@register_method
class FloatReference(Method):
    name = "fp16"
    summary = "float model, no quantization (the reference row; runs in the model's dtype)"

    def quantize(self, lm, qcfg: QuantConfig, calib) -> QuantState:
        return QuantState(method=self.name, config=QuantConfig())
