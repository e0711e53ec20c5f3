"""Round-to-nearest: each weight rounded to its nearest level, ranges from min/max. No calibration.

The floor every other method must beat. Activations are quantized at the input of each quantized
linear: per token at run time, or per tensor with static ranges the engine calibrates by the same
rule for every method (``harness.quant.ranges``; ``act_clip_search: true`` in a suite adds its
clipping search).
"""

from harness.quant.build import rtn_state
from harness.quant.config import QuantConfig
from harness.quant.state import QuantState
from harness.registry import Method, register_method


@register_method
class RTN(Method):
    name = "rtn"
    summary = "round-to-nearest weights (min/max ranges) and activations"

    def quantize(self, lm, qcfg: QuantConfig, calib) -> QuantState:
        return rtn_state(lm.model, qcfg, self.name)
