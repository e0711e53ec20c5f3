"""Uniform affine quantization math, shared by every method, the fake-quant model and the kernels.

One convention everywhere: integer codes ``q`` are unsigned in ``[0, 2**bits - 1]`` with an
integer-valued zero point ``z`` and a float scale ``s``; the value represented is ``(q - z) * s``.
Symmetric quantization is the special case ``z = 2**(bits-1)`` with ``s = clip * max|x| / (2**(bits-1) - 1)``.
``q - z`` is then an integer of magnitude < 2**bits, which is what lets 4-bit codes run exactly on
FP8 tensor cores and 6/8-bit codes on INT8 ones.
"""

from __future__ import annotations

import torch

EPS = 1e-8


def check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"quantization bit width must be an integer in 2..8, got {bits!r}")


def _const(value: float, like: torch.Tensor) -> torch.Tensor:
    """A divisor as a tensor on ``like``'s device: CUDA divides by a Python scalar as a multiply
    by its float32 reciprocal (1 ulp off true division), while kernels divide exactly
    (``div_rn``); a tensor divisor gives IEEE division on every device."""
    return torch.tensor(float(value), dtype=like.dtype, device=like.device)


def wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float64 when it is float64, else float32: quantizer arithmetic never loses the
    input's precision (a float64 model's activations were once rounded to float32 here)."""
    return x if x.dtype == torch.float64 else x.float()


def qparams(x: torch.Tensor, bits: int, sym: bool, clip_ratio: float | torch.Tensor = 1.0,
            dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point reducing over ``dim`` (kept), from the clipped range of ``x``.

    ``clip_ratio`` (scalar or broadcastable tensor) shrinks the range before rounding; values
    beyond it saturate. Computed in float32 whatever the input dtype: a scale is a parameter of
    the quantizer, stored (and used by the kernels) in float32; applying it to a float64 tensor is
    then exact (``quantize``, ``fake_quant``).
    """
    check_bits(bits)
    x = x.float()
    levels = 2 ** bits - 1
    if sym:
        amax = x.abs().amax(dim=dim, keepdim=True) * clip_ratio
        scale = (amax / _const(2 ** (bits - 1) - 1, amax)).clamp_min(EPS)
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        xmin = x.amin(dim=dim, keepdim=True).clamp(max=0) * clip_ratio
        xmax = x.amax(dim=dim, keepdim=True).clamp(min=0) * clip_ratio
        scale = ((xmax - xmin) / _const(levels, xmax)).clamp_min(EPS)
        zero = torch.round(-xmin / scale).clamp(0, levels)
    return scale, zero


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (uint8) of ``x`` for broadcastable ``scale``/``zero``."""
    x = wide(x)
    q = torch.round(x / scale.to(x.dtype)) + zero.to(x.dtype)
    return q.clamp_(0, 2 ** bits - 1).to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (codes.float() - zero) * scale


def fake_quant(x: torch.Tensor, bits: int, sym: bool, clip_ratio: float | torch.Tensor = 1.0,
               dim: int = -1) -> torch.Tensor:
    """Quantize-dequantize ``x`` with ranges taken along ``dim`` (per token when dim=-1)."""
    scale, zero = qparams(x, bits, sym, clip_ratio, dim)
    xw = wide(x)
    scale, zero = scale.to(xw.dtype), zero.to(xw.dtype)
    q = torch.round(xw / scale) + zero
    return ((q.clamp_(0, 2 ** bits - 1) - zero) * scale).to(x.dtype)


# ---- weights: per output channel or per group of input channels --------------------------------

def _grouped(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    out_f, in_f = w.shape
    if group_size is None or group_size <= 0 or group_size >= in_f:
        return w.reshape(out_f, 1, in_f)
    if in_f % group_size:
        raise ValueError(f"group size {group_size} does not divide the input width {in_f}")
    return w.reshape(out_f, in_f // group_size, group_size)


def weight_qparams(w: torch.Tensor, bits: int, sym: bool, group_size: int | None = None,
                   clip_ratio: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero of shape ``[out, n_groups]`` (n_groups = 1 for per-channel)."""
    scale, zero = qparams(_grouped(w, group_size), bits, sym, clip_ratio, dim=-1)
    return scale.squeeze(-1), zero.squeeze(-1)


def expand_groups(t: torch.Tensor, in_features: int) -> torch.Tensor:
    """``[out, n_groups]`` -> ``[out, in_features]`` (each group's value repeated over its columns)."""
    return t.repeat_interleave(in_features // t.shape[1], dim=1)


def quantize_weight(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    bits: int) -> torch.Tensor:
    in_f = w.shape[1]
    return quantize(w, expand_groups(scale, in_f), expand_groups(zero, in_f), bits)


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    in_f = codes.shape[1]
    return dequantize(codes, expand_groups(scale, in_f), expand_groups(zero, in_f))


def rtn_weight(w: torch.Tensor, bits: int, sym: bool, group_size: int | None = None,
               clip_ratio: float | torch.Tensor = 1.0):
    """Round-to-nearest: ``(codes, scale, zero)`` of a ``[out, in]`` weight."""
    scale, zero = weight_qparams(w, bits, sym, group_size, clip_ratio)
    return quantize_weight(w, scale, zero, bits), scale, zero
