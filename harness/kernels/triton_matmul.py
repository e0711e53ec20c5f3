"""Triton kernels of the real-kernel backend (GPU; they also run under ``TRITON_INTERPRET=1`` on CPU).

``wq_matmul``: ``y = x @ dequant(W).T`` for fp16 or bf16 ``x`` and int4-packed or int8-stored weights with
per-group scales and zero points. The weight is dequantized in registers exactly as the simulated
model does it, ``dtype((code - zero) * scale)`` in float32, so the only difference from the simulated
layer is the order of the float32 accumulation. Two shapes of the same arithmetic:
``gemv`` (CUDA-core multiply-add, for decode with a handful of rows) and ``dot`` (tensor cores).

``scaled_gemm``: ``y = s_a[m] * s_w[n] * sum_k A[m, k] * W[n, k]`` with integer-valued operands held
in FP8 e4m3 (|value| <= 16, exact) or INT8, accumulated in float32 / int32 (exact), scales applied
in the epilogue of the same kernel. 4-bit weights stay packed two a byte and are unpacked into the
tensor-core operand in registers. ``CORR`` subtracts ``zc[n] * rowsum_a[m]`` for int8-stored weights
whose zero point is not the storage offset (asymmetric 8-bit weights).
"""

from __future__ import annotations

import os

try:  # pragma: no cover - exercised where triton is installed
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # noqa: BLE001 - any import problem means "no triton here"
    triton = None
    tl = None
    HAS_TRITON = False

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


_CPU = {"on": False}


def interpret_on_cpu(on: bool = True) -> bool:
    """Let the kernels run on CPU tensors through Triton's interpreter (tests; needs
    ``TRITON_INTERPRET=1`` before this module is imported). Returns the previous setting."""
    prev = _CPU["on"]
    _CPU["on"] = bool(on)
    return prev


def fixed_config(keep: list) -> list:
    """The autotuner's candidates, or only the first under ``torch.use_deterministic_algorithms``
    (a suite's ``deterministic: true``): the fastest configuration is chosen by timing, so two runs
    may pick tiles with different K blocks, i.e. different reduction orders and output bits."""
    return keep[:1] if torch.are_deterministic_algorithms_enabled() else keep


def available(device: torch.device | str) -> bool:
    """Triton kernels run on CUDA; on the CPU only under the interpreter, when asked for."""
    if not HAS_TRITON:
        return False
    if str(device).startswith("cuda"):
        return not INTERPRET
    return INTERPRET and _CPU["on"]


if HAS_TRITON:

    # short autotuning benchmarks (ms): a perf run tunes dozens of shapes
    _BENCH = {"warmup": 5, "rep": 25}

    # ------------------------------------------------------------------ weight-dequant matmul

    def _gemv_configs():
        if INTERPRET:
            return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 64}, num_warps=4, num_stages=1)]
        out = []
        for bn, bk in ((16, 128), (16, 256), (32, 128), (32, 256), (64, 128), (8, 512)):
            for w in (4, 8):
                out.append(triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=3))
        return out

    def _dot_configs():
        if INTERPRET:
            return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4, num_stages=1)]
        cfgs = [
            # small M (decode, batch 8..64)
            (16, 32, 128, 4, 4), (16, 64, 128, 4, 4), (16, 64, 256, 4, 3), (32, 64, 128, 4, 4),
            (32, 128, 128, 4, 3),
            # large M (prefill)
            (64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (128, 256, 64, 8, 3),
        ]
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
                for m, n, k, w, s in cfgs]

    def _prune_wq(configs, named_args, **kwargs):
        K = named_args["K"]
        group = named_args["GROUP"] if "GROUP" in named_args else kwargs["GROUP"]
        mb = named_args["MB"] if "MB" in named_args else kwargs.get("MB", 1)
        keep = []
        for c in configs:
            bk = c.kwargs["BLOCK_K"]
            if K % bk:
                continue
            if "BLOCK_M" not in c.kwargs:  # gemv: keep the broadcast product within registers
                rows = kwargs.get("BLOCK_M", 1)
                if rows * c.kwargs["BLOCK_N"] * bk > 16384:
                    continue
            bm = c.kwargs.get("BLOCK_M")
            if bm is not None and mb <= 64 and bm > max(16, mb):
                continue  # decode rows: don't tile far past M
            if bm is not None and mb > 64 and bm < 64:
                continue
            keep.append(c)
        if not keep:  # small groups: shrink the K tile of the first config to fit
            import math as _m

            g_ = _m.gcd(K, group)
            bk = g_ & -g_  # the largest power of two dividing both
            if bk < 16:
                raise ValueError(f"no kernel tile divides K={K} and group={group}")
            c = configs[0]
            kw = dict(c.kwargs, BLOCK_K=bk)
            keep = [triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages)]
        return fixed_config(keep)

    @triton.autotune(configs=_gemv_configs(), key=["MB", "N", "K", "GROUP", "PACKED", "SPLIT"],
                     prune_configs_by={"early_config_prune": _prune_wq}, **_BENCH)
    @triton.jit
    def _wq_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, G, MB,
                        stride_xm, stride_ym, SPLIT, K_PER, stride_split,
                        PACKED: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # split-K: program (n, m, s) reduces K in [s * K_PER, (s + 1) * K_PER) into y[s] (float32
        # partials, summed by the caller); SPLIT == 1 is the plain GEMV (K_PER = K)
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_s = tl.program_id(2)
        k_lo = pid_s * K_PER
        k_hi = tl.minimum(K, k_lo + K_PER)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = offs_m < M
        n_ok = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if PACKED:
            HALF: tl.constexpr = BLOCK_K // 2
            kh = tl.arange(0, HALF)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                p = tl.load(w_ptr + offs_n[:, None] * (K // 2) + (k0 // 2 + kh)[None, :],
                            mask=n_ok[:, None], other=0)
                lo = (p & 15).to(tl.float32)
                hi = (p >> 4).to(tl.float32)
                if GROUP % BLOCK_K == 0:
                    g = k0 // GROUP
                    s = tl.load(s_ptr + offs_n * G + g, mask=n_ok, other=0.0)[:, None]
                    z = tl.load(z_ptr + offs_n * G + g, mask=n_ok, other=0.0)[:, None]
                    wlo = ((lo - z) * s).to(x_ptr.dtype.element_ty).to(tl.float32)
                    whi = ((hi - z) * s).to(x_ptr.dtype.element_ty).to(tl.float32)
                else:  # groups smaller than the tile: scale per column (even and odd apart)
                    ge = offs_n[:, None] * G + ((k0 + 2 * kh) // GROUP)[None, :]
                    go = offs_n[:, None] * G + ((k0 + 2 * kh + 1) // GROUP)[None, :]
                    wlo = ((lo - tl.load(z_ptr + ge, mask=n_ok[:, None], other=0.0))
                           * tl.load(s_ptr + ge, mask=n_ok[:, None], other=0.0)).to(x_ptr.dtype.element_ty).to(tl.float32)
                    whi = ((hi - tl.load(z_ptr + go, mask=n_ok[:, None], other=0.0))
                           * tl.load(s_ptr + go, mask=n_ok[:, None], other=0.0)).to(x_ptr.dtype.element_ty).to(tl.float32)
                xe = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + 2 * kh)[None, :],
                             mask=m_ok[:, None], other=0.0).to(tl.float32)
                xo = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + 2 * kh + 1)[None, :],
                             mask=m_ok[:, None], other=0.0).to(tl.float32)
                acc += tl.sum(xe[:, None, :] * wlo[None, :, :], axis=2)
                acc += tl.sum(xo[:, None, :] * whi[None, :, :], axis=2)
        else:
            kk = tl.arange(0, BLOCK_K)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                q = tl.load(w_ptr + offs_n[:, None] * K + (k0 + kk)[None, :],
                            mask=n_ok[:, None], other=0).to(tl.float32)
                if GROUP % BLOCK_K == 0:
                    g = k0 // GROUP
                    s = tl.load(s_ptr + offs_n * G + g, mask=n_ok, other=0.0)[:, None]
                    z = tl.load(z_ptr + offs_n * G + g, mask=n_ok, other=0.0)[:, None]
                else:
                    gi = offs_n[:, None] * G + ((k0 + kk) // GROUP)[None, :]
                    s = tl.load(s_ptr + gi, mask=n_ok[:, None], other=0.0)
                    z = tl.load(z_ptr + gi, mask=n_ok[:, None], other=0.0)
                w = ((q - z) * s).to(x_ptr.dtype.element_ty).to(tl.float32)
                xk = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + kk)[None, :],
                             mask=m_ok[:, None], other=0.0).to(tl.float32)
                acc += tl.sum(xk[:, None, :] * w[None, :, :], axis=2)
        tl.store(y_ptr + pid_s * stride_split + offs_m[:, None] * stride_ym + offs_n[None, :],
                 acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    @triton.autotune(configs=_dot_configs(), key=["MB", "N", "K", "GROUP", "PACKED"],
                     prune_configs_by={"early_config_prune": _prune_wq}, **_BENCH)
    @triton.jit
    def _wq_dot_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, G, MB,
                       stride_xm, stride_ym,
                       PACKED: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = offs_m < M
        n_ok = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if PACKED:
            HALF: tl.constexpr = BLOCK_K // 2
            kh = tl.arange(0, HALF)
            for k0 in range(0, K, BLOCK_K):
                p = tl.load(w_ptr + offs_n[:, None] * (K // 2) + (k0 // 2 + kh)[None, :],
                            mask=n_ok[:, None], other=0)
                if GROUP % BLOCK_K == 0:
                    g = k0 // GROUP
                    s = tl.load(s_ptr + offs_n * G + g, mask=n_ok, other=0.0)[:, None]
                    z = tl.load(z_ptr + offs_n * G + g, mask=n_ok, other=0.0)[:, None]
                    wlo = (((p & 15).to(tl.float32) - z) * s).to(x_ptr.dtype.element_ty)
                    whi = (((p >> 4).to(tl.float32) - z) * s).to(x_ptr.dtype.element_ty)
                else:
                    ge = offs_n[:, None] * G + ((k0 + 2 * kh) // GROUP)[None, :]
                    go = offs_n[:, None] * G + ((k0 + 2 * kh + 1) // GROUP)[None, :]
                    wlo = (((p & 15).to(tl.float32) - tl.load(z_ptr + ge, mask=n_ok[:, None], other=0.0))
                           * tl.load(s_ptr + ge, mask=n_ok[:, None], other=0.0)).to(x_ptr.dtype.element_ty)
                    whi = (((p >> 4).to(tl.float32) - tl.load(z_ptr + go, mask=n_ok[:, None], other=0.0))
                           * tl.load(s_ptr + go, mask=n_ok[:, None], other=0.0)).to(x_ptr.dtype.element_ty)
                w = tl.interleave(wlo, whi)  # [BLOCK_N, BLOCK_K], even columns from the low nibble
                xk = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + tl.arange(0, BLOCK_K))[None, :],
                             mask=m_ok[:, None], other=0.0)
                acc = tl.dot(xk, tl.trans(w), acc)
        else:
            kk = tl.arange(0, BLOCK_K)
            for k0 in range(0, K, BLOCK_K):
                q = tl.load(w_ptr + offs_n[:, None] * K + (k0 + kk)[None, :],
                            mask=n_ok[:, None], other=0).to(tl.float32)
                if GROUP % BLOCK_K == 0:
                    g = k0 // GROUP
                    s = tl.load(s_ptr + offs_n * G + g, mask=n_ok, other=0.0)[:, None]
                    z = tl.load(z_ptr + offs_n * G + g, mask=n_ok, other=0.0)[:, None]
                else:
                    gi = offs_n[:, None] * G + ((k0 + kk) // GROUP)[None, :]
                    s = tl.load(s_ptr + gi, mask=n_ok[:, None], other=0.0)
                    z = tl.load(z_ptr + gi, mask=n_ok[:, None], other=0.0)
                w = ((q - z) * s).to(x_ptr.dtype.element_ty)
                xk = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + kk)[None, :],
                             mask=m_ok[:, None], other=0.0)
                acc = tl.dot(xk, tl.trans(w), acc)
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])

    # ------------------------------------------------------------------ bandwidth-bound GEMV (v2)
    # Weights are read as 32-bit words (8 int4 or 4 int8 codes); each code becomes a float with
    # the 2**23 magic-number trick (no int->float conversion instructions), and for per-channel
    # scales the scale and zero point leave the inner loop:
    #     y[m, n] = s[n] * (sum_k x[m, k] * c[n, k] - z[n] * sum_k x[m, k])
    # Groups (GROUP % BLOCK_K == 0) apply the same identity per group.

    def _gemv2_configs():
        if INTERPRET:
            return [triton.Config({"BLOCK_N": 8, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
        return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                for bn, bk, w, s in ((4, 1024, 4, 2), (8, 512, 4, 2), (8, 1024, 4, 2), (16, 512, 4, 2),
                                     (16, 256, 4, 3), (8, 2048, 8, 1), (4, 2048, 4, 1), (32, 256, 4, 3))]

    def _prune_gemv2(configs, named_args, **kwargs):
        K = named_args["K"]
        group = kwargs.get("GROUP", named_args.get("GROUP"))
        rows = kwargs.get("BLOCK_M", 1)
        keep = [c for c in configs if K % c.kwargs["BLOCK_K"] == 0 and group % c.kwargs["BLOCK_K"] == 0
                and rows * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= 65536]
        if not keep:
            import math as _m

            g_ = _m.gcd(K, group)
            bk = g_ & -g_  # the largest power of two dividing both
            keep = [triton.Config({"BLOCK_N": 8, "BLOCK_K": bk}, num_warps=4, num_stages=2)]
        return fixed_config(keep)

    @triton.autotune(configs=_gemv2_configs(), key=["MB", "N", "K", "GROUP", "BITS"],
                     prune_configs_by={"early_config_prune": _prune_gemv2}, **_BENCH)
    @triton.jit
    def _gemv2_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, G, MB, stride_xm, stride_ym,
                      BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        PER: tl.constexpr = 32 // BITS  # codes per 32-bit word
        MASK: tl.constexpr = (1 << BITS) - 1
        BW: tl.constexpr = BLOCK_K // PER  # words per row per tile
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = offs_m < M
        n_ok = offs_n < N
        KW = K // PER
        wo = tl.arange(0, BW)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        xsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            v = tl.load(w_ptr + offs_n[:, None] * KW + (k0 // PER + wo)[None, :], mask=n_ok[:, None], other=0)
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            tsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for j in tl.static_range(PER):
                c = (v >> (BITS * j)) & MASK
                if BITS == 8:
                    c = c ^ 0x80  # signed byte -> byte + 128
                c = (c | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                if BITS == 8:
                    c = c - 128.0
                xj = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + PER * wo + j)[None, :],
                             mask=m_ok[:, None], other=0.0).to(tl.float32)
                part += tl.sum(xj[:, None, :] * c[None, :, :], axis=2)
                tsum += tl.sum(xj, axis=1)
            if GROUP == K:
                acc += part
                xsum += tsum
            else:
                g = k0 // GROUP
                s = tl.load(s_ptr + offs_n * G + g, mask=n_ok, other=0.0)
                z = tl.load(z_ptr + offs_n * G + g, mask=n_ok, other=0.0)
                acc += s[None, :] * (part - z[None, :] * tsum[:, None])
        if GROUP == K:
            s = tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)
            z = tl.load(z_ptr + offs_n, mask=n_ok, other=0.0)
            acc = s[None, :] * (acc - z[None, :] * xsum[:, None])
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])

    # ------------------------------------------------------------------ integer tensor-core GEMM

    def _gemm_configs():
        if INTERPRET:
            return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4},
                                  num_warps=4, num_stages=1)]
        cfgs = [(128, 128, 128, 8, 3), (128, 256, 128, 8, 3), (256, 128, 128, 8, 3),
                (64, 128, 128, 4, 4), (128, 64, 128, 4, 4), (128, 128, 64, 4, 4)]
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8},
                              num_warps=w, num_stages=s) for m, n, k, w, s in cfgs]

    def _prune_gemm(configs, named_args, **kwargs):
        K = named_args["K"]
        keep = [c for c in configs if K % c.kwargs["BLOCK_K"] == 0]
        return fixed_config(keep or [configs[-1]])

    @triton.autotune(configs=_gemm_configs(), key=["MB", "N", "K", "WFMT", "FP8", "CORR"],
                     prune_configs_by={"early_config_prune": _prune_gemm}, **_BENCH)
    @triton.jit
    def _scaled_gemm_kernel(a_ptr, w_ptr, zw_ptr, sa_ptr, sw_ptr, rs_ptr, y_ptr, M, N, K, MB,
                            WFMT: tl.constexpr, FP8: tl.constexpr, CORR: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            GROUP_M: tl.constexpr):
        # WFMT 0: int8 stored [N, K]; 1: int4 packed [N, K // 2] minus per-channel zero; 2: fp8 [N, K]
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * num_n
        gid = pid // per_group
        first_m = gid * GROUP_M
        gsize = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + ((pid % per_group) % gsize)
        pid_n = (pid % per_group) // gsize
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = offs_m < M
        n_ok = offs_n < N
        if FP8:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        if WFMT == 1:
            zq = tl.load(zw_ptr + offs_n, mask=n_ok, other=0.0).to(tl.int32)
        kk = tl.arange(0, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            # masked rows/columns are never stored, so no fill value (0 would not cast to fp8)
            a = tl.load(a_ptr + offs_m[:, None] * K + (k0 + kk)[None, :], mask=m_ok[:, None])
            if WFMT == 1:
                HALF: tl.constexpr = BLOCK_K // 2
                p = tl.load(w_ptr + offs_n[:, None] * (K // 2) + (k0 // 2 + tl.arange(0, HALF))[None, :],
                            mask=n_ok[:, None], other=0).to(tl.int32)
                wi = tl.interleave((p & 15) - zq[:, None], (p >> 4) - zq[:, None])
                if FP8:
                    w = wi.to(tl.float32).to(tl.float8e4nv)
                else:
                    w = wi.to(tl.int8)
            else:
                w = tl.load(w_ptr + offs_n[:, None] * K + (k0 + kk)[None, :], mask=n_ok[:, None])
            if FP8:
                acc = tl.dot(a, tl.trans(w), acc)
            else:
                acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)
        if CORR:
            zc = tl.load(zw_ptr + offs_n, mask=n_ok, other=0.0).to(tl.int32)
            rs = tl.load(rs_ptr + offs_m, mask=m_ok, other=0)
            acc = acc - zc[None, :] * rs[:, None]
        sa = tl.load(sa_ptr + offs_m, mask=m_ok, other=0.0)
        sw = tl.load(sw_ptr + offs_n, mask=n_ok, other=0.0)
        y = acc.to(tl.float32) * sa[:, None] * sw[None, :]
        tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


    # ------------------------------------------------------------------ words -> weight (gemlite layout)

    @triton.jit
    def _dequant_words_kernel(wq_ptr, s_ptr, z_ptr, y_ptr, K, N, GROUP_K, stride_wr, stride_sg,
                              NBITS: tl.constexpr, PER: tl.constexpr, BLOCK_K: tl.constexpr,
                              BLOCK_N: tl.constexpr):
        # y[k, n] = dtype((code(k, n) - z[g, n]) * s[g, n]), code k of column n at bits (k % PER) * NBITS
        # of word [k // PER, n]; the product of a small integer and a 16-bit float is exact in
        # float32, so the one rounding to the output dtype equals the 16-bit arithmetic of the reference
        offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = (offs_k < K)[:, None] & (offs_n < N)[None, :]
        words = tl.load(wq_ptr + (offs_k // PER)[:, None] * stride_wr + offs_n[None, :], mask=ok, other=0)
        q = (words.to(tl.int32) >> ((offs_k % PER) * NBITS)[:, None]) & ((1 << NBITS) - 1)
        g = (offs_k // GROUP_K)[:, None] * stride_sg + offs_n[None, :]
        s = tl.load(s_ptr + g, mask=ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g, mask=ok, other=0.0).to(tl.float32)
        w = (q.to(tl.float32) - z) * s
        tl.store(y_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(y_ptr.dtype.element_ty), mask=ok)


SPLIT_ALIGN = 512  # K slices are multiples of every BLOCK_K the GEMV tries (and of K's own tiles)
SPLIT_PROGRAMS_PER_SM = 2  # how many GEMV programs per SM split-K aims for


def splitk_factor(n: int, m: int, k: int, device) -> int:
    """How many K slices give a decode GEMV about ``SPLIT_PROGRAMS_PER_SM`` programs per SM: a narrow
    layer with a long K (7B o/down: N 4096, K 4096/11008) otherwise runs ~N/32 programs on 132 SMs
    (the H200 measured our INT8 GEMV at 0.71-0.84x cuBLAS fp16 there). At least 1; slices of at least
    ``SPLIT_ALIGN``."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if str(device).startswith("cuda") else 4
    programs = triton.cdiv(n, 32) * triton.cdiv(m, 8)
    want = triton.cdiv(SPLIT_PROGRAMS_PER_SM * sms, programs)
    return max(1, min(want, k // SPLIT_ALIGN))


def _mb(m: int) -> int:
    """Row-count bucket for autotuning keys: exact up to 64 rows, then powers of two."""
    if m <= 64:
        return m
    return 1 << (m - 1).bit_length()


def wq_matmul(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
              packed: bool, group: int, mode: str = "dot") -> torch.Tensor:
    """``x [M, K]`` fp16 times dequantized weights -> ``[M, N]`` fp16. ``mode``: 'gemv', 'gemv-splitk'
    (the GEMV over K slices, float32 partials summed after it: ``splitk_factor``) or 'dot'."""
    M, K = x.shape
    N = w.shape[0]
    G = scale.shape[1]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if x.stride(1) != 1:
        x = x.contiguous()
    if mode in ("gemv", "gemv-splitk"):
        bm = 1 if M == 1 else min(8, 1 << (M - 1).bit_length())
        split = splitk_factor(N, M, K, x.device) if mode == "gemv-splitk" else 1
        if split > 1:
            k_per = triton.cdiv(triton.cdiv(K, split), SPLIT_ALIGN) * SPLIT_ALIGN
            split = triton.cdiv(K, k_per)
            part = torch.empty((split, M, N), device=x.device, dtype=torch.float32)
        else:
            k_per, part = K, y
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, bm), split)  # noqa: E731
        _wq_gemv_kernel[grid](x, w, scale, zero, part, M, N, K, G, _mb(M), x.stride(0), part.stride(-2),
                              split, k_per, part.stride(0) if split > 1 else 0,
                              PACKED=packed, GROUP=group, BLOCK_M=bm)
        if split > 1:
            y.copy_(part.sum(0))  # the float32 partials, rounded once to the output dtype
    else:
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, meta["BLOCK_M"]))  # noqa: E731
        _wq_dot_kernel[grid](x, w, scale, zero, y, M, N, K, G, _mb(M), x.stride(0), y.stride(0),
                             PACKED=packed, GROUP=group)
    return y


def wq_gemv2(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
             bits: int, group: int) -> torch.Tensor:
    """Decode GEMV on 32-bit words of codes (``bits`` 4: packed int4; 8: int8 storage)."""
    M, K = x.shape
    N = w.shape[0]
    G = scale.shape[1]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if x.stride(1) != 1:
        x = x.contiguous()
    words = w.view(torch.int32)
    bm = 1 if M == 1 else min(8, 1 << (M - 1).bit_length())
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, bm))  # noqa: E731
    _gemv2_kernel[grid](x, words, scale, zero, y, M, N, K, G, _mb(M), x.stride(0), y.stride(0),
                        BITS=bits, GROUP=group, BLOCK_M=bm)
    return y


def scaled_gemm(a: torch.Tensor, w: torch.Tensor, zw: torch.Tensor, sa: torch.Tensor,
                sw: torch.Tensor, rowsum: torch.Tensor | None, wfmt: int, fp8: bool,
                corr: bool, out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Integer-operand GEMM with the row and column scales applied in the epilogue."""
    M, K = a.shape
    N = w.shape[0]
    y = torch.empty((M, N), device=a.device, dtype=out_dtype)
    rs = rowsum if rowsum is not None else sa  # unused unless corr
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _scaled_gemm_kernel[grid](a, w, zw, sa, sw, rs, y, M, N, K, _mb(M), WFMT=wfmt, FP8=fp8, CORR=corr)
    return y


def dequant_words(wq: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, nbits: int, per_word: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """gemlite's packed weight as ``[K, N]`` in ``dtype``: the arithmetic of
    ``gemlite_kernels.dequant_kn`` (the reference, in torch) in one pass over the words.

    ``wq [K / per_word, N]`` int32 words (int8 where a word holds 2 codes), ``scales`` / ``zeros``
    ``[G, N]``. Replaces the inductor-compiled reference on the GPU, whose compile failed there
    (``RuntimeError when making fake tensor call`` on gemlite's tensors)."""
    words, n = wq.shape
    k = words * per_word
    g = scales.shape[0]
    if k % g or zeros.shape != scales.shape or wq.stride(1) != 1 or scales.stride(1) != 1:
        raise ValueError(f"dequant_words: {k} codes in {g} groups, zeros {tuple(zeros.shape)}, scales "
                         f"{tuple(scales.shape)} (both [G, N], row-major), words strides {wq.stride()}")
    zeros = zeros.contiguous()
    y = torch.empty((k, n), device=wq.device, dtype=dtype)
    bk, bn = 64, 64
    _dequant_words_kernel[(triton.cdiv(k, bk), triton.cdiv(n, bn))](
        wq, scales, zeros, y, k, n, k // g, wq.stride(0), scales.stride(0),
        NBITS=nbits, PER=per_word, BLOCK_K=bk, BLOCK_N=bn)
    return y
