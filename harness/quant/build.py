"""Building blocks methods share to turn a model and a ``QuantConfig`` into a ``QuantState``."""

from __future__ import annotations

import torch
from torch import nn

from ..models.layers import select_linears
from .config import QuantConfig
from .quantizer import rtn_weight
from .state import ActQuant, LinearQuant, QuantState


def target_linears(model: nn.Module, qcfg: QuantConfig) -> dict[str, nn.Linear]:
    """The linear layers ``qcfg`` asks to quantize (by model part)."""
    if qcfg.is_float:
        return {}
    return select_linears(model, qcfg.parts)


def act_quantizer(qcfg: QuantConfig) -> ActQuant | None:
    """The input activation quantizer a linear gets under ``qcfg`` (None at 16 bits)."""
    if not qcfg.quantizes_acts:
        return None
    return ActQuant(bits=qcfg.a_bits, sym=qcfg.a_sym, granularity=qcfg.a_granularity,
                    clip_ratio=qcfg.a_clip)


def linear_from_weight(weight: torch.Tensor, qcfg: QuantConfig,
                       clip_ratio: float | torch.Tensor | None = None,
                       act: ActQuant | None = None) -> LinearQuant:
    """Round-to-nearest entry for a (possibly transformed) float weight."""
    if not qcfg.quantizes_weights:
        return LinearQuant(bits=16, act=act)
    clip = qcfg.w_clip if clip_ratio is None else clip_ratio
    codes, scale, zero = rtn_weight(weight.detach().float(), qcfg.w_bits, qcfg.w_sym,
                                    qcfg.w_group_size, clip)
    return LinearQuant(bits=qcfg.w_bits, codes=codes.cpu(), scale=scale.cpu(), zero=zero.cpu(),
                       group_size=qcfg.w_group_size, sym=qcfg.w_sym, act=act)


def rtn_state(model: nn.Module, qcfg: QuantConfig, method: str) -> QuantState:
    """Round-to-nearest for every target linear: RTN itself, and the start of other methods."""
    state = QuantState(method=method, config=qcfg)
    for name, lin in target_linears(model, qcfg).items():
        state.linears[name] = linear_from_weight(lin.weight, qcfg, act=act_quantizer(qcfg))
    return state
