"""SmoothQuant (Xiao et al., ICML 2023): move activation outliers into the weights, then round.

For every scale group (linears reading one norm's output), with ``max|X_j|`` the per-channel
maximum of the group's input over the real calibration tokens and ``max|W_j|`` the maximum of
column ``j`` over the rows of *all* the group's linears (concatenated, as mit-han-lab/smoothquant
``smooth_ln_fcs``), the smoothing factor is

    s_j = max|X_j|^α / max|W_j|^(1−α),   max|W_j| clamped to ≥ 1e-5, s_j clamped to ≥ 1e-5

(the reference's clamps). ``s`` folds exactly into the model: the producing norm's weight (and
bias) divided by it, the group's weight columns multiplied by it (``FloatEdit.scale_group``). The
smoothed weights are then rounded to nearest (``rtn_state``) and every target linear gets the
scheme's activation quantizer, whose static ranges (if any) the engine fills from the smoothed
model, as for every method.

Groups: the norm-fed ones (q/k/v after ``input_layernorm``, gate/up after
``post_attention_layernorm``; in the CLIP tower q/k/v after ``layer_norm1``, fc1 after
``layer_norm2``), as the reference smooths them; ``fold_linears=True`` also smooths the
linear-fed groups (v → o, up → down; the tower's v → out_proj), off by default. Vision layers are
smoothed when ``qcfg.parts`` quantizes the tower. All statistics come from one pass of the float
model, all weight maxima from the original weights; the edits commute (columns and rows).

α (``alpha``, the migration strength): the paper finds 0.5 well balanced for most models (OPT,
BLOOM) and takes a larger value for models with stronger outliers (0.75 for GLM-130B); the
reference repository uses 0.85 for Llama-2-7B/13B and Llama-3-8B/70B, 0.9 for Llama-2-70B, 0.8
for Mistral-7B and Mixtral-8x7B, 0.6/0.7 for Falcon-7B/40B (W8A8). α = 0 normalizes the weight
columns (max|W'_j| = 1), α = 1 the activation channels (max|X'_j| = 1).

Left out: the paper's W8A8 *kernels* (per-tensor static or per-token dynamic, as the suite's
scheme says here) and its per-layer α search (one α for the model, as the reference's scripts).
Projector and lm_head linears (when ``parts`` asks) have no norm in front: RTN alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from harness.models.family import ScaleGroup, adapter_for
from harness.quant.build import rtn_state
from harness.quant.capture import channel_stats
from harness.quant.config import QuantConfig
from harness.quant.state import QuantState
from harness.quant.transforms import FloatEdit, edited
from harness.registry import Method, register_method

CLAMP = 1e-5  # mit-han-lab/smoothquant's floor for the weight maxima and the scales


def smoothing_groups(model: nn.Module, parts, fold_linears: bool = False) -> list[tuple[str, ScaleGroup]]:
    """``(layer path, group)`` for every group SmoothQuant smooths under ``parts``."""
    adapter = adapter_for(model)
    out = []
    for part, layers_of in (("vision", adapter.vision_layers), ("language", adapter.language_layers)):
        if part in parts:
            prefix, layers = layers_of(model)
            out += [(f"{prefix}.{i}", g) for i, layer in enumerate(layers)
                    for g in adapter.scale_groups(layer) if g.after_norm or fold_linears]
    return out


def smoothing_scales(model: nn.Module, groups, batches, alpha: float) -> list[torch.Tensor]:
    """``s`` per group (float64): the formula of the module doc over ``batches``' real tokens."""
    x_max = channel_stats(model, {f"{p}.{g.linears[0]}" for p, g in groups}, batches, "absmax")
    scales = []
    for p, g in groups:
        w = torch.cat([model.get_submodule(f"{p}.{n}").weight.detach().abs() for n in g.linears], 0)
        w_max = w.amax(0).to(torch.float64).clamp(min=CLAMP)
        x = x_max[f"{p}.{g.linears[0]}"].to(torch.float64)
        scales.append((x.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=CLAMP))
    return scales


def smoothing_edit(model: nn.Module, groups, batches, alpha: float = 0.5) -> FloatEdit:
    """The smoothed float (unquantized) model as a ``FloatEdit``: exact in real arithmetic."""
    edit = FloatEdit(model)
    for (p, g), s in zip(groups, smoothing_scales(model, groups, batches, alpha)):
        edit.scale_group(p, g, s)
    return edit


@register_method
class SmoothQuant(Method):
    name = "smoothquant"
    summary = "SmoothQuant: per-channel smoothing max|X|^α/max|W|^(1-α) folded into norms, then RTN"
    needs_calibration = True

    @dataclass
    class Options:
        alpha: float = 0.5  # migration strength (module doc: the paper's per-model values)
        fold_linears: bool = False  # also smooth v → o and up → down (the reference does not)

    def quantize(self, lm, qcfg: QuantConfig, calib) -> QuantState:
        t0 = time.perf_counter()
        if qcfg.is_float:
            return QuantState(method=self.name, config=qcfg, meta={"options": dict(self.options)})
        if calib is None:
            raise ValueError("smoothquant needs calibration data")
        groups = smoothing_groups(lm.model, qcfg.parts, self.opts.fold_linears)
        edit = smoothing_edit(lm.model, groups, list(calib.inputs()), self.opts.alpha)
        with edited(lm.model, edit):
            state = rtn_state(lm.model, qcfg, self.name)  # codes of the smoothed weights
        edit.to_state(state)  # norms (and unquantized linears' weights) as float params
        state.meta.update(options=dict(self.options), smoothed_groups=len(groups),
                          quantize_s=time.perf_counter() - t0)
        return state
