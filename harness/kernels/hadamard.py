"""The online Hadamard and the activation quantizer after it in one Triton kernel (eager: ``online``).

QuaRot's online Hadamard in eager torch (``online.OnlineHadamard``: a GEMM by a Sylvester block, a
transpose copy per block, the dense Paley product, a division) is five or six launches before the
quantizer: on an H100 ~0.6 ms of QuaRot's 4.27 ms W4A4 decode step, against MBQ's 3.68 ms on the same
GEMVs (issue 31). Here a program per row (m == 1; m > 1: per row and block of outputs) computes ``quantizer(x @ H)`` for ``H = (H_m ⊗ H_p) / √n``
(``transforms.hadamard_factors``), the row held in registers, and writes only what the next GEMM
reads (``fused``'s outputs: float, fake-quantized values, or codes + scales):

* ``m == 1`` (4096 = 64 · 64): the row as a ``[P1, P2]`` tile, ``H_P1 · X · H_P2`` as two tensor-core
  products by Sylvester blocks generated in registers (``H[i, j] = (−1)^popcount(i & j)``);
* ``m > 1`` (11008 = 344 · 32): ``Y = X · H_p`` on 32-row tiles of the ``[m, p]`` row, then
  ``Z = H_mᵀ · Y`` accumulated tile by tile; ``H_m`` (±1) is read as one bit an entry (15 KB for
  344, instead of 237 KB in fp16 read again by every row). Split over a 2-D grid (row × block of
  ``BK`` outputs ``k``: 22 programs a row at decode, ``_block_k``), each program recomputing ``Y``
  tile by tile (cheap) for its block of ``Z``; with a quantizer, the first pass writes the
  transformed row and each block's min / max, and a second pass (row × 1024-value chunks; one
  program a row where row sums are asked for) takes the row's statistic from those (min / max are
  exact in any order: the same scale as a whole-row reduction) and quantizes. Two launches, no
  atomics, deterministic, graph-capturable.

Its input is read the way the engine produces it: plain rows or a ``[B, T, H, D]`` view (the
attention output through its transpose: o_proj), or SiLU(gate) · up of the fused gate/up output
(down_proj), computed as ``fused.silu_mul_q`` does. The arithmetic is ``apply_hadamard``'s: each
stage is rounded to the activation dtype where the eager one is (after the Sylvester stage, after
the dense one, after the division by √n), so the values differ from the eager ones only by the
order of float32 accumulation (and, for m == 1, where the power of two is split into blocks).
Shapes it does not cover (``plan`` says why) keep the eager path, which stays the reference.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from ..quant.state import ActQuant
from . import fused
from . import triton_matmul as tk
from .fused import FLOAT_INPUT, InputMode
from .online import OnlineHadamard

IMPL_ENV = "QVLM_ONLINE_HADAMARD"  # eager | fused: forced (A/B timing); unset/auto: timed per width (choose)
MAX_TILE = 32768  # values of the row tile a program holds (the accumulator of the m > 1 case)
BI = 32  # rows of the [m, p] row per step of the dense stage (one 32-bit word of H_m per column)
CHUNK = 1024  # values of a row per program of the quantizer pass after the split dense stage
BLOCK_KS = (16, 32, 64)  # outputs of the [m, p] row per program of the split dense stage (``_block_k``)
DENSES = ("tiles", "whole")  # the split dense stage: a loop over 32-row tiles, or the whole row at once
WHOLE_ENV = "QVLM_HADAMARD_WHOLE_ROWS"  # overrides WHOLE_MAX_ROWS (A/B timing of the two forms)
WHOLE_MAX_ROWS = 1  # rows up to which ``_dense`` takes "whole": measured at 1 row (decode, batch 1)
# the largest row tile ``_dense`` gives "whole" by default: the one measured on the GPU (11008: 512 · 32);
# wider ones (Qwen2.5-7B's 18944 = 148 · 128 → 256 · 128) were never compiled there (registers, shared
# memory), so they keep "tiles"; ``dense="whole"`` still runs them up to MAX_TILE
WHOLE_MAX_TILE = 16384


@dataclass(frozen=True)
class Plan:
    """How the kernel covers a width ``n = m · p``: ``m == 1``: a ``[p1, p2]`` tile; ``m > 1``:
    ``mp`` (m rounded up to a power of two) accumulator rows of ``p`` columns."""

    n: int
    m: int
    p: int
    p1: int = 0
    p2: int = 0
    mp: int = 0


def plan(n: int) -> Plan | str:
    """The kernel's plan for width ``n``, or why it does not cover it (the eager path runs)."""
    from ..quant.transforms import hadamard_factors

    try:
        m, p = hadamard_factors(n)
    except ValueError as exc:
        return str(exc).splitlines()[0]
    lp = p.bit_length() - 1
    if m == 1:
        p2 = 1 << ((lp + 1) // 2)
        p1 = p // p2
        if p1 < 16 or p1 * p2 > MAX_TILE:  # tensor-core products need 16 or more a side
            return f"power of two {p} outside 256..{MAX_TILE}"
        return Plan(n, m, p, p1=p1, p2=p2)
    mp = 1 << (m - 1).bit_length()
    if p < 16 or p > 128 or mp * p > MAX_TILE:
        return f"{m}·{p}: the power-of-two factor must be 16..128 and {m}→{mp} rows × {p} ≤ {MAX_TILE}"
    return Plan(n, m, p, mp=max(mp, 16))


_BITS: dict = {}


def factor_bits(m: int, mp: int, device) -> torch.Tensor:
    """``H_m`` one bit an entry for the kernel: ``[mp, ceil(m / 32)]`` int32, bit ``b`` of word
    ``(k, t)`` set where ``H_m[32 t + b, k] = −1`` (the transposed factor the dense stage reads;
    rows ``k ≥ m`` and bits past ``m`` are 0). Made once per device (before any graph capture)."""
    key = (m, mp, str(device))
    if key not in _BITS:
        from ..quant.transforms import _dense_factor

        neg = (_dense_factor(m).t() < 0).long()  # [k, i]
        nt = -(-m // BI)
        full = torch.zeros(mp, nt * BI, dtype=torch.int64)
        full[:m, :m] = neg
        words = (full.view(mp, nt, BI) << torch.arange(BI)).sum(-1)
        words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)  # two's complement int32
        _BITS[key] = words.to(torch.int32).contiguous().to(device)
    return _BITS[key]


# ---------------------------------------------------------------------------- Triton kernels

if tk.HAS_TRITON:
    import triton
    import triton.language as tl

    from .fused import _emit, _rne

    _helper = (lambda f: f) if tk.INTERPRET else triton.jit  # as fused: plain Python when interpreted

    @_helper
    def _sylvester_tile(N: tl.constexpr, LOG: tl.constexpr, dtype: tl.constexpr):
        """``H_N`` (Sylvester order, entries ±1) in registers: ``(−1)^popcount(i & j)``."""
        v = tl.arange(0, N)[:, None] & tl.arange(0, N)[None, :]
        par = v & 1
        for s in tl.static_range(1, LOG):
            par = par ^ ((v >> s) & 1)
        return (1 - 2 * par).to(dtype)

    @_helper
    def _load(x_ptr, row, c, mask, K, T, D, stride_b, stride_t, stride_h, SILU: tl.constexpr):
        """Columns ``c`` of row ``row`` of the transform's input, in the activation dtype: SiLU(g) · u
        of ``[rows, 2K]`` rows (``fused.silu_mul_q``'s arithmetic), or a ``[B, T, H, D]`` view."""
        if SILU:
            base = x_ptr + row * stride_t
            g = tl.load(base + c, mask=mask, other=0.0)
            u = tl.load(base + K + c, mask=mask, other=0.0)
            gf = g.to(tl.float32)
            s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
            return s * u
        b = row // T
        t = row % T
        return tl.load(x_ptr + b * stride_b + t * stride_t + (c // D) * stride_h + c % D, mask=mask, other=0.0)

    @_helper
    def _store_block(acc, k, kin, j, row, kb, NB, h_ptr, stats_ptr, stride_hout, sqrt_n, dt: tl.constexpr,
                     P: tl.constexpr, STATS: tl.constexpr):
        """A split dense stage's block ``Z[k, :]`` (float32 ``acc``) rounded as the eager stages (to
        the activation dtype, divided by √n, rounded again), stored into ``h``; with ``STATS`` the
        block's min and max for the quantizer pass (exact in any order)."""
        z = acc.to(dt).to(tl.float32)
        h = tl.math.div_rn(z, sqrt_n + tl.zeros_like(z)).to(dt).to(tl.float32)
        c = k[:, None] * P + j[None, :]
        mask = kin[:, None] & (j[None, :] < P)
        h = tl.where(mask, h, 0.0)
        tl.store(h_ptr + row * stride_hout + c, h.to(h_ptr.dtype.element_ty), mask=mask)
        if STATS:
            tl.store(stats_ptr + (row * NB + kb) * 2, tl.min(h, axis=None))
            tl.store(stats_ptr + (row * NB + kb) * 2 + 1, tl.max(h, axis=None))

    @triton.jit
    def _wht_q_kernel(x_ptr, out_ptr, scale_ptr, rowsum_ptr, s_ptr, z_ptr, K, T, D,
                      stride_b, stride_t, stride_h, stride_out, sqrt_n, clip,
                      P1: tl.constexpr, P2: tl.constexpr, LOG1: tl.constexpr, LOG2: tl.constexpr,
                      SILU: tl.constexpr, PREC: tl.constexpr, MODE: tl.constexpr, BITS: tl.constexpr,
                      SYM: tl.constexpr, PER_TOKEN: tl.constexpr, ROWSUM: tl.constexpr):
        # m == 1: the row as X [P1, P2] (column c = i P2 + j); Z = H_P1 (X H_P2), as _fwht's blocks
        row = tl.program_id(0)
        c = tl.arange(0, P1)[:, None] * P2 + tl.arange(0, P2)[None, :]
        mask = c < K
        x = _load(x_ptr, row, c, mask, K, T, D, stride_b, stride_t, stride_h, SILU)
        dt = x.dtype
        y = tl.dot(x, _sylvester_tile(P2, LOG2, dt), input_precision=PREC).to(dt)  # the fastest digit first
        z = tl.dot(_sylvester_tile(P1, LOG1, dt), y, input_precision=PREC).to(dt)
        h = tl.math.div_rn(z.to(tl.float32), sqrt_n + tl.zeros_like(z.to(tl.float32))).to(dt).to(tl.float32)
        _emit(h, c, mask, row, out_ptr, stride_out, scale_ptr, rowsum_ptr, s_ptr, z_ptr, clip,
              MODE, BITS, SYM, PER_TOKEN, ROWSUM)

    @triton.jit
    def _dense_wht_part_kernel(x_ptr, bits_ptr, h_ptr, stats_ptr, K, M, NT, NB, T, D,
                               stride_b, stride_t, stride_h, stride_hout, sqrt_n,
                               BK: tl.constexpr, P: tl.constexpr, LOGP: tl.constexpr, BLOCK_I: tl.constexpr,
                               SILU: tl.constexpr, PREC: tl.constexpr, STATS: tl.constexpr):
        # m > 1, split: program (row, kb) computes outputs k in [kb BK, kb BK + BK) of the [m, P] row,
        # Z[k, :] = sum_i H_m[i, k] (X H_P)[i, :], over every 32-row tile i (the same tiles and the same
        # float32 accumulation order as one program per row); writes h (rounded as the eager stages)
        # and, with STATS, the block's min and max (exact: the quantizer's row statistic is their
        # min / max over the row's blocks, taken by the second pass)
        row = tl.program_id(0)
        kb = tl.program_id(1)
        k = kb * BK + tl.arange(0, BK)
        j = tl.arange(0, P)
        bi = tl.arange(0, BLOCK_I)
        dt = x_ptr.dtype.element_ty
        hp = _sylvester_tile(P, LOGP, dt)
        acc = tl.zeros([BK, P], dtype=tl.float32)
        kin = k < M
        for t in range(0, NT):
            i = t * BLOCK_I + bi
            c = i[:, None] * P + j[None, :]
            m_in = (i[:, None] < M) & (j[None, :] < P)
            x = _load(x_ptr, row, c, m_in, K, T, D, stride_b, stride_t, stride_h, SILU)
            y = tl.dot(x, hp, input_precision=PREC).to(dt)
            w = tl.load(bits_ptr + k * NT + t, mask=kin, other=0)  # [BK] words: bit b is H_m[t*32 + b, k] < 0
            neg = ((w[:, None] >> bi[None, :]) & 1) != 0
            hm = tl.where(neg, -1.0, 1.0).to(dt)  # [BK, BLOCK_I] = H_mᵀ[k, i]
            acc += tl.dot(hm, y, input_precision=PREC)
        _store_block(acc, k, kin, j, row, kb, NB, h_ptr, stats_ptr, stride_hout, sqrt_n, dt, P, STATS)

    @triton.jit
    def _dense_wht_whole_kernel(x_ptr, bits_ptr, h_ptr, stats_ptr, K, M, NT, NB, T, D,
                                stride_b, stride_t, stride_h, stride_hout, sqrt_n,
                                BK: tl.constexpr, P: tl.constexpr, LOGP: tl.constexpr, MP: tl.constexpr,
                                SILU: tl.constexpr, PREC: tl.constexpr, STATS: tl.constexpr):
        # m > 1, split, no loop: program (row, kb) holds the whole [MP, P] row (MP = m rounded up to a
        # power of two), Y = X H_P in one product and Z[k, :] = H_mᵀ[k, :] Y in another (``dense=
        # "whole"``: two dependent products instead of 2 · NT, for the few rows of a decode step;
        # the float32 sum over i is one product's, so values may differ from ``"tiles"`` in the last
        # bit of the accumulation, as any order does)
        row = tl.program_id(0)
        kb = tl.program_id(1)
        k = kb * BK + tl.arange(0, BK)
        i = tl.arange(0, MP)
        j = tl.arange(0, P)
        dt = x_ptr.dtype.element_ty
        c = i[:, None] * P + j[None, :]
        x = _load(x_ptr, row, c, (i[:, None] < M) & (j[None, :] < P), K, T, D, stride_b, stride_t, stride_h, SILU)
        y = tl.dot(x, _sylvester_tile(P, LOGP, dt), input_precision=PREC).to(dt)  # rows i >= M are 0
        kin = k < M
        w = tl.load(bits_ptr + k[:, None] * NT + (i // 32)[None, :],
                    mask=kin[:, None] & ((i // 32)[None, :] < NT), other=0)  # [BK, MP] words
        neg = ((w >> (i % 32)[None, :]) & 1) != 0
        hm = tl.where(neg, -1.0, 1.0).to(dt)  # [BK, MP] = H_mᵀ[k, i]
        acc = tl.dot(hm, y, input_precision=PREC)
        _store_block(acc, k, kin, j, row, kb, NB, h_ptr, stats_ptr, stride_hout, sqrt_n, dt, P, STATS)

    @triton.jit
    def _rows_q_stats_kernel(h_ptr, stats_ptr, out_ptr, scale_ptr, rowsum_ptr, s_ptr, z_ptr, K, NB, LOOP,
                             stride_h, stride_out, clip, CHUNK: tl.constexpr, NBP: tl.constexpr,
                             MODE: tl.constexpr, BITS: tl.constexpr, SYM: tl.constexpr,
                             PER_TOKEN: tl.constexpr, ROWSUM: tl.constexpr):
        # the quantizer after the split transform: program (row, pb) quantizes LOOP chunks of the row
        # with the row's scale from the first pass's block statistics (``fused._emit``'s arithmetic:
        # min / max are exact in any order, so the scale is the one a whole-row reduction gives)
        row = tl.program_id(0)
        pb = tl.program_id(1)
        LEVELS: tl.constexpr = (1 << BITS) - 1
        if PER_TOKEN:
            b = tl.arange(0, NBP)
            bm = b < NB
            lo = tl.load(stats_ptr + (row * NB + b) * 2, mask=bm, other=0.0)
            hi = tl.load(stats_ptr + (row * NB + b) * 2 + 1, mask=bm, other=0.0)
            if SYM:
                QMAX: tl.constexpr = (1 << (BITS - 1)) - 1
                amax = tl.maximum(tl.max(hi, axis=0), -tl.min(lo, axis=0)) * clip
                scale = tl.maximum(tl.math.div_rn(amax, QMAX * 1.0), 1e-8)
                zero = (1 << (BITS - 1)) * 1.0
            else:
                xmin = tl.minimum(tl.min(lo, axis=0), 0.0) * clip
                xmax = tl.maximum(tl.max(hi, axis=0), 0.0) * clip
                scale = tl.maximum(tl.math.div_rn(xmax - xmin, LEVELS * 1.0), 1e-8)
                zero = tl.minimum(tl.maximum(_rne(tl.math.div_rn(-xmin, scale)), 0.0), LEVELS)
        else:
            scale = tl.load(s_ptr)
            zero = tl.load(z_ptr)
        total = tl.zeros([CHUNK], dtype=tl.float32)
        for u in range(0, LOOP):
            offs = (pb * LOOP + u) * CHUNK + tl.arange(0, CHUNK)
            mask = offs < K
            h = tl.load(h_ptr + row * stride_h + offs, mask=mask, other=0.0).to(tl.float32)
            q = _rne(tl.math.div_rn(h, scale + tl.zeros_like(h))) + zero
            q = tl.minimum(tl.maximum(q, 0.0), LEVELS) - zero
            if MODE == 1:
                tl.store(out_ptr + row * stride_out + offs, (q * scale).to(out_ptr.dtype.element_ty), mask=mask)
            else:
                tl.store(out_ptr + row * stride_out + offs, q.to(out_ptr.dtype.element_ty), mask=mask)
                total += tl.where(mask, q, 0.0)
        if MODE == 2:
            tl.store(scale_ptr + row, scale, mask=pb == 0)
            if ROWSUM:
                tl.store(rowsum_ptr + row, tl.sum(total, axis=0).to(tl.int32))


# ---------------------------------------------------------------------------- entry points

def impl() -> str:
    """``auto`` (default: the engine times both paths per width on CUDA, ``choose``), or a forced
    ``fused`` (alias ``triton``) or ``eager`` (``QVLM_ONLINE_HADAMARD``)."""
    v = os.environ.get(IMPL_ENV, "auto").strip().lower() or "auto"
    v = {"triton": "fused"}.get(v, v)
    if v not in ("auto", "fused", "eager"):
        raise ValueError(f"{IMPL_ENV}={v!r}: expected 'eager', 'fused' (or 'triton') or 'auto'")
    return v


def usable(t, device, dtype) -> str | None:
    """None where the kernel runs transform ``t`` (an ``OnlineHadamard``) on ``device``, else why not."""
    if not isinstance(t, OnlineHadamard):
        return f"not an online Hadamard: {t!r}"
    if not tk.available(device):
        return "Triton kernels do not run on this device"
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"activation dtype {dtype}"
    p = plan(t.n)
    return p if isinstance(p, str) else None


def _warps(plan_: Plan) -> int:
    tile = plan_.p1 * plan_.p2 if plan_.m == 1 else plan_.mp * plan_.p
    return 4 if tile <= 4096 else 8 if tile <= 16384 else 16


def _block_k(rows: int) -> int:
    """Outputs of the ``[m, p]`` row per program of the split dense stage: few rows (decode) want
    many programs a row; many rows (prefill) fewer, each recomputing ``X · H_p`` less often."""
    return 16 if rows <= 32 else 64


def _dense(rows: int, plan_: Plan) -> str:
    """The split dense stage's form (``DENSES``): ``"whole"`` where the row's tile is at most
    ``WHOLE_MAX_TILE`` and rows ≤ ``WHOLE_MAX_ROWS`` (what was measured faster on the GPU:
    docs/benchmarks/perf.md), else ``"tiles"``. ``QVLM_HADAMARD_WHOLE_ROWS`` overrides the row limit."""
    limit = int(os.environ.get(WHOLE_ENV, "") or WHOLE_MAX_ROWS)
    return "whole" if rows <= limit and plan_.mp * plan_.p <= WHOLE_MAX_TILE else "tiles"


def hadamard_q(x: torch.Tensor, t: OnlineHadamard, act: ActQuant | None, mode: InputMode = FLOAT_INPUT,
               *, silu: bool = False, block_k: int | None = None, dense: str | None = None):
    """``quantizer(x @ H)`` row by row (``fused``'s outputs by ``mode``) for ``x`` ``[M, n]``, a
    ``[B, T, H, D]`` view with contiguous D (rows (b, t), columns (h, d)), or with ``silu`` the fused
    gate/up output ``[M, 2n]`` whose SiLU(gate) · up is transformed. Triton only (``usable``).
    ``block_k`` and ``dense`` choose the m > 1 split's form (default ``_block_k``, ``_dense``)."""
    n = t.n
    if silu:
        if x.dim() != 2 or x.shape[1] != 2 * n or x.stride(1) != 1:
            raise ValueError(f"silu: a [rows, {2 * n}] gate/up output with contiguous columns, got {tuple(x.shape)}")
        B, T, D, sb, st, sh = 1, x.shape[0], n, 0, x.stride(0), 0
    elif x.dim() == 2:
        if x.stride(1) != 1:
            x = x.contiguous()
        B, T, D, sb, st, sh = 1, x.shape[0], x.shape[1], 0, x.stride(0), 0
    elif x.dim() == 4:
        if x.stride(3) != 1:
            raise ValueError("hadamard_q reads [B, T, H, D] views with contiguous D")
        B, T, _, D = x.shape
        sb, st, sh = x.stride(0), x.stride(1), x.stride(2)
    else:
        raise ValueError(f"hadamard_q takes [M, K] or [B, T, H, D], got {tuple(x.shape)}")
    width = n if silu else (x.shape[-1] if x.dim() == 2 else x.shape[2] * x.shape[3])
    if width != n:
        raise ValueError(f"online Hadamard of width {n} given rows of width {width}")
    why = usable(t, x.device, x.dtype)
    if why:
        raise ValueError(f"the fused online Hadamard does not run here: {why}")
    pl = plan(n)
    rows = B * T
    kind, out, scale, rowsum = fused._outputs(rows, n, x.device, x.dtype, act, mode)
    bits, sym, per_token, clip, s, z = fused._act_args(act, x.device)
    common = dict(SILU=silu, PREC="ieee" if x.dtype == torch.float32 else None, MODE=fused.MODES.index(kind),
                  BITS=bits, SYM=sym, PER_TOKEN=per_token, ROWSUM=rowsum is not None, num_warps=_warps(pl))
    sc = scale if scale is not None else s
    rs = rowsum if rowsum is not None else s
    if rows:
        if pl.m == 1:
            _wht_q_kernel[(rows,)](x, out, sc, rs, s, z, n, T, D, sb, st, sh, out.stride(0), math.sqrt(n), clip,
                                   P1=pl.p1, P2=pl.p2, LOG1=pl.p1.bit_length() - 1, LOG2=pl.p2.bit_length() - 1,
                                   **common)
        else:
            words = factor_bits(pl.m, pl.mp, x.device)
            bk = block_k or _block_k(rows)
            nb = -(-pl.m // bk)
            dt_out = x.dtype
            # pass 1 over (row, block of outputs); the float output is final, else h and the blocks'
            # statistics go to scratch for pass 2 (the quantizer needs the whole row's statistic)
            h = out if kind == "float" else torch.empty(rows, n, device=x.device, dtype=dt_out)
            stats = s if kind == "float" else torch.empty(rows, nb, 2, device=x.device, dtype=torch.float32)
            form = dense or _dense(rows, pl)
            if form not in DENSES:
                raise ValueError(f"dense={form!r}: expected one of {DENSES}")
            args = (x, words, h, stats, n, pl.m, words.shape[1], nb, T, D, sb, st, sh, h.stride(0), math.sqrt(n))
            stats_on = kind != "float" and per_token
            if form == "whole":  # ``plan`` keeps mp · p within MAX_TILE
                _dense_wht_whole_kernel[(rows, nb)](*args, BK=bk, P=pl.p, LOGP=pl.p.bit_length() - 1, MP=pl.mp,
                                                    SILU=silu, PREC=common["PREC"], STATS=stats_on, num_warps=8)
            else:
                _dense_wht_part_kernel[(rows, nb)](*args, BK=bk, P=pl.p, LOGP=pl.p.bit_length() - 1, BLOCK_I=BI,
                                                   SILU=silu, PREC=common["PREC"], STATS=stats_on, num_warps=4)
            if kind != "float":
                chunks = -(-n // CHUNK)
                # row sums: one program per row (a sum over programs would need a third pass)
                grid, loop = ((rows, 1), chunks) if rowsum is not None else ((rows, chunks), 1)
                _rows_q_stats_kernel[grid](h, stats, out, sc, rs, s, z, n, nb, loop, h.stride(0), out.stride(0),
                                           clip, CHUNK=CHUNK, NBP=max(2, 1 << (nb - 1).bit_length()),
                                           MODE=common["MODE"], BITS=bits, SYM=sym, PER_TOKEN=per_token,
                                           ROWSUM=rowsum is not None, num_warps=4)
    return fused._wrap(kind, out, scale, rowsum)


def eager_q(x: torch.Tensor, t, act: ActQuant | None, mode: InputMode = FLOAT_INPUT, *, silu: bool = False):
    """The reference and fallback of ``hadamard_q``: the producer's float output, the eager transform
    ``t``, then ``fused.rows_q`` (what the engine ran before this kernel)."""
    if silu:
        h = fused.silu_mul_q(x, None, FLOAT_INPUT)
    else:
        h = x.reshape(x.shape[0] * x.shape[1], -1) if x.dim() == 4 else x
    return fused.rows_q(t(h), act, mode)


KERNEL = "triton-hadamard-q"  # the engine's label for this kernel (``choice``; perf records)


def choice(layer, device, dtype, fused_producers: bool) -> str:
    """How the engine can apply ``layer``'s online transform: ``KERNEL``, or ``eager: <why>`` (the
    engine's producers are not fused here, ``QVLM_ONLINE_HADAMARD=eager``, or ``usable`` says no).
    Where it says ``KERNEL`` and nothing is forced, the engine may still pick eager by timing
    (``choose``)."""
    if not fused_producers:
        return "eager: the engine's producers are not fused (no Triton here, or no quantized input)"
    if impl() == "eager":
        return f"eager: {IMPL_ENV}=eager"
    why = usable(getattr(layer, "online", None), device, dtype)
    return f"eager: {why}" if why else KERNEL


# ---------------------------------------------------------------------------- timed choice per width

def pick(fused_ms: float, eager_ms: float, margin: float | None = None) -> str:
    """``KERNEL`` where the fused path is within ``margin`` (``select``'s ``LAYOUT_MARGIN``, 5 %) of
    the eager one, else ``eager``: the preference rule of ``select._choose_layout`` with the fused
    kernel preferred (one launch, nothing through memory in between)."""
    from .real import LAYOUT_MARGIN

    margin = LAYOUT_MARGIN if margin is None else margin
    return KERNEL if fused_ms <= eager_ms * (1 + margin) else "eager"


def graph_timer(fn, reps: int = 20) -> float:
    """ms per CUDA-graph replay of ``fn`` after a warm call (compile, autotune; also proves it
    capturable), as ``select`` times its candidates."""
    from .select import _time_graph_ms

    fn()
    return _time_graph_ms(fn, reps, "cuda")


def choose(cases: dict, plan, timer=None) -> dict:
    """The timed choice per transform width. ``cases``: key (e.g. ``"n=11008 silu·up"``) -> dict of
    phase -> ``(fused_fn, eager_fn)`` (the two paths on an input as that phase's rows produce it);
    ``plan``: ``(phase, rows, runs per generate)`` as ``select_kernels``'. ``timer(key, phase, path,
    fn) -> ms`` (default: ``graph_timer(fn)``; tests inject synthetic timings). Per key: each phase's
    ``fused_ms`` / ``eager_ms``, the workload costs ``sum(runs × ms)`` and ``choice`` (``pick``)."""
    timer = timer or (lambda _key, _phase, _path, fn: graph_timer(fn))
    out = {}
    for key, phases in cases.items():
        rec: dict = {"phases": {}}
        cost = {"fused": 0.0, "eager": 0.0}
        for ph, rows, runs in plan:
            if ph not in phases:
                continue  # the layer applies its transform itself in this phase (float input)
            fused_fn, eager_fn = phases[ph]
            t_f, t_e = timer(key, ph, "fused", fused_fn), timer(key, ph, "eager", eager_fn)
            rec["phases"][ph] = {"rows": rows, "runs": runs, "fused_ms": t_f, "eager_ms": t_e}
            cost["fused"] += runs * t_f
            cost["eager"] += runs * t_e
        rec["cost_fused_ms"], rec["cost_eager_ms"] = cost["fused"], cost["eager"]
        rec["choice"] = pick(cost["fused"], cost["eager"]) if rec["phases"] else KERNEL
        out[key] = rec
    return out
