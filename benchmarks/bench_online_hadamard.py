"""CPU cost of QuaRot's online Hadamard per token row, before and after prime-power Paley factors.

Run from the repository root (one intra-op thread unless ``--threads``)::

    python benchmarks/bench_online_hadamard.py [--threads 1] [--rows 1 16] [--dtype float32]

Prints, per width, the microseconds per token row of ``x @ H`` (``x`` of shape ``[rows, n]``; the
fastest of repeated calls, so that a shared machine's load drops out):

* ``before``: the factorization of the rule that knew only prime fields (11008 = 5504 · 2), applied
  as the perf engine did (its ``OnlineHadamard``: Walsh–Hadamard transform, then a dense product
  by the non-power-of-two factor) and as ``apply_hadamard`` did (that factor by FFT
  from order 64 on);
* ``after``: ``hadamard_factors`` today (11008 = 344 · 32, Paley I over GF(7³)), through the perf
  engine's ``OnlineHadamard`` and through ``apply_hadamard``;

then LLaVA-1.5-7B's ``down_proj`` product (the layer the transform precedes) for scale, and per
Paley order the dense product against the FFT (``FFT_MIN_ORDER`` is their crossover).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from harness.quant import transforms as T

try:  # the engine's online transforms, in harness/kernels/ once the perf split lands (issue 28)
    from harness.kernels.online import OnlineHadamard
except ImportError:
    from harness.perf.online import OnlineHadamard

WIDTHS = (4096, 11008, 14336, 18944, 29568)
ORDERS = (108, 148, 244, 344, 500, 924, 1332)


def _prime_field_factors(n: int) -> tuple[int, int]:
    """The factorization before prime powers: ``m = odd · 2^j`` smallest with 1, 2 or a Paley
    order over a prime field (q + 1 for a prime q ≡ 3 mod 4, 2(q + 1) for a prime q ≡ 1 mod 4)."""
    odd = n // (n & -n)
    for j in range((n // odd).bit_length()):
        m = odd << j
        if (m in (1, 2) or ((m - 1) % 4 == 3 and T._is_prime(m - 1))
                or (m % 2 == 0 and (m // 2 - 1) % 4 == 1 and T._is_prime(m // 2 - 1))):
            return m, n // m
    raise ValueError(n)


def _before(n: int):
    """The two ways the old factorization was applied: ``(engine, apply_hadamard)``."""
    m, p = _prime_field_factors(n)
    hm = T._dense_factor(m)

    def engine(x):  # harness/perf/online.py's arithmetic on the old factor
        y = T._fwht(x.reshape(*x.shape[:-1], m, p))
        if m > 1:
            y = torch.einsum("ik,...ij->...kj", hm.to(x.dtype), y)
        return (y / n ** 0.5).reshape(x.shape)

    def simulated(x):  # apply_hadamard's: by FFT from order 64 on
        return T._apply_factored(x, m, p, fft=m >= 64)
    return (m, p), engine, simulated


def _time(fn, x, budget_s: float = 0.5) -> float:
    """Seconds of one call, the fastest of those in ~budget_s after one warm-up (at least 5): on
    a shared machine the minimum is the cost, the rest is other people's load."""
    fn(x)
    times = []
    end = time.perf_counter() + budget_s
    while time.perf_counter() < end or len(times) < 5:
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    print(f"# {platform.machine()} ({os.cpu_count()} cores), torch {torch.__version__}, "
          f"{args.threads} thread(s), {args.dtype}; µs per token row (best of repeats)")
    print("| width | rows | before: m·p | engine | apply_hadamard | after: m·p | engine "
          "| apply_hadamard | engine before / after |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in WIDTHS:
        (m0, p0), old_engine, old_apply = _before(n)
        m1, p1 = T.hadamard_factors(n)
        new_engine = OnlineHadamard(n)
        for rows in args.rows:
            x = torch.randn(rows, n, generator=gen).to(dtype)
            t = [_time(fn, x) / rows * 1e6 for fn in (old_engine, old_apply, new_engine,
                                                      T.apply_hadamard)]
            print(f"| {n} | {rows} | {m0}·{p0} | {t[0]:.0f} | {t[1]:.0f} | {m1}·{p1} | {t[2]:.0f} "
                  f"| {t[3]:.0f} | {t[0] / t[2]:.1f}× |")
    w = torch.randn(4096, 11008, generator=gen).to(dtype)  # LLaVA-1.5-7B's down_proj, for scale
    for rows in args.rows:
        x = torch.randn(rows, 11008, generator=gen).to(dtype)
        print(f"| down_proj x @ Wᵀ (4096 × 11008), for scale | {rows} | | "
              f"{_time(lambda v: v @ w.T, x) / rows * 1e6:.0f} | | | | | |")
    print()
    print(f"Dense factor against FFT (FFT_MIN_ORDER = {T.FFT_MIN_ORDER}); µs per call on "
          "[vectors, m]")
    print("| m (Paley kind, q) | vectors | dense | FFT | FFT / dense |")
    print("|---|---|---|---|---|")
    for m in ORDERS:
        hm = T._dense_factor(m).to(dtype)
        for batch in (32, 512):  # rows · p vectors of length m
            z = torch.randn(batch, m, generator=gen).to(dtype)
            d = _time(lambda v: v @ hm, z)
            f = _time(lambda v: T._paley_apply(v, m), z)
            print(f"| {m} {T._paley_kind(m)} | {batch} | {d * 1e6:.0f} | {f * 1e6:.0f} "
                  f"| {f / d:.2f} |")


if __name__ == "__main__":
    main()
