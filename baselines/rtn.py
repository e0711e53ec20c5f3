"""Round-to-nearest: each weight rounded to its nearest level, ranges from min/max. No calibration.

The floor every other method must beat. With activation quantization, inputs of each quantized
linear are rounded per token at run time (or per tensor from calibrated ranges).
"""

from harness.quant.build import calibrate_static_acts, rtn_state
from harness.quant.config import QuantConfig
from harness.quant.state import QuantState
from harness.registry import Method, register_method


@register_method
class RTN(Method):
    name = "rtn"
    summary = "round-to-nearest weights (min/max ranges) and activations"

    def quantize(self, lm, qcfg: QuantConfig, calib) -> QuantState:
        state = rtn_state(lm.model, qcfg, self.name)
        if qcfg.quantizes_acts and qcfg.a_granularity == "per_tensor":
            if calib is None:
                raise ValueError("rtn with a_granularity=per_tensor needs calibration data")
            calibrate_static_acts(lm.model, state, calib.batches)
        return state
