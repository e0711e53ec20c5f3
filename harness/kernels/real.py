"""Real-kernel linear layers built from a ``LinearQuant``, with the kernel chosen per shape and phase.

``RealLinear`` holds a layer's weights in one or more deployed *layouts* and computes with a named
kernel (``KERNELS`` says which layout and which input each one takes):

``ours``      int4 packed two a byte, or one signed byte a code (``packing``): our Triton kernels
              (fused-dequant ``-dot``/``-gemv``; FP8/INT8 tensor-core GEMMs with the scales in the
              epilogue), ``dequant+cublas``, and ``simulated`` (the simulated arithmetic itself)
``tinygemm``  torch's ``_weight_int4pack_mm`` (W4, bf16 activations, groups of 32..256)
``gemlite``   gemlite's packing: its GEMV / split-K / GEMM kernels (``gemlite``) and, for per-channel
              4-bit weights with 4-bit activation codes, its FP8 GEMM (``gemlite-fp8``)
``fp8w``      ``q - z`` of per-channel 4-bit weights as FP8 e4m3 (exact): ``torch._scaled_mm`` with
              row-wise scales (per-token activation scale x per-channel weight scale in the epilogue)
``float``     the float weight: cuBLAS

Inputs: ``float`` (the layer's own activation quantizer runs first, if it has one), ``fake``
(quantize-dequantized values, as the simulated model feeds its matmul) or ``codes`` (integer
codes + per-token scales). In the engine the producer of the activation emits what the chosen
kernel takes (``fused``); given a plain tensor, the layer quantizes it itself.

Which candidate a layer runs is chosen by ``harness.kernels.select.select_kernels``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..quant.quantizer import qparams
from ..quant.simulated import quantize_activation
from ..quant.state import ActQuant, LinearQuant
from . import fused
from . import gemlite_adapter as glk
from . import triton_matmul as tk
from .fused import FLOAT_INPUT, InputMode, Prepared
from .online import make_transform
from .packing import from_int8_storage, pack_int4, storage_format, to_int8_storage, unpack_int4

FP8 = getattr(torch, "float8_e4m3fn", None)
DECODE_MAX_ROWS = 64  # inputs with at most this many rows use the decode kernels
TINYGEMM = "torch-int4pack"  # torch._weight_int4pack_mm (tinygemm): bf16 activations, int4 weights
TINYGEMM_INNER_K_TILES = 8


@dataclass(frozen=True)
class Kernel:
    layout: str
    input: str  # float | fake | codes
    codes: str | None = None  # fp8 | int8 for codes input


KERNELS = {
    "cublas": Kernel("float", "float"), "torch-float": Kernel("float", "float"),
    "simulated": Kernel("ours", "fake"), "dequant+cublas": Kernel("ours", "fake"),
    "dequant+torch": Kernel("ours", "fake"),
    **{f"triton-{f}-{k}": Kernel("ours", "fake") for f in ("int4", "int8")
       for k in ("dot", "gemv", "gemv2", "gemv-splitk")},
    TINYGEMM: Kernel("tinygemm", "fake"),
    "gemlite": Kernel("gemlite", "fake"), "gemlite-fp8": Kernel("gemlite", "codes", "fp8"),
    "gemlite-dequant+cublas": Kernel("gemlite", "fake"),
    "triton-fp8-gemm": Kernel("ours", "codes", "fp8"), "triton-int8-gemm": Kernel("ours", "codes", "int8"),
    "torch-scaled_mm-fp8w": Kernel("fp8w", "codes", "fp8"),
    "torch-scaled_mm-fp8w-fastacc": Kernel("fp8w", "codes", "fp8"),
    "torch-int_mm-int8": Kernel("ours", "codes", "int8"),
}
# offered only when named in ``--kernels``: never fastest on H100/H200 7B and 13B shapes
# (docs/benchmarks/perf.md), and each costs compile time in a perf run
# "gemlite" names gemlite for 5..8-bit codes too (4-bit: default): gemlite ships no tuned
# configurations for 8-bit codes with fp16 activations, so it would autotune every shape
OPT_IN_KERNELS = ("triton-int4-gemv", "triton-int4-gemv2", "triton-int4-gemv-splitk", "triton-int8-gemv2",
                  "torch-int_mm-int8", "gemlite")

# The layout rule (issue 31). A layout's bits per weight: ``ours`` and gemlite keep the codes' storage
# (4 bits for <= 4-bit codes, 8 for 5..8), tinygemm 4, ``fp8w`` an e4m3 copy (8), float 16. By default
# a layer may only take a layout no wider than its codes' storage, so a W4 model keeps the W4 memory
# (FP8 copies of 4-bit weights cost 2x the bytes: W4A4's peak went from 0.38x to 0.62x fp16 with
# them); ``wide_layouts=True`` lifts that, and the perf record says so. Among admissible layouts the
# most preferred one (``LAYOUT_PREFERENCE``) within ``LAYOUT_MARGIN`` of the fastest is chosen, so
# timing noise between runs cannot flip the layout (and with it the memory) of a row.
LAYOUT_PREFERENCE = ("ours", "gemlite", "tinygemm", "fp8w", "float")
LAYOUT_MARGIN = 0.05


def layout_bits(layout: str, bits: int) -> int:
    """Bits a weight of ``bits``-bit codes occupies in ``layout``."""
    if layout == "float":
        return 16
    if layout in ("fp8w",):
        return 8
    if layout == "tinygemm":
        return 4
    return 4 if bits <= 4 else 8 if bits <= 8 else 16


def admissible_layouts(bits: int, wide: bool = False) -> tuple[str, ...]:
    """The layouts a layer of ``bits``-bit codes may take: none wider than its storage unless ``wide``."""
    if wide or bits >= 16:
        return LAYOUT_PREFERENCE
    own = layout_bits("ours", bits)
    return tuple(lay for lay in LAYOUT_PREFERENCE if layout_bits(lay, bits) <= own)


_COMPILE = {"on": False}


def set_compile(on: bool) -> None:
    """Compile the small torch helpers (dequantization, epilogues) with inductor."""
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


def _act_fake_impl(x: torch.Tensor, act: ActQuant) -> torch.Tensor:
    return quantize_activation(x, act)


def act_fake(x: torch.Tensor, act: ActQuant) -> torch.Tensor:
    """The engine's activation quantizer on a plain tensor: the fused Triton quantizer where it
    runs, else the simulated model's (compiled when enabled)."""
    if fused.use_triton(x.device):
        return fused.rows_q(x, act, InputMode("fake")).x
    return _maybe_compiled(_act_fake_impl)(x, act)


TIE_WIDTH = 1e-3  # a quotient x / scale within this many steps of k + 1/2 is a rounding tie


def quantizer_ties(x: torch.Tensor, act: ActQuant, engine_quantizer=None) -> dict:
    """Where the engine's activation quantizer and the simulated model's disagree, and whether
    every disagreement is a rounding tie.

    Both compute ``round(x / scale)`` in float32, but a compiler may form the scale or the quotient
    one ulp apart. That matters only where the exact quotient is a half-integer, which fp16
    activations make common: ``7 x / amax`` of two fp16 numbers is exactly k + 1/2 about once per
    5120-wide row at 4 bits, and one such code moved by a step is ~1e-2 relative error on a
    layer's output. A disagreement anywhere else (not within ``TIE_WIDTH`` of a half step, or more
    than one step) is a real difference and is counted in ``non_tie``.
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
    """``code - zero`` of int4-packed weights as exact integer operands (FP8 e4m3 or int8)."""
    return _maybe_compiled(_unpack_to_impl)(packed, zero, to_fp8)


def _dequant_impl(wdata, scale, zero, packed: bool, dtype):
    """``fp((code - zero) * scale)`` of our weight storage, as ``RealLinear.dequantized`` (the eager
    reference) computes it, in a form inductor fuses into one pass (``dequant+cublas``: the H200
    measured the eager reference at 0.87 ms for a 12288x4096 layer, ~7x its fp16 matmul)."""
    if packed:
        q = torch.stack([wdata & 0x0F, wdata >> 4], dim=-1).reshape(wdata.shape[0], -1).float()
    else:
        q = wdata.float()
    n, k = q.shape
    g = scale.shape[1]
    w = (q.view(n, g, k // g) - zero[:, :, None]) * scale[:, :, None]
    return w.view(n, k).to(dtype)


# ---------------------------------------------------------------------------- tinygemm layout

def tinygemm_operands(wdata: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int, g: int):
    """Our int4 packing and ranges as tinygemm's inputs, before its tiling.

    Returns uint8 ``[N, K/2]`` with the even code of each byte in the high nibble, and bf16
    ``scales_and_zeros [K/g, N, 2]``: tinygemm dequantizes ``(q - 8) * scale + zero``; with
    ``scale = bf16(s)`` and ``zero = (8 - z) * scale`` that is ``(q - z) * bf16(s)`` whenever
    ``zero`` is exact in bf16 (``tinygemm_exact``).
    """
    swapped = (((wdata & 0x0F) << 4) | (wdata >> 4)).contiguous()
    rep = group // g
    s = scale.to(torch.bfloat16).double().repeat_interleave(rep, dim=1)
    z = zero.double().repeat_interleave(rep, dim=1)
    sz = torch.stack([s.t(), ((8 - z) * s).t()], dim=-1).to(torch.bfloat16).contiguous()
    return swapped, sz


def tinygemm_exact(scale: torch.Tensor, zero: torch.Tensor) -> tuple[bool, int]:
    """Whether tinygemm's float zero point ``(8 - z) * bf16(s)`` is exact in bf16 for every group
    (then it computes ``(q - z) * bf16(s)``, the state's weights up to the scale's rounding), and
    how many groups it is not: symmetric states (z = 8) always are, asymmetric ones rarely."""
    s = scale.to(torch.bfloat16).double()
    zf = (8 - zero.double()) * s
    bad = int((zf.to(torch.bfloat16).double() != zf).sum())
    return bad == 0, bad


# ---------------------------------------------------------------------------- the layer

class RealLinear(nn.Module):
    """``y = x @ W.T (+ b)`` with ``W`` in deployed form; see the module docstring for kernels."""

    def __init__(self, in_features: int, out_features: int, *, weight: torch.Tensor | None = None,
                 wdata: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                 zero: torch.Tensor | None = None, bits: int = 16, act: ActQuant | None = None,
                 bias: torch.Tensor | None = None, name: str = "", input_transform: str | None = None,
                 act_dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # the state's online transform in front of the activation quantizer (``online``): applied
        # to plain-tensor inputs by ``forward``/``simulated``; a ``Prepared`` input already had it
        self.input_transform = input_transform
        self._transform = make_transform(input_transform, in_features)
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
        self.layouts: dict[str, object] = {}  # built on demand: tinygemm, gemlite, gemlite-fp8, fp8w
        self.wdata_host: torch.Tensor | None = None  # ours, kept on the host when not deployed
        self.notes: dict[str, str] = {}
        # activation dtype (outputs of integer kernels; gemlite's and tinygemm's inputs): the
        # model's dtype; ``select_kernels`` sets it to the dtype it selects for
        self.act_dtype = act_dtype or (weight.dtype if weight is not None else torch.float16)

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_quant(cls, lq: LinearQuant, linear: nn.Linear | None, *, device, dtype,
                   name: str = "", weight: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None) -> "RealLinear":
        """The deployed form of one state entry (``linear``: the float layer, for shape and bias;
        ``weight``/``bias``: the state's float values for them, where it has any)."""
        if bias is None and linear is not None and linear.bias is not None:
            bias = linear.bias.detach()
        if bias is not None:
            bias = bias.to(device=device, dtype=dtype)
        if lq.codes is None:
            if lq.weight is not None:
                w = lq.weight
            elif weight is not None:
                w = weight
            elif linear is not None:
                w = linear.weight.detach()
            else:
                raise ValueError(f"{name}: float layer without a weight")
            w = w.to(device=device, dtype=dtype).contiguous()
            return cls(w.shape[1], w.shape[0], weight=w, bits=16, act=lq.act, bias=bias, name=name,
                       input_transform=lq.input_transform)
        codes = lq.codes.to(device)
        out_f, in_f = codes.shape
        if storage_format(lq.bits) == "int4":
            wdata, zero = pack_int4(codes), lq.zero.to(device).float()
        else:
            wdata, zero = to_int8_storage(codes, lq.zero.to(device), lq.bits)
        return cls(in_f, out_f, wdata=wdata, scale=lq.scale.to(device), zero=zero, bits=lq.bits,
                   act=lq.act, bias=bias, name=name, input_transform=lq.input_transform, act_dtype=dtype)

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
        if not same_act or any(p.in_features != first.in_features or p.fmt != first.fmt
                               or p.input_transform != first.input_transform for p in parts):
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
                       act=first.act, bias=bias, name=name, input_transform=first.input_transform)
        return cls(first.in_features, out_f, wdata=torch.cat([p.wdata for p in parts]),
                   scale=torch.cat([p.scale for p in parts]), zero=torch.cat([p.zero for p in parts]),
                   bits=first.bits, act=first.act, bias=bias, name=name, input_transform=first.input_transform,
                   act_dtype=first.act_dtype)

    @property
    def device(self) -> torch.device:
        return self.scale.device if self.fmt != "float" else self.weight.device

    # -- reference arithmetic ----------------------------------------------------------------

    def _ours(self) -> torch.Tensor:
        if self.wdata is not None:
            return self.wdata
        if self.wdata_host is None:
            raise RuntimeError(f"{self.name}: no copy of the codes left to dequantize")
        return self.wdata_host.to(self.scale.device, non_blocking=False)

    def codes(self) -> torch.Tensor:
        """The state's uint8 codes ``[out, in]``."""
        w = self._ours()
        return unpack_int4(w) if self.fmt == "int4" else from_int8_storage(w, self.bits)

    def true_zero(self) -> torch.Tensor:
        """The state's zero points ``z`` (int8 storage keeps ``z - 2**(bits-1)``)."""
        return self.zero if self.fmt == "int4" else self.zero + 2 ** (self.bits - 1)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The float weight the simulated model uses: ``fp((code - zero) * scale)``."""
        if self.fmt == "float":
            return self.weight.to(dtype)
        wdata = self._ours()  # eager: reference arithmetic (and the slow fallback), not worth a compile
        q = unpack_int4(wdata).float() if self.fmt == "int4" else wdata.float()
        rep = self.in_features // self.scale.shape[1]
        z = self.zero.repeat_interleave(rep, dim=1)
        s = self.scale.repeat_interleave(rep, dim=1)
        return ((q - z) * s).to(dtype)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """The state's online input transform (identity without one): what the quantizer sees."""
        return x if self._transform is None else self._transform(x)

    @property
    def online(self):
        """The online transform's object (``online.make_transform``; None without one): the engine
        hands it to the fused kernel that applies it with the quantizer (``hadamard``)."""
        return self._transform

    def simulated(self, x: torch.Tensor) -> torch.Tensor:
        """What the simulated ``FakeQuantLinear`` computes for the same state entry (its online
        transform, a first forward pre-hook there, included)."""
        x = self.transform(x)
        if self.act is not None:
            x = quantize_activation(x, self.act)
        return F.linear(x, self.dequantized(x.dtype), self.bias)

    # -- layouts -----------------------------------------------------------------------------

    def tinygemm_group(self) -> int | None:
        """Group size for ``torch._weight_int4pack_mm`` (32..256), or None where it can't serve.

        4-bit weights; per-channel ranges become groups of 256 with the scale repeated (exact);
        groups of ours that are a multiple of a tinygemm group size likewise.
        """
        if self.fmt != "int4" or self.out_features % 8 or self.in_features % (TINYGEMM_INNER_K_TILES * 16):
            return None
        for g in (256, 128, 64, 32):
            if self.group % g == 0 and self.in_features % g == 0:
                return g
        return None

    def tinygemm_usable(self, device) -> str | None:
        """None where tinygemm runs this layer and represents its weights exactly, else why not."""
        if not str(device).startswith("cuda"):
            return "CUDA only"
        if self.tinygemm_group() is None:
            return "not 4-bit, or shapes/groups tinygemm does not take"
        if "tinygemm_exact" not in self.notes:
            ok, bad = tinygemm_exact(self.scale, self.zero)
            self.notes["tinygemm_exact"] = "exact" if ok else f"zero point inexact in bf16 for {bad} groups"
        if self.notes["tinygemm_exact"] != "exact":
            return self.notes["tinygemm_exact"]
        return None

    def _layout(self, name: str):
        """Build (once) and return the weights in layout ``name``."""
        if name in self.layouts:
            return self.layouts[name]
        if name == "tinygemm":
            g = self.tinygemm_group()
            swapped, sz = tinygemm_operands(self._ours(), self.scale, self.zero, self.group, g)
            packed = torch._convert_weight_to_int4pack(swapped, TINYGEMM_INNER_K_TILES)
            obj = (packed, sz, g)
        elif name == "gemlite":
            obj = glk.build(self.codes(), self.scale, self.true_zero(), self.bits, self.act_dtype)
            self.notes["gemlite_configs"] = getattr(obj, "borrowed_configs", None) or "gemlite's tuned table"
        elif name == "gemlite-fp8":
            obj = glk.build_fp8(self.codes(), self.scale, self.true_zero(), self.act_dtype,
                                share_with=self.layouts.get("gemlite"))
            self.notes["gemlite_fp8_configs"] = getattr(obj, "borrowed_configs", None) or "gemlite's tuned table"
        elif name == "fp8w":
            obj = _unpack_to_impl(self._ours(), self.zero[:, :1], True).contiguous()  # [N, K] e4m3: q - z
        else:
            raise ValueError(f"unknown layout {name!r}")
        self.layouts[name] = obj
        return obj

    def layouts_in_use(self) -> set[str]:
        out = set()
        for k in self.choice.values():
            lay = KERNELS[k].layout if k in KERNELS else "ours"
            out.add("gemlite" if lay == "gemlite" else lay)
            if k == "gemlite-fp8":
                out.add("gemlite-fp8")
        return out

    def finalize_storage(self) -> None:
        """Keep only the layouts the chosen kernels read; our codes move to host memory if unused
        (the gate's reference arithmetic dequantizes from there)."""
        if self.fmt == "float":
            return
        keep = self.layouts_in_use()
        for name in sorted(keep - {"ours", "float"}):  # gemlite before gemlite-fp8 (shared words)
            self._layout(name)  # built while our codes are still on the device
        for name in list(self.layouts):
            if name not in keep and not (name == "gemlite" and "gemlite-fp8" in keep):
                del self.layouts[name]
        if "ours" not in keep and self.wdata is not None:
            self.wdata_host = self.wdata.to("cpu")
            self.wdata = None

    def restore_ours(self) -> None:
        """Bring our codes back to the device (before choosing kernels again, e.g. another batch)."""
        if self.fmt != "float" and self.wdata is None and self.wdata_host is not None:
            self.wdata = self.wdata_host.to(self.scale.device)
            self.wdata_host = None

    # -- kernels -----------------------------------------------------------------------------

    @property
    def per_channel(self) -> bool:
        return self.fmt != "float" and self.scale.shape[1] == 1

    def int_compute(self) -> str | None:
        """'fp8' or 'int8' when the layer can run on integer tensor cores, else None."""
        if self.act is None or self.fmt == "float" or not self.per_channel or FP8 is None:
            return None
        lo, hi = act_int_bounds(self.act)
        if self.fmt == "int4" and -16 <= lo and hi <= 16:  # integers up to 16 are exact in e4m3
            return "fp8"
        if -128 <= lo and hi <= 127:
            return "int8"
        return None

    def candidates(self, phase: str, device, opt_in: list[str] | tuple = (), dtype=None) -> list[str]:
        """Kernel names to try for ``phase`` (see ``KERNELS``; ``opt_in`` adds ``OPT_IN_KERNELS``)."""
        cuda = str(device).startswith("cuda")
        trit = tk.available(device)
        if self.fmt == "float":
            return ["cublas" if cuda else "torch-float"]
        dtype = dtype or self.act_dtype
        fmt = self.fmt
        comp = self.int_compute()
        gem = glk.usable(self.bits, self.in_features, self.group, dtype, device) is None and (
            self.bits <= 4 or "gemlite" in (opt_in or ()))
        out = []
        if trit:
            out.append(f"triton-{fmt}-dot")
            if phase == "decode" and fmt == "int8":
                out += ["triton-int8-gemv", "triton-int8-gemv-splitk"]
        if cuda and self.tinygemm_usable(device) is None:
            out.append(TINYGEMM)
        if gem and not torch.are_deterministic_algorithms_enabled():  # its GEMV/split-K add with atomics
            out.append("gemlite")
            if phase == "prefill":  # gemlite's GEMM is 0.25-0.33x cuBLAS at 647 rows on the H200
                out.append("gemlite-dequant+cublas")
        if comp is not None and phase == "prefill":
            if trit:
                out.append(f"triton-{comp}-gemm")
            if comp == "fp8" and gem and not torch.are_deterministic_algorithms_enabled():
                out.append("gemlite-fp8")
        if comp == "fp8" and cuda:
            out += ["torch-scaled_mm-fp8w", "torch-scaled_mm-fp8w-fastacc"]
        for name in opt_in or ():
            if name in out or name not in OPT_IN_KERNELS or name.startswith("gemlite"):
                continue
            if name.startswith(f"triton-{fmt}-") and trit:
                out.append(name)
            elif name == "torch-int_mm-int8" and comp == "int8" and cuda:
                out.append(name)
        if self.act is None:
            out.append("dequant+cublas" if cuda else "dequant+torch")
        else:
            out.append("simulated")
        return out

    def input_mode(self, phase: str) -> InputMode:
        """What the chosen kernel of ``phase`` wants from the producer of this layer's input."""
        name = self.choice.get(phase)
        if self.act is None or name is None:
            return FLOAT_INPUT
        k = KERNELS.get(name)
        if k is None or k.input == "float":
            return FLOAT_INPUT
        if k.input == "fake":
            return InputMode("fake")
        return InputMode("codes", fp8=k.codes == "fp8", rowsum=k.codes == "int8" and self.corr)

    def _fake(self, x) -> torch.Tensor:
        if isinstance(x, Prepared):
            if x.kind != "fake":
                raise ValueError(f"{self.name}: kernel wants fake-quantized input, got {x.kind}")
            return x.x
        return x if self.act is None else act_fake(x, self.act)

    def _codes(self, x, k: Kernel) -> Prepared:
        if isinstance(x, Prepared):
            if x.kind != "codes":
                raise ValueError(f"{self.name}: kernel wants codes, got {x.kind}")
            return x
        mode = InputMode("codes", fp8=k.codes == "fp8", rowsum=self.corr)
        return fused.rows_q(x, self.act, mode)

    def run(self, kernel: str, x, prequantized: bool = False) -> torch.Tensor:
        """Compute the layer on ``x`` (``[M, K]`` tensor or ``Prepared``) with the named kernel.
        ``prequantized``: the tensor ``x`` is already fake-quantized. ``x`` is the quantizer's
        input: the online transform, if any, is already applied (``forward`` applies it)."""
        if prequantized and not isinstance(x, Prepared):
            x = Prepared("fake", x)
        k = KERNELS.get(kernel)
        if k is None:
            raise ValueError(f"unknown kernel {kernel!r}; known: {', '.join(KERNELS)}")
        if k.layout == "float":
            xf = x.x if isinstance(x, Prepared) else x
            return F.linear(xf, self.weight, self.bias)
        if k.input == "fake":
            xq = self._fake(x)
            y = self._run_fake(kernel, xq)
        else:
            y = self._run_codes(kernel, self._codes(x, k), k)
        return y if self.bias is None else y + self.bias

    def _run_fake(self, kernel: str, xq: torch.Tensor) -> torch.Tensor:
        if kernel == "simulated":
            return F.linear(xq, self.dequantized(xq.dtype))
        if kernel in ("dequant+cublas", "dequant+torch"):  # the same weight, one compiled pass
            if self.fmt == "float":
                return F.linear(xq, self.weight.to(xq.dtype))
            w = _maybe_compiled(_dequant_impl)(self._ours(), self.scale, self.zero, self.fmt == "int4", xq.dtype)
            return F.linear(xq, w)
        if kernel == TINYGEMM:
            packed, sz, g = self._layout("tinygemm")
            xb = xq if xq.dtype == torch.bfloat16 else xq.to(torch.bfloat16)
            y = torch._weight_int4pack_mm(xb.contiguous(), packed, g, sz)
            return y if y.dtype == xq.dtype else y.to(xq.dtype)
        if kernel == "gemlite":
            return glk.matmul(self._layout("gemlite"), xq)
        if kernel == "gemlite-dequant+cublas":
            args = glk.dequant_args(self._layout("gemlite"))
            w = (tk.dequant_words if tk.available(xq.device) else glk.dequant_kn)(*args, xq.dtype)
            return xq @ w
        if kernel.endswith("-gemv2"):
            return tk.wq_gemv2(xq, self._ours(), self.scale, self.zero, 4 if self.fmt == "int4" else 8,
                               self.group)
        if kernel.endswith(("-gemv", "-gemv-splitk", "-dot")):
            return tk.wq_matmul(xq, self._ours(), self.scale, self.zero, self.fmt == "int4", self.group,
                                mode=kernel.split("-", 2)[2])
        raise ValueError(f"unknown kernel {kernel!r}")

    def _run_codes(self, kernel: str, p: Prepared, k: Kernel) -> torch.Tensor:
        out_dtype = self.act_dtype
        sw = self.scale[:, 0].contiguous()
        zw = self.zero[:, 0].contiguous()
        if kernel.startswith("triton-"):
            y = tk.scaled_gemm(p.x, self._ours(), zw, p.scale, sw, p.rowsum,
                               wfmt=1 if self.fmt == "int4" else 0, fp8=k.codes == "fp8", corr=self.corr,
                               out_dtype=out_dtype)
            return y
        if kernel == "gemlite-fp8":
            self._layout("gemlite")
            return glk.matmul_fp8(self._layout("gemlite-fp8"), p.x, p.scale)
        if kernel.startswith("torch-scaled_mm-fp8w"):
            w8 = self._layout("fp8w")
            fast = kernel.endswith("fastacc")
            mm_out = self.notes.get("scaled_mm_out", "same")
            dt = out_dtype if mm_out == "same" else torch.bfloat16
            try:
                y = torch._scaled_mm(p.x, w8.t(), scale_a=p.scale.view(-1, 1), scale_b=sw.view(1, -1),
                                     out_dtype=dt, use_fast_accum=fast)
            except RuntimeError:
                if mm_out != "same" or out_dtype == torch.bfloat16:
                    raise
                # row-wise scaling may only write bf16 here: bf16 out, then a cast (recorded)
                self.notes["scaled_mm_out"] = "bf16+cast"
                y = torch._scaled_mm(p.x, w8.t(), scale_a=p.scale.view(-1, 1), scale_b=sw.view(1, -1),
                                     out_dtype=torch.bfloat16, use_fast_accum=fast)
            return y if y.dtype == out_dtype else y.to(out_dtype)
        if kernel == "torch-int_mm-int8":
            wi = self._ours() if self.fmt == "int8" else unpack_to(self._ours(), zw[:, None], False)
            a = p.x if p.x.shape[0] > 16 else F.pad(p.x, (0, 0, 0, 32 - p.x.shape[0]))
            acc = torch._int_mm(a, wi.t())[: p.x.shape[0]]
            return epilogue(acc, p.scale, sw, zw if self.corr else None, p.rowsum, out_dtype=out_dtype)
        raise ValueError(f"unknown kernel {kernel!r}")

    def forward(self, x) -> torch.Tensor:
        if isinstance(x, Prepared):
            phase = "decode" if x.rows <= DECODE_MAX_ROWS else "prefill"
            kernel = self.choice.get(phase) or self.candidates(phase, x.x.device)[0]
            return self.run(kernel, x)
        shape = x.shape
        x2 = self.transform(x.reshape(-1, shape[-1]))
        phase = "decode" if x2.shape[0] <= DECODE_MAX_ROWS else "prefill"
        kernel = self.choice.get(phase) or self.candidates(phase, x.device)[0]
        return self.run(kernel, x2).reshape(*shape[:-1], self.out_features)

    def kernel_label(self, phase: str) -> str:
        return self.choice.get(phase) or "unselected"

    def weight_bytes(self) -> int:
        """Bytes of every deployed layout on the device (host copies excluded)."""
        seen, total = set(), 0
        tensors = list(self.buffers())
        for obj in self.layouts.values():
            if isinstance(obj, torch.Tensor):
                tensors.append(obj)
            elif isinstance(obj, tuple):
                tensors += [t for t in obj if isinstance(t, torch.Tensor)]
            elif isinstance(obj, nn.Module):
                tensors += list(obj.parameters()) + list(obj.buffers())
        for t in tensors:
            if t is None or t.device.type == "cpu" and self.device.type != "cpu" or t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
        return total

    def extra_repr(self) -> str:
        act = f"a{self.act.bits}" if self.act is not None else "a16"
        online = f", online {self.input_transform}" if self.input_transform else ""
        return f"in={self.in_features}, out={self.out_features}, {self.fmt} w{self.bits}{act}{online}, {self.choice}"


# ---------------------------------------------------------------------------- numerics
def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return math.inf
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))

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
