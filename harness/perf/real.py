"""Real-kernel linear layers built from a ``LinearQuant``, with the kernel chosen per phase.

``RealLinear`` keeps the weights in their deployed form (int4 packed two a byte, or int8 bytes, or
fp16 for the float reference) and computes with one of several kernels:

decode (a few rows, weight-bandwidth bound)
    ``triton-int4-gemv`` / ``triton-int4-dot`` / ``triton-int8-*``: fused dequant matmul (fp16 math,
    same dequantized weights as the simulated model). With an activation quantizer the input is
    first fake-quantized per token on the GPU, exactly as the simulated model does.
prefill (hundreds of rows, compute bound)
    with activation quantization and per-channel weights: ``triton-fp8-gemm`` (FP8 e4m3 tensor
    cores; 4-bit codes are exact in e4m3) or ``triton-int8-gemm`` (INT8 tensor cores), activation
    codes made per token on the GPU, scales in the epilogue; or the torch equivalents
    ``torch-scaled_mm-fp8`` / ``torch-int_mm-int8`` (+ a separate epilogue);
    weight-only: ``triton-int4-dot`` (fused dequant GEMM) or ``dequant-fp16+cublas``.
everything float: ``cublas-fp16``.

Where no real kernel fits (activation quantization with grouped weights, asymmetric 8-bit
activations) the phase runs the simulated arithmetic and is labelled ``simulated``.
The choice among candidates is made by ``select_kernels``: each candidate is checked against the
simulated arithmetic on random inputs and timed; the fastest that passes wins.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from ..quant.quantizer import qparams
from ..quant.simulated import quantize_activation
from ..quant.state import ActQuant, LinearQuant
from . import triton_kernels as tk
from .packing import pack_int4, storage_format, to_int8_storage

FP8 = getattr(torch, "float8_e4m3fn", None)
DECODE_MAX_ROWS = 64  # inputs with at most this many rows use the decode kernels
TINYGEMM = "torch-int4pack"  # torch._weight_int4pack_mm (tinygemm): bf16 activations, int4 weights
TINYGEMM_INNER_K_TILES = 8
OPT_IN_KERNELS = (TINYGEMM,)  # offered only when named in ``--kernels`` (see RealLinear.candidates)
KERNEL_TOL = 1e-2  # relative error of a kernel against the simulated arithmetic on random inputs

_COMPILE = {"on": False}


def set_compile(on: bool) -> None:
    """Compile the small torch helpers (activation quantizers, epilogues) with inductor."""
    _COMPILE["on"] = bool(on)
    _compiled_cache.clear()


_compiled_cache: dict = {}


def _maybe_compiled(fn):
    if not _COMPILE["on"]:
        return fn
    if fn not in _compiled_cache:
        _compiled_cache[fn] = torch.compile(fn, dynamic=True)
    return _compiled_cache[fn]


# ---------------------------------------------------------------------------- activation helpers

def act_int_bounds(act: ActQuant) -> tuple[int, int]:
    """Smallest and largest ``q - z`` an activation quantizer produces."""
    if act.sym:
        return -(2 ** (act.bits - 1)), 2 ** (act.bits - 1) - 1
    return -(2 ** act.bits - 1), 2 ** act.bits - 1


def _act_codes_impl(x: torch.Tensor, bits: int, sym: bool, clip: float, per_token: bool,
                    scale_t: torch.Tensor | None, zero_t: torch.Tensor | None, to_fp8: bool,
                    want_rowsum: bool):
    if per_token:
        scale, zero = qparams(x, bits, sym, clip, dim=-1)
    else:
        scale, zero = scale_t, zero_t
    q = torch.round(x.float() / scale) + zero
    q = q.clamp(0, 2 ** bits - 1) - zero
    codes = q.to(FP8) if to_fp8 else q.to(torch.int8)
    sa = scale.float().expand(x.shape[0], 1).reshape(-1).contiguous()
    rowsum = q.sum(dim=-1).to(torch.int32) if want_rowsum else None
    return codes, sa, rowsum


def act_codes(x: torch.Tensor, act: ActQuant, to_fp8: bool, want_rowsum: bool = False):
    """Integer activation codes ``q - z`` (fp8 or int8) of ``x [M, K]``, row scales ``[M]``, row sums."""
    per_token = act.granularity == "per_token"
    st = None if per_token else act.scale.to(x.device).float().reshape(1, 1)
    zt = None if per_token else act.zero.to(x.device).float().reshape(1, 1)
    return _maybe_compiled(_act_codes_impl)(x, act.bits, act.sym, float(act.clip_ratio), per_token,
                                            st, zt, to_fp8, want_rowsum)


def _act_fake_impl(x: torch.Tensor, act: ActQuant) -> torch.Tensor:
    return quantize_activation(x, act)


def act_fake(x: torch.Tensor, act: ActQuant) -> torch.Tensor:
    """The simulated model's activation quantizer, on the GPU (compiled when enabled)."""
    return _maybe_compiled(_act_fake_impl)(x, act)


TIE_WIDTH = 1e-3  # a quotient x / scale within this many steps of k + 1/2 is a rounding tie


def quantizer_ties(x: torch.Tensor, act: ActQuant, engine_quantizer=None) -> dict:
    """Where the engine's activation quantizer and the simulated model's disagree, and whether
    every disagreement is a rounding tie.

    The engine quantizes with a compiled kernel, the simulated model in eager PyTorch; both compute
    ``round(x / scale)`` in float32, but a compiler may form the scale or the quotient one ulp apart.
    That matters only where the exact quotient is a half-integer, which fp16 activations make
    common: ``7 x / amax`` of two fp16 numbers is exactly k + 1/2 about once per 5120-wide row at
    4 bits, and one such code moved by a step is ~1e-2 relative error on a layer's output. A
    disagreement anywhere else (not within ``TIE_WIDTH`` of a half step, or more than one step) is
    a real difference and is counted in ``non_tie``.
    """
    engine_quantizer = engine_quantizer or act_fake
    ref = quantize_activation(x, act).double()
    got = engine_quantizer(x, act).double()
    diff = got != ref
    out = {"elements": int(x.numel()), "mismatches": int(diff.sum()), "non_tie": 0}
    if out["mismatches"] == 0:
        return out
    x64 = x.double()
    if act.granularity == "per_token":
        scale, zero = qparams(x64, act.bits, act.sym, act.clip_ratio, dim=-1)
        scale, zero = scale.double(), zero.double()
    else:
        scale = act.scale.to(x.device).double()
        zero = act.zero.to(x.device).double()
    quotient = (x64 / scale + zero).expand_as(x64)[diff]
    step = scale.expand_as(x64)[diff]
    frac = quotient - quotient.floor()
    tie = (frac - 0.5).abs() <= TIE_WIDTH
    one_step = (got[diff] - ref[diff]).abs() <= 1.5 * step
    out["non_tie"] = int((~(tie & one_step)).sum())
    return out


def _epilogue_impl(acc, sa, sw, zc, rowsum, out_dtype: torch.dtype):
    if zc is not None:
        acc = acc - zc.to(acc.dtype)[None, :] * rowsum.to(acc.dtype)[:, None]
    return (acc.float() * sa[:, None] * sw[None, :]).to(out_dtype)


def epilogue(acc, sa, sw, zc=None, rowsum=None, out_dtype=torch.float16):
    return _maybe_compiled(_epilogue_impl)(acc, sa, sw, zc, rowsum, out_dtype)


def _unpack_to_impl(packed: torch.Tensor, zero: torch.Tensor, to_fp8: bool) -> torch.Tensor:
    lo = (packed & 0x0F).to(torch.int16)
    hi = (packed >> 4).to(torch.int16)
    codes = torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)
    w = codes - zero.to(torch.int16)
    return w.to(torch.float32).to(FP8) if to_fp8 else w.to(torch.int8)


def unpack_to(packed, zero, to_fp8):
    return _maybe_compiled(_unpack_to_impl)(packed, zero, to_fp8)


def _dequant_impl(wdata, scale, zero, packed: bool, dtype):
    if packed:
        q = torch.stack([wdata & 0x0F, wdata >> 4], dim=-1).reshape(wdata.shape[0], -1).float()
    else:
        q = wdata.float()
    n, k = q.shape
    g = scale.shape[1]
    w = (q.view(n, g, k // g) - zero[:, :, None]) * scale[:, :, None]
    return w.view(n, k).to(dtype)


# ---------------------------------------------------------------------------- the layer

def tinygemm_operands(wdata: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int, g: int):
    """Our int4 packing and ranges as tinygemm's inputs, before its tiling.

    Returns uint8 ``[N, K/2]`` with the even code of each byte in the high nibble, and bf16
    ``scales_and_zeros [K/g, N, 2]`` such that ``(q - 8) * scale + zero == (q - z) * s``.
    """
    swapped = (((wdata & 0x0F) << 4) | (wdata >> 4)).contiguous()
    rep = group // g
    s = scale.float().repeat_interleave(rep, dim=1)
    z = zero.float().repeat_interleave(rep, dim=1)
    sz = torch.stack([s.t(), ((8 - z) * s).t()], dim=-1).to(torch.bfloat16).contiguous()
    return swapped, sz


@dataclass
class KernelRecord:
    """What ``select_kernels`` found for one group of same-shaped layers and one phase."""

    phase: str
    rows: int
    shape: tuple[int, int]
    chosen: str
    candidates: dict[str, dict] = field(default_factory=dict)
    quantizer: dict | None = None  # activation quantizer vs the simulated model's (quantizer_ties)


class RealLinear(nn.Module):
    """``y = x @ W.T (+ b)`` with ``W`` in deployed form; see the module docstring for kernels."""

    def __init__(self, in_features: int, out_features: int, *, weight: torch.Tensor | None = None,
                 wdata: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                 zero: torch.Tensor | None = None, bits: int = 16, act: ActQuant | None = None,
                 bias: torch.Tensor | None = None, name: str = ""):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits = bits
        self.act = act
        self.name = name
        self.fmt = "float" if wdata is None else storage_format(bits)
        if self.fmt == "float":
            self.register_buffer("weight", weight)
        else:
            self.register_buffer("wdata", wdata)
            self.register_buffer("scale", scale.float().contiguous())
            self.register_buffer("zero", zero.float().contiguous())  # int4: z; int8: z - 2**(b-1)
            self.group = in_features // scale.shape[1]
            # int8 storage whose zero point is not the storage offset needs the row-sum correction;
            # decided here, once, so that the forward never syncs (CUDA graphs)
            self.corr = self.fmt == "int8" and bool((self.zero != 0).any())
        self.register_buffer("bias", bias)
        self.choice: dict[str, str] = {}
        self.tg = None  # tinygemm layout (packed, scales_and_zeros, group), built on first use

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_quant(cls, lq: LinearQuant, linear: nn.Linear | None, *, device, dtype,
                   name: str = "") -> "RealLinear":
        """The deployed form of one state entry (``linear``: the float layer, for shape and bias)."""
        bias = None
        if linear is not None and linear.bias is not None:
            bias = linear.bias.detach().to(device=device, dtype=dtype)
        if lq.codes is None:
            if lq.weight is not None:
                w = lq.weight
            elif linear is not None:
                w = linear.weight.detach()
            else:
                raise ValueError(f"{name}: float layer without a weight")
            w = w.to(device=device, dtype=dtype).contiguous()
            return cls(w.shape[1], w.shape[0], weight=w, bits=16, act=lq.act, bias=bias, name=name)
        codes = lq.codes.to(device)
        out_f, in_f = codes.shape
        if storage_format(lq.bits) == "int4":
            wdata, zero = pack_int4(codes), lq.zero.to(device).float()
        else:
            wdata, zero = to_int8_storage(codes, lq.zero.to(device), lq.bits)
        return cls(in_f, out_f, wdata=wdata, scale=lq.scale.to(device), zero=zero, bits=lq.bits,
                   act=lq.act, bias=bias, name=name)

    @classmethod
    def from_linear(cls, linear: nn.Linear, name: str = "") -> "RealLinear":
        w = linear.weight.detach()
        b = None if linear.bias is None else linear.bias.detach()
        return cls(w.shape[1], w.shape[0], weight=w, bias=b, name=name)

    @staticmethod
    def can_concat(parts: list["RealLinear"]) -> bool:
        first = parts[0]
        same_act = all((p.act is None) == (first.act is None) and
                       (p.act is None or p.act.to_meta() == first.act.to_meta()) and
                       (p.act is None or p.act.granularity == "per_token") for p in parts)
        if not same_act or any(p.in_features != first.in_features or p.fmt != first.fmt for p in parts):
            return False
        if first.fmt != "float":
            if any(p.bits != first.bits or p.scale.shape[1] != first.scale.shape[1] for p in parts):
                return False
        return all((p.bias is None) == (first.bias is None) for p in parts)

    @classmethod
    def concat(cls, parts: list["RealLinear"], name: str = "") -> "RealLinear":
        """One layer computing ``parts`` side by side (q/k/v or gate/up: one launch, same input)."""
        if not cls.can_concat(parts):
            raise ValueError("these layers differ in input, format or activation quantizer")
        first = parts[0]
        out_f = sum(p.out_features for p in parts)
        bias = None if first.bias is None else torch.cat([p.bias for p in parts])
        if first.fmt == "float":
            return cls(first.in_features, out_f, weight=torch.cat([p.weight for p in parts]),
                       act=first.act, bias=bias, name=name)
        new = cls(first.in_features, out_f, wdata=torch.cat([p.wdata for p in parts]),
                  scale=torch.cat([p.scale for p in parts]), zero=torch.cat([p.zero for p in parts]),
                  bits=first.bits, act=first.act, bias=bias, name=name)
        return new  # int8 parts already hold the shifted zero, concatenated as is

    # -- reference arithmetic ----------------------------------------------------------------

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The float weight the simulated model uses: ``fp((code - zero) * scale)``."""
        if self.fmt == "float":
            return self.weight.to(dtype)
        if self.wdata is None:
            raise RuntimeError(f"{self.name}: weights are kept in tinygemm's layout only; "
                               "dequantize before finalize_storage()")
        if _COMPILE["on"]:
            return _maybe_compiled(_dequant_impl)(self.wdata, self.scale, self.zero, self.fmt == "int4", dtype)
        if self.fmt == "int4":
            from .packing import unpack_int4

            q = unpack_int4(self.wdata).float()
        else:
            q = self.wdata.float()
        rep = self.in_features // self.scale.shape[1]
        z = self.zero.repeat_interleave(rep, dim=1)
        s = self.scale.repeat_interleave(rep, dim=1)
        return ((q - z) * s).to(dtype)

    def simulated(self, x: torch.Tensor) -> torch.Tensor:
        """What the simulated ``FakeQuantLinear`` computes for the same state entry."""
        if self.act is not None:
            x = quantize_activation(x, self.act)
        return F.linear(x, self.dequantized(x.dtype), self.bias)

    # -- torch's tinygemm int4 weight-only matmul ---------------------------------------------

    def tinygemm_group(self) -> int | None:
        """Group size for ``torch._weight_int4pack_mm`` (32..256), or None where it can't serve.

        Weight-only 4-bit layers only. Per-channel ranges become groups of 256 with the scale
        repeated (exact); groups of ours that are a multiple of a tinygemm group size likewise.
        """
        if self.fmt not in ("int4", "int4-tinygemm") or self.act is not None:
            return None
        for g in (256, 128, 64, 32):
            if self.group % g == 0 and self.in_features % g == 0:
                return g
        return None

    def _tinygemm(self):
        """(packed weight, scales_and_zeros, group) in tinygemm's layout, built once per layer.

        tinygemm dequantizes ``(q - 8) * scale + zero`` in bf16, with the even code of a byte in
        the high nibble (ours: low nibble). Our ``(q - z) * s`` is the same with ``zero = (8 - z) s``.
        """
        if self.tg is None:
            g = self.tinygemm_group()
            swapped, sz = tinygemm_operands(self.wdata, self.scale, self.zero, self.group, g)
            packed = torch._convert_weight_to_int4pack(swapped, TINYGEMM_INNER_K_TILES)
            self.tg = (packed, sz, g)
        return self.tg

    def finalize_storage(self) -> None:
        """Keep one weight layout: tinygemm's when both phases run tinygemm (drop our packing)."""
        if self.choice.get("decode") == TINYGEMM and self.choice.get("prefill") == TINYGEMM:
            packed, sz, g = self._tinygemm()
            self.wdata = None
            self.register_buffer("tg_packed", packed)
            self.register_buffer("tg_scales_zeros", sz)
            self.tg = (self.tg_packed, self.tg_scales_zeros, g)
            self.fmt = "int4-tinygemm"
        else:
            self.tg = None  # built while timing the candidate; not deployed

    # -- kernels -----------------------------------------------------------------------------

    @property
    def per_channel(self) -> bool:
        return self.fmt != "float" and self.scale.shape[1] == 1

    def int_compute(self) -> str | None:
        """'fp8' or 'int8' when the prefill can run on integer tensor cores, else None."""
        if self.act is None or self.fmt == "float" or not self.per_channel or FP8 is None:
            return None
        lo, hi = act_int_bounds(self.act)
        if self.fmt == "int4" and -16 <= lo and hi <= 16:  # integers up to 16 are exact in e4m3
            return "fp8"
        if -128 <= lo and hi <= 127:
            return "int8"
        return None

    def candidates(self, phase: str, device, opt_in: list[str] | tuple = ()) -> list[str]:
        """Kernel names to try for ``phase``. ``opt_in`` may name TINYGEMM, which is not offered
        by default: bf16 activations missed the end-to-end gate (relative logit error 0.035 on
        7B, 0.047 on 13B, H100) and, its layout being the only one kept, prefill at 647 rows ran
        ~24x slower than cuBLAS (docs/benchmarks/perf.md)."""
        cuda = str(device).startswith("cuda")
        trit = tk.available(device)
        if self.fmt == "float":
            return ["cublas-fp16" if cuda else "torch-float"]
        out = []
        tiny = cuda and self.tinygemm_group() is not None and TINYGEMM in (opt_in or ())
        if phase == "prefill" and self.choice.get("decode") == TINYGEMM:
            return [TINYGEMM]  # the weights will be kept in tinygemm's layout only (finalize_storage)
        if phase == "decode":
            if tiny:
                out.append(TINYGEMM)
            if trit:
                out += [f"triton-{self.fmt}-gemv2", f"triton-{self.fmt}-gemv", f"triton-{self.fmt}-dot"]
        else:
            comp = self.int_compute()
            if comp is not None:
                if trit:
                    out.append(f"triton-{comp}-gemm")
                if comp == "fp8":
                    out += ["torch-scaled_mm-fp8", "torch-scaled_mm-fp8-fastacc"]
                else:
                    out.append("torch-int_mm-int8")
            elif trit:
                if self.act is None:
                    out.append(f"triton-{self.fmt}-dot")
        if self.act is None:
            out.append("dequant-fp16+cublas" if cuda else "dequant+torch")
        else:
            out.append("simulated")
        return out

    def run(self, kernel: str, x: torch.Tensor, prequantized: bool = False) -> torch.Tensor:
        """Compute the layer on ``x [M, K]`` with the named kernel."""
        if kernel in ("cublas-fp16", "torch-float"):
            return F.linear(x, self.weight, self.bias)
        if kernel == "simulated":
            xq = x if (prequantized or self.act is None) else act_fake(x, self.act)
            return F.linear(xq, self.dequantized(x.dtype), self.bias)
        if kernel in ("dequant-fp16+cublas", "dequant+torch"):
            xq = x if (prequantized or self.act is None) else act_fake(x, self.act)
            return F.linear(xq, self.dequantized(x.dtype), self.bias)
        if kernel == TINYGEMM:
            packed, sz, g = self._tinygemm()
            y = torch._weight_int4pack_mm(x.to(torch.bfloat16).contiguous(), packed, g, sz).to(x.dtype)
            return y if self.bias is None else y + self.bias
        if kernel.endswith("-gemv2"):
            xq = x if (prequantized or self.act is None) else act_fake(x, self.act)
            y = tk.wq_gemv2(xq, self.wdata, self.scale, self.zero, 4 if self.fmt == "int4" else 8, self.group)
            return y if self.bias is None else y + self.bias
        if kernel.endswith("-gemv") or kernel.endswith("-dot"):
            xq = x if (prequantized or self.act is None) else act_fake(x, self.act)
            y = tk.wq_matmul(xq, self.wdata, self.scale, self.zero, self.fmt == "int4", self.group,
                             mode="gemv" if kernel.endswith("-gemv") else "dot")
            return y if self.bias is None else y + self.bias
        # integer tensor-core paths: quantize the activation to codes here
        to_fp8 = "fp8" in kernel
        corr = self.corr
        codes, sa, rowsum = act_codes(x, self.act, to_fp8, want_rowsum=corr)
        sw = self.scale[:, 0]
        zw = self.zero[:, 0]
        if kernel.startswith("triton-"):
            y = tk.scaled_gemm(codes, self.wdata, zw.contiguous(), sa, sw.contiguous(), rowsum,
                               wfmt=1 if self.fmt == "int4" else 0, fp8=to_fp8, corr=corr)
        elif kernel.startswith("torch-scaled_mm-fp8"):
            wf = unpack_to(self.wdata, zw[:, None], True)  # [N, K] fp8, exact integers
            one = torch.ones((), device=x.device, dtype=torch.float32)
            acc = torch._scaled_mm(codes, wf.t(), scale_a=one, scale_b=one, out_dtype=torch.float32,
                                   use_fast_accum=kernel.endswith("fastacc"))
            y = epilogue(acc, sa, sw, out_dtype=x.dtype)
        elif kernel == "torch-int_mm-int8":
            wi = self.wdata if self.fmt == "int8" else unpack_to(self.wdata, zw[:, None], False)
            a = codes if codes.shape[0] > 16 else F.pad(codes, (0, 0, 0, 32 - codes.shape[0]))
            acc = torch._int_mm(a, wi.t())[: x.shape[0]]
            y = epilogue(acc, sa, sw, zw if corr else None, rowsum, out_dtype=x.dtype)
        else:
            raise ValueError(f"unknown kernel {kernel!r}")
        return y if self.bias is None else y + self.bias

    def forward(self, x: torch.Tensor, prequantized: bool = False) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        phase = "decode" if x2.shape[0] <= DECODE_MAX_ROWS else "prefill"
        kernel = self.choice.get(phase) or self.candidates(phase, x.device)[0]
        return self.run(kernel, x2, prequantized).reshape(*shape[:-1], self.out_features)

    def kernel_label(self, phase: str) -> str:
        return self.choice.get(phase) or "unselected"

    def weight_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers() if b is not None)

    def extra_repr(self) -> str:
        act = f"a{self.act.bits}" if self.act is not None else "a16"
        return f"in={self.in_features}, out={self.out_features}, {self.fmt} w{self.bits}{act}, {self.choice}"


# ---------------------------------------------------------------------------- kernel selection

def _signature(layer: RealLinear) -> tuple:
    act = None if layer.act is None else tuple(sorted(layer.act.to_meta().items()))
    group = None if layer.fmt == "float" else layer.scale.shape[1]
    return (layer.fmt, layer.bits, layer.in_features, layer.out_features, group, act)


def _time_ms(fn, reps: int, device) -> float:
    if str(device).startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) * 1e3 / reps


def sync_error(fn) -> str | None:
    """Run ``fn`` once with CUDA sync detection on: the message if it synchronizes (no graph then)."""
    if not torch.cuda.is_available():
        return None
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return None
    except RuntimeError as exc:
        return str(exc).splitlines()[0][:200] if str(exc) else "RuntimeError"
    finally:
        torch.cuda.set_sync_debug_mode(prev)


def _time_graph_ms(fn, reps: int, device) -> float:
    """GPU time of ``fn`` (already warm) from replays of a CUDA graph of it: no launch overhead."""
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    del g
    return start.elapsed_time(end) / reps


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return math.inf
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def select_kernels(layers: list[RealLinear], phase: str, rows: int, *, dtype: torch.dtype,
                   only: list[str] | None = None, reps: int = 5, seed: int = 0,
                   log=None) -> list[KernelRecord]:
    """Pick, for each group of same-shaped layers, the fastest kernel that matches the simulated math.

    Each candidate runs on a random ``[rows, in]`` input: relative error against the simulated
    arithmetic of the same layer must be within ``KERNEL_TOL`` (with an activation quantizer, that
    arithmetic uses the engine's quantizer, after checking that it differs from the simulated
    model's at rounding ties only: ``quantizer_ties``); timing cycles through all layers of the
    group, so that weights come from memory as in a real forward pass, not from cache.
    ``only`` restricts the candidates (names or prefixes) for experiments; naming an opt-in
    kernel (``OPT_IN_KERNELS``) adds it to the candidates instead.
    """
    # names of opt-in kernels add a candidate; any other names restrict the candidates to them
    opt_in = [o for o in (only or ()) if o in OPT_IN_KERNELS]
    filters = [o for o in (only or ()) if o not in OPT_IN_KERNELS]
    groups: dict[tuple, list[RealLinear]] = {}
    for layer in layers:
        groups.setdefault(_signature(layer), []).append(layer)
    records = []
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for sig, members in groups.items():
        first = members[0]
        device = first.wdata.device if first.fmt != "float" else first.weight.device
        x = torch.randn(rows, first.in_features, generator=gen).to(device=device, dtype=dtype)
        rec = KernelRecord(phase=phase, rows=rows, shape=(first.out_features, first.in_features),
                           chosen="")
        with torch.no_grad():
            if first.act is None:
                ref = first.simulated(x)
            else:
                # the simulated arithmetic with the engine's activation quantizer, which may differ
                # from the eager one at rounding ties only (checked here, recorded in the record)
                rec.quantizer = quantizer_ties(x, first.act)
                if rec.quantizer["non_tie"]:
                    raise RuntimeError(f"the engine's activation quantizer differs from the simulated "
                                       f"model's beyond rounding ties for {sig}: {rec.quantizer}")
                ref = first.run("simulated", x)
        best = None
        for name in first.candidates(phase, device, opt_in=opt_in):
            if filters and not any(name.startswith(o) for o in filters) and name not in ("simulated",):
                continue
            info: dict = {}
            try:
                with torch.no_grad():
                    out = first.run(name, x)
                    info["rel_err"] = rel_err(out, ref)
                    if info["rel_err"] > KERNEL_TOL:
                        info["error"] = f"relative error {info['rel_err']:.2e} > {KERNEL_TOL}"
                    else:
                        cycle = members[: max(1, min(len(members), 64))]
                        for m in cycle:
                            # warm-up: autotune, compile, and per-layer set-up (tinygemm's layout)
                            # outside the CUDA graph, which would otherwise replay it
                            m.run(name, x)
                        def go():
                            for m in cycle:
                                m.run(name, x)
                        if str(device).startswith("cuda"):
                            bad = sync_error(lambda: first.run(name, x))
                            if bad:
                                raise RuntimeError(f"synchronizes, cannot be graph-captured: {bad}")
                            info["ms"] = _time_graph_ms(go, reps, device) / len(cycle)
                        else:
                            info["ms"] = _time_ms(go, reps, device) / len(cycle)
            except Exception as exc:  # noqa: BLE001 - a failing candidate is recorded, not fatal
                info["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            rec.candidates[name] = info
            if "ms" in info and (best is None or info["ms"] < rec.candidates[best]["ms"]):
                best = name
        if str(device).startswith("cuda") and first.fmt != "float":
            rec.candidates.update(_reference_timings(first, phase, rows, dtype, reps))
        if best is None:
            raise RuntimeError(f"no kernel works for {sig} in {phase}: {rec.candidates}")
        rec.chosen = best
        for m in members:
            m.choice[phase] = best
        if log:
            log(f"  {phase:7s} rows={rows:<6d} {rec.shape} -> {best}  "
                + ", ".join(f"{k}={v.get('ms', float('nan')):.4f}ms/{v.get('rel_err', float('nan')):.1e}"
                            if "ms" in v else f"{k}=FAIL({v.get('error', '')[:60]})"
                            for k, v in rec.candidates.items()))
        records.append(rec)
    return records


def _reference_timings(layer: RealLinear, phase: str, rows: int, dtype, reps: int) -> dict:
    """Timing-only comparisons on the same shape (never selected; values are random).

    ``ref-cublas-fp16``: the float layer this one replaces, cycling over 8 random weights so that
    they come from memory. ``ref-torch-int4pack``: torch's tinygemm int4 weight-only matmul
    (bf16, groups of 128), for W4A16 decode.
    """
    out = {}
    dev = layer.wdata.device
    N, K = layer.out_features, layer.in_features
    x = torch.randn(rows, K, device=dev, dtype=dtype)
    try:
        ws = [torch.randn(N, K, device=dev, dtype=dtype) for _ in range(8)]
        def go():
            for w in ws:
                F.linear(x, w)
        go()
        out["ref-cublas-fp16"] = {"ms": _time_graph_ms(go, reps, dev) / len(ws), "timing_only": True}
        del ws
    except Exception as exc:  # noqa: BLE001
        out["ref-cublas-fp16"] = {"error": f"{type(exc).__name__}: {str(exc)[:160]}", "timing_only": True}
    if layer.fmt == "int4" and phase == "decode" and layer.act is None:
        try:
            xb = x.to(torch.bfloat16)
            packs = [torch._convert_weight_to_int4pack(
                torch.randint(0, 256, (N, K // 2), device=dev, dtype=torch.uint8), 8) for _ in range(8)]
            sz = torch.randn(K // 128, N, 2, device=dev, dtype=torch.bfloat16)
            def go4():
                for p in packs:
                    torch._weight_int4pack_mm(xb, p, 128, sz)
            go4()
            out["ref-torch-int4pack"] = {"ms": _time_graph_ms(go4, reps, dev) / len(packs), "timing_only": True}
        except Exception as exc:  # noqa: BLE001
            out["ref-torch-int4pack"] = {"error": f"{type(exc).__name__}: {str(exc)[:160]}",
                                         "timing_only": True}
    return out
