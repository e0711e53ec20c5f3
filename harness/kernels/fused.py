"""Activation quantization fused into the op that produces the activation (Triton; torch fallback).

The simulated model quantizes a linear layer's input ``h`` per token: ``scale, zero = qparams(h)``,
``q = clamp(round(h / scale) + zero, 0, 2**bits - 1) - zero``, and multiplies ``q * scale`` back
(``quantize_activation``). A deployed W4A4/W6A6/W8A8 model gets ``h`` from one of three ops:

* residual add + RMSNorm (the inputs of q/k/v and of gate/up): ``add_rms_norm_q``;
* SiLU(gate) * up (the input of down): ``silu_mul_q``;
* the attention output, read through its ``[B, H, T, D] -> [B*T, H*D]`` transpose (the input of
  o_proj): ``rows_q``, which also quantizes any plain ``[M, K]`` tensor.

Each runs in one Triton program per row, computes ``h`` exactly as the engine's float glue does
(``h`` rounded to the activation dtype), and emits, by ``mode``:

``float``  ``h`` itself (no quantizer);
``fake``   ``q * scale`` in the activation dtype: what the simulated model feeds its matmul (for
           weight-only kernels: decode);
``codes``  integer codes ``q - z`` as int8 or FP8 e4m3 (integers up to 16 are exact in e4m3), the
           per-row ``scale`` in float32 and, if asked, the row sums of the codes (int32), for GEMMs
           that apply the scales in their epilogue (prefill).

Rounding is round-half-to-even, as ``torch.round``; divisions are IEEE. What can differ from the
eager simulated model is ``h`` itself by an ulp (reduction order of the RMSNorm variance, ``exp``)
and therefore a code at an exact rounding tie: ``check_codes`` separates the two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from ..quant.quantizer import qparams
from ..quant.state import ActQuant
from . import triton_matmul as tk

FP8 = getattr(torch, "float8_e4m3fn", None)
MODES = ("float", "fake", "codes")


@dataclass
class Prepared:
    """A linear layer's input as made by a fused producer: ``fake`` (quantize-dequantized values in
    the activation dtype) or ``codes`` (integer codes, per-row float32 scales, optional row sums)."""

    kind: str
    x: torch.Tensor
    scale: torch.Tensor | None = None
    rowsum: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return self.x.shape[0]


@dataclass(frozen=True)
class InputMode:
    """What a layer's chosen kernel wants from the producer of its input."""

    kind: str = "float"  # float | fake | codes
    fp8: bool = False
    rowsum: bool = False


FLOAT_INPUT = InputMode()


# ---------------------------------------------------------------------------- torch reference

def _codes_torch(h: torch.Tensor, act: ActQuant):
    """(codes q - z as float, scale [M, 1], zero [M, 1]) of ``h`` with the simulated quantizer's math."""
    if act.granularity == "per_token":
        scale, zero = qparams(h, act.bits, act.sym, act.clip_ratio, dim=-1)
    else:
        scale = act.scale.to(h.device).float().reshape(1, 1).expand(h.shape[0], 1)
        zero = act.zero.to(h.device).float().reshape(1, 1).expand(h.shape[0], 1)
    q = torch.round(h.float() / scale) + zero
    return q.clamp(0, 2 ** act.bits - 1) - zero, scale, zero


def emit_torch(h: torch.Tensor, act: ActQuant | None, mode: InputMode):
    """The producers' output for an already computed ``h`` (CPU, or where Triton is absent)."""
    if mode.kind == "float" or act is None:
        return h
    q, scale, _ = _codes_torch(h, act)
    if mode.kind == "fake":
        return Prepared("fake", (q * scale).to(h.dtype))
    codes = q.to(FP8) if mode.fp8 else q.to(torch.int8)
    rowsum = q.sum(-1).to(torch.int32) if mode.rowsum else None
    return Prepared("codes", codes, scale.reshape(-1).contiguous(), rowsum)


def rms_norm_torch(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    var = xf.pow(2).mean(-1, keepdim=True)
    return w * (xf * torch.rsqrt(var + eps)).to(x.dtype)


def silu_mul_torch(gu: torch.Tensor) -> torch.Tensor:
    half = gu.shape[-1] // 2
    return F.silu(gu[..., :half]) * gu[..., half:]


# ---------------------------------------------------------------------------- Triton kernels

if tk.HAS_TRITON:
    import triton
    import triton.language as tl

    # helpers called from the kernels: jitted on the GPU; under the interpreter plain Python (the
    # interpreter would re-patch its builtins on every nested call of every row, ~100x slower)
    _helper = (lambda f: f) if tk.INTERPRET else triton.jit

    @_helper
    def _rne(v):
        """Round half to even (torch.round) for |v| < 2**22."""
        r = tl.floor(v + 0.5)
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
        return tl.where(((r - v) == 0.5) & odd, r - 1.0, r)

    @_helper
    def _emit(h, offs, mask, row, out_ptr, stride_out, scale_ptr, rowsum_ptr, s_ptr, z_ptr, clip,
              MODE: tl.constexpr, BITS: tl.constexpr, SYM: tl.constexpr, PER_TOKEN: tl.constexpr,
              ROWSUM: tl.constexpr):
        """Store ``h`` (fp32 values of the activation dtype; masked lanes 0) as MODE asks; ``h``,
        ``offs`` and ``mask`` of one row, of any rank (reductions are over every axis: the online
        Hadamard's row is a 2-D tile). Divisions are IEEE (``div_rn``; Triton's ``/`` is not), as torch's."""
        if MODE == 0:
            tl.store(out_ptr + row * stride_out + offs, h.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            LEVELS: tl.constexpr = (1 << BITS) - 1
            if PER_TOKEN:
                if SYM:
                    QMAX: tl.constexpr = (1 << (BITS - 1)) - 1
                    amax = tl.max(tl.abs(h), axis=None) * clip
                    scale = tl.maximum(tl.math.div_rn(amax, QMAX * 1.0), 1e-8)
                    zero = (1 << (BITS - 1)) * 1.0
                else:
                    xmin = tl.minimum(tl.min(h, axis=None), 0.0) * clip
                    xmax = tl.maximum(tl.max(h, axis=None), 0.0) * clip
                    scale = tl.maximum(tl.math.div_rn(xmax - xmin, LEVELS * 1.0), 1e-8)
                    zero = tl.minimum(tl.maximum(_rne(tl.math.div_rn(-xmin, scale)), 0.0), LEVELS)
            else:
                scale = tl.load(s_ptr)
                zero = tl.load(z_ptr)
            q = _rne(tl.math.div_rn(h, scale + tl.zeros_like(h))) + zero
            q = tl.minimum(tl.maximum(q, 0.0), LEVELS) - zero
            if MODE == 1:
                tl.store(out_ptr + row * stride_out + offs, (q * scale).to(out_ptr.dtype.element_ty),
                         mask=mask)
            else:
                tl.store(out_ptr + row * stride_out + offs, q.to(out_ptr.dtype.element_ty), mask=mask)
                tl.store(scale_ptr + row, scale)
                if ROWSUM:
                    tl.store(rowsum_ptr + row, tl.sum(tl.where(mask, q, 0.0), axis=None).to(tl.int32))

    @triton.jit
    def _norm_q_kernel(res_ptr, delta_ptr, w_ptr, res_out_ptr, out_ptr, scale_ptr, rowsum_ptr,
                       s_ptr, z_ptr, K, stride_res, stride_delta, stride_res_out, stride_out, eps, clip,
                       HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr, MODE: tl.constexpr,
                       BITS: tl.constexpr, SYM: tl.constexpr, PER_TOKEN: tl.constexpr,
                       ROWSUM: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < K
        x = tl.load(res_ptr + row * stride_res + offs, mask=mask, other=0.0)
        if HAS_DELTA:
            d = tl.load(delta_ptr + row * stride_delta + offs, mask=mask, other=0.0)
            x = x + d  # rounded to the activation dtype, as the eager add
            tl.store(res_out_ptr + row * stride_res_out + offs, x, mask=mask)
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, axis=0) / K
        n = (xf * tl.rsqrt(var + eps)).to(x.dtype)  # torch.rsqrt: rsqrtf on the GPU
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(x.dtype)
        h = (w * n).to(tl.float32)
        _emit(h, offs, mask, row, out_ptr, stride_out, scale_ptr, rowsum_ptr, s_ptr, z_ptr, clip,
              MODE, BITS, SYM, PER_TOKEN, ROWSUM)

    @triton.jit
    def _silu_q_kernel(gu_ptr, out_ptr, scale_ptr, rowsum_ptr, s_ptr, z_ptr, K, stride_gu, stride_out,
                       clip, BLOCK: tl.constexpr, MODE: tl.constexpr, BITS: tl.constexpr,
                       SYM: tl.constexpr, PER_TOKEN: tl.constexpr, ROWSUM: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < K
        g = tl.load(gu_ptr + row * stride_gu + offs, mask=mask, other=0.0)
        u = tl.load(gu_ptr + row * stride_gu + K + offs, mask=mask, other=0.0)
        gf = g.to(tl.float32)
        s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
        h = (s * u).to(tl.float32)
        _emit(h, offs, mask, row, out_ptr, stride_out, scale_ptr, rowsum_ptr, s_ptr, z_ptr, clip,
              MODE, BITS, SYM, PER_TOKEN, ROWSUM)

    @triton.jit
    def _rows_q_kernel(x_ptr, out_ptr, scale_ptr, rowsum_ptr, s_ptr, z_ptr, K, T, D,
                       stride_b, stride_t, stride_h, stride_out, clip,
                       BLOCK: tl.constexpr, MODE: tl.constexpr, BITS: tl.constexpr, SYM: tl.constexpr,
                       PER_TOKEN: tl.constexpr, ROWSUM: tl.constexpr):
        # row r = (b, t); column c = (h, d), d contiguous: reads [B, T, H, D] views such as the
        # attention output's transpose without materialising it
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < K
        b = row // T
        t = row % T
        ptr = x_ptr + b * stride_b + t * stride_t + (offs // D) * stride_h + offs % D
        h = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
        _emit(h, offs, mask, row, out_ptr, stride_out, scale_ptr, rowsum_ptr, s_ptr, z_ptr, clip,
              MODE, BITS, SYM, PER_TOKEN, ROWSUM)


def _warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def _outputs(rows: int, K: int, device, dtype, act: ActQuant | None, mode: InputMode):
    kind = mode.kind if act is not None else "float"
    if kind == "codes":
        out = torch.empty(rows, K, device=device, dtype=FP8 if mode.fp8 else torch.int8)
        scale = torch.empty(rows, device=device, dtype=torch.float32)
        rowsum = torch.empty(rows, device=device, dtype=torch.int32) if mode.rowsum else None
    else:
        out = torch.empty(rows, K, device=device, dtype=dtype)
        scale = rowsum = None
    return kind, out, scale, rowsum


_CONST: dict = {}


def _const(key, make):
    """Small device tensors made once (not in every call: a decode step is captured in a CUDA graph,
    and each fresh one would be another kernel launch or a host copy inside it)."""
    if key not in _CONST:
        _CONST[key] = make()
    return _CONST[key]


def _act_args(act: ActQuant | None, device):
    """(bits, sym, per_token, clip, static scale tensor, static zero tensor) for the kernels."""
    dummy = _const(("dummy", str(device)), lambda: torch.zeros(1, device=device, dtype=torch.float32))
    if act is None:
        return 8, True, True, 1.0, dummy, dummy
    per_token = act.granularity == "per_token"
    if per_token:
        s = z = dummy
    else:  # static range: copied to the device once, kept with the quantizer it belongs to
        cache = act.__dict__.setdefault("_device_ranges", {})
        if str(device) not in cache:
            cache[str(device)] = (act.scale.to(device=device, dtype=torch.float32).reshape(1).clone(),
                                  act.zero.to(device=device, dtype=torch.float32).reshape(1).clone())
        s, z = cache[str(device)]
    return act.bits, bool(act.sym), per_token, float(act.clip_ratio), s, z


def _wrap(kind, out, scale, rowsum):
    if kind == "float":
        return out
    return Prepared(kind, out, scale, rowsum)


def use_triton(device) -> bool:
    return tk.available(device)


def add_rms_norm_q(res: torch.Tensor, delta: torch.Tensor | None, w: torch.Tensor, eps: float,
                   act: ActQuant | None, mode: InputMode):
    """``(res + delta, quantizer(rms_norm(res + delta) * w))``; ``delta`` None: no add (res returned)."""
    if not use_triton(res.device):
        new = res if delta is None else res + delta
        return new, emit_torch(rms_norm_torch(new, w, eps), act, mode)
    rows, K = res.shape
    block = triton.next_power_of_2(K)
    kind, out, scale, rowsum = _outputs(rows, K, res.device, res.dtype, act, mode)
    bits, sym, per_token, clip, s, z = _act_args(act, res.device)
    new = torch.empty_like(res) if delta is not None else res
    d = delta if delta is not None else res
    _norm_q_kernel[(rows,)](res, d, w, new, out, scale if scale is not None else s,
                            rowsum if rowsum is not None else s, s, z, K, res.stride(0), d.stride(0),
                            new.stride(0), out.stride(0), float(eps), clip,
                            HAS_DELTA=delta is not None, BLOCK=block, MODE=MODES.index(kind), BITS=bits,
                            SYM=sym, PER_TOKEN=per_token, ROWSUM=rowsum is not None,
                            num_warps=_warps(block))
    return new, _wrap(kind, out, scale, rowsum)


def silu_mul_q(gu: torch.Tensor, act: ActQuant | None, mode: InputMode):
    """``quantizer(silu(gu[:, :I]) * gu[:, I:])`` for the fused gate/up output ``gu [M, 2I]``."""
    if not use_triton(gu.device):
        return emit_torch(silu_mul_torch(gu), act, mode)
    rows, two_k = gu.shape
    K = two_k // 2
    block = triton.next_power_of_2(K)
    kind, out, scale, rowsum = _outputs(rows, K, gu.device, gu.dtype, act, mode)
    bits, sym, per_token, clip, s, z = _act_args(act, gu.device)
    _silu_q_kernel[(rows,)](gu, out, scale if scale is not None else s, rowsum if rowsum is not None else s,
                            s, z, K, gu.stride(0), out.stride(0), clip, BLOCK=block,
                            MODE=MODES.index(kind), BITS=bits, SYM=sym, PER_TOKEN=per_token,
                            ROWSUM=rowsum is not None, num_warps=_warps(block))
    return _wrap(kind, out, scale, rowsum)


def rows_q(x: torch.Tensor, act: ActQuant | None, mode: InputMode):
    """``quantizer(x)`` row by row for ``x [M, K]`` (K contiguous), or for a ``[B, T, H, D]`` view
    (D contiguous; rows are (b, t), columns (h, d)), e.g. the attention output's transpose."""
    if x.dim() == 2:
        B, T, H, D = 1, x.shape[0], 1, x.shape[1]
        sb, st, sh = 0, x.stride(0), 0
        if x.stride(1) != 1:
            x = x.contiguous()
            st = x.stride(0)
    elif x.dim() == 4:
        B, T, H, D = x.shape
        sb, st, sh = x.stride(0), x.stride(1), x.stride(2)
        if x.stride(3) != 1:
            raise ValueError("rows_q reads [B, T, H, D] views with contiguous D")
    else:
        raise ValueError(f"rows_q takes [M, K] or [B, T, H, D], got {tuple(x.shape)}")
    rows, K = B * T, H * D
    if not use_triton(x.device):
        return emit_torch(x.reshape(rows, K), act, mode)
    block = triton.next_power_of_2(K)
    kind, out, scale, rowsum = _outputs(rows, K, x.device, x.dtype, act, mode)
    bits, sym, per_token, clip, s, z = _act_args(act, x.device)
    _rows_q_kernel[(rows,)](x, out, scale if scale is not None else s, rowsum if rowsum is not None else s,
                            s, z, K, T, D, sb, st, sh, out.stride(0), clip, BLOCK=block,
                            MODE=MODES.index(kind), BITS=bits, SYM=sym, PER_TOKEN=per_token,
                            ROWSUM=rowsum is not None, num_warps=_warps(block))
    return _wrap(kind, out, scale, rowsum)


# ---------------------------------------------------------------------------- checks

TIE_WIDTH = 1e-3  # as real.TIE_WIDTH: a quotient within this many steps of k + 1/2 is a tie


def ulp(h: torch.Tensor) -> torch.Tensor:
    """The spacing of ``h``'s own dtype at each element (float64): ``eps * 2**floor(log2|h|)``, and
    the smallest subnormal at zero."""
    fi = torch.finfo(h.dtype)
    _, e = torch.frexp(h.float().abs())
    return (fi.eps * torch.pow(2.0, e.double() - 1)).clamp_min(fi.tiny * fi.eps)


def check_codes(h: torch.Tensor, prepared: Prepared, act: ActQuant) -> dict:
    """Codes (or fake values) of a fused producer against the simulated quantizer applied to the
    same ``h``: every difference must be one step where one ulp of ``h``'s dtype (or a rounding tie)
    can move the quotient across a half step -- the producer computes its value in its own reduction
    order, which may differ from ``h``'s by an ulp (``non_tie`` counts the others; ``ulp_flips`` those
    that are not exact ties). Scales must agree to the last bit (``scale_mismatch`` rows) except where
    the row's amax one ulp away gives the producer's scale (``ulp_scales``; those rows' codes are then
    checked with that scale), and row sums must be the sums of the codes emitted (``rowsum_mismatch``)."""
    q, scale, zero = _codes_torch(h, act)
    ulp_scales = 0
    if prepared.kind == "fake":
        got_val = prepared.x.double()
        want_val = (q * scale).to(h.dtype).double()
        diff = got_val != want_val
        scale_bad = 0
    else:
        got_s, want_s = prepared.scale.double().reshape(-1), scale.reshape(-1).double()
        bad_rows = got_s != want_s
        if bad_rows.any() and act.sym and act.granularity == "per_token":
            # the row's amax one ulp of h's dtype off (the producer's own value): the scale moves by
            # at most that ulp relative to amax, plus the float32 rounding of the division
            amax = h.abs().amax(-1)
            reach = ulp(amax).reshape(-1) / amax.double().clamp_min(1e-30) + 2 * torch.finfo(torch.float32).eps
            moved = bad_rows & ((got_s - want_s).abs() / want_s <= reach)
            ulp_scales = int(moved.sum())
            bad_rows &= ~moved
            # those rows' codes are compared with the producer's own scale
            scale = torch.where(moved[:, None], prepared.scale.float().reshape(-1, 1), scale)
            q = (torch.round(h.float() / scale) + zero).clamp(0, 2 ** act.bits - 1) - zero
        got_q = prepared.x.float().double()
        diff = got_q != q.double()
        scale_bad = int(bad_rows.sum())
    out = {"elements": int(h.numel()), "mismatches": int(diff.sum()), "non_tie": 0, "ulp_flips": 0,
           "scale_mismatch": scale_bad, "ulp_scales": ulp_scales}
    if out["mismatches"]:
        s64 = scale.double().expand_as(diff)
        quot = (h.double() / scale.double() + zero.double()).expand_as(diff)[diff]
        dist = ((quot - quot.floor()) - 0.5).abs()
        reach = ulp(h).expand_as(diff)[diff] / s64[diff]  # one ulp of h, in steps
        out["ulp_flips"] = int(((dist > TIE_WIDTH) & (dist <= TIE_WIDTH + reach)).sum())
        bad = dist > TIE_WIDTH + reach
        if prepared.kind == "codes":
            bad |= (prepared.x.float().double()[diff] - q.double()[diff]).abs() > 1
        else:
            bad |= (got_val[diff] - want_val[diff]).abs() > 1.5 * s64[diff]
        out["non_tie"] = int(bad.sum())
    if prepared.kind == "codes" and prepared.rowsum is not None:
        out["rowsum_mismatch"] = int((prepared.rowsum.long() != prepared.x.float().sum(-1).long()).sum())
    return out
