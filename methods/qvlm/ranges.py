"""Static activation ranges Q-VLM needs *inside* its own computations, not in its state.

The engine fills the static (per-tensor) ranges of every linear whose range a method did not
decide (the engine contract: float stream, min/max, real tokens only). Q-VLM decides the ranges
of the language layers it searches; for the others (vision, projector, lm_head when the scheme
quantizes them) and for the round-to-nearest model VEO trains against, it still needs *some*
range to run a quantized forward pass before the engine has filled them. This module computes
them by the engine's rule, on copies: the state Q-VLM returns leaves those ranges to the engine
(``ActQuant.scale`` None), unless the engine is too old to fill them (``engine_fills_ranges``).
"""

from __future__ import annotations

import copy
import importlib.util
from typing import Iterable

import torch
from torch import nn

from harness.quant.quantizer import qparams
from harness.quant.state import ActQuant, QuantState

RULE = {"stream": "float", "stat": "minmax", "tokens": "real"}


def engine_fills_ranges() -> bool:
    """Whether this harness fills static ranges after ``Method.quantize`` (harness.quant.ranges)."""
    return importlib.util.find_spec("harness.quant.ranges") is not None


def needs_range(act: ActQuant | None) -> bool:
    return act is not None and act.granularity == "per_tensor" and act.scale is None


def _rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
        return x[mask.to(x.device).bool()]
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def fill_float_ranges(model: nn.Module, acts: dict[str, ActQuant], batches: Iterable[dict]) -> None:
    """Set ``scale``/``zero`` of the per-tensor quantizers ``acts`` (module path -> quantizer) that
    have none, from min/max over real tokens of the float model's inputs to those modules."""
    names = [n for n, a in acts.items() if needs_range(a)]
    if not names:
        return
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}
    current: dict[str, torch.Tensor | None] = {"mask": None}
    handles = []
    for name in names:
        def hook(_m, args, _n=name):
            rows = _rows(args[0].detach(), current["mask"])
            if rows.numel():
                lo[_n] = min(lo.get(_n, float("inf")), float(rows.min()))
                hi[_n] = max(hi.get(_n, float("-inf")), float(rows.max()))
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        for batch in batches:
            current["mask"] = batch.get("attention_mask")
            model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    for name in names:
        if name not in lo:
            raise RuntimeError(f"calibration never reached {name}; cannot set its static range")
        act = acts[name]
        span = torch.tensor([lo[name], hi[name]], dtype=torch.float32)
        act.scale, act.zero = qparams(span, act.bits, act.sym, act.clip_ratio, dim=0)


def with_float_ranges(model: nn.Module, state: QuantState, batches: Iterable[dict]) -> QuantState:
    """A copy of ``state`` whose missing static ranges are filled (``state`` is left as it is)."""
    out = QuantState(state.method, state.config, dict(state.linears), dict(state.float_params),
                     dict(state.meta))
    acts = {}
    for name, lq in state.linears.items():
        if needs_range(lq.act):
            lq = copy.copy(lq)
            lq.act = copy.copy(lq.act)
            out.linears[name] = lq
            acts[name] = lq.act
    fill_float_ranges(model, acts, batches)
    return out
