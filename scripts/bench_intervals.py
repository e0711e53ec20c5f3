"""Speed and coverage of the leaderboard's intervals (harness.report.stats); numbers go to
docs/benchmarks/intervals.md.

    PYTHONPATH=. python scripts/bench_intervals.py [--results results/default] [--seeds results/calibration-seeds]

1. Time of ``build_board`` on committed runs (one run; four seeds).
2. The hand-written shared-resample bootstrap against ``scipy.stats.bootstrap`` (one call per
   statistic, percentile and BCa) on data shaped like the default suite.
3. Scaling to large tasks (questions per task).
4. Coverage of the across-seed interval on simulated calibration seeds with a known true gap:
   the t-interval with seed and question variance (what the leaderboard uses), a two-level
   bootstrap (resample seeds, then questions), and a t-interval over per-seed gaps alone.
5. Coverage on clustered data (several questions per image, answers correlated within an image):
   the bootstrap over images (what the leaderboard does for a task that declares them) against
   the bootstrap over questions, for a cell, a gap, and the across-seed interval.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.records import read_records  # noqa: E402
from harness.report.board import Run, build_board  # noqa: E402
from harness.report.stats import PairedBootstrap, TaskScores, combine_runs, percentile_interval  # noqa: E402


def best_of(fn, repeat=3):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def time_boards(results: Path, seeds: Path | None) -> None:
    runs = [Run(results.name, results, read_records(results / "records.jsonl"))]
    build_board(runs)  # imports scipy once
    t, board = best_of(lambda: build_board(runs))
    print(f"build_board, one run ({len(board.table)} rows × {len(board.tasks)} tasks, 2000 resamples): {t:.3f} s")
    if seeds is not None:
        more = [Run(d.name, d, read_records(d / "records.jsonl")) for d in sorted(seeds.glob("seed*"))]
        t, board = best_of(lambda: build_board(runs + more))
        print(f"build_board, {1 + len(more)} runs: {t:.3f} s")


def default_like(rows=15, T=3, n=150, seed=0):
    rng = np.random.default_rng(seed)
    return {f"t{t}": (rng.random((rows, n)) < rng.uniform(.7, .99, (rows, 1))).astype(float) for t in range(T)}


def weights_for(S, rows, T):
    """The default suite's statistics: cells, Avg, Δ ref, and 48 pairwise gaps."""
    n_stats = rows * T + rows + (rows - 1) + 48
    W = {t: np.zeros((n_stats, rows)) for t in S}
    i = 0
    for t in S:
        for r in range(rows):
            W[t][i, r] = 1
            i += 1
    for r in range(rows):
        for t in S:
            W[t][i, r] = 1 / T
        i += 1
    for r in range(1, rows):
        for t in S:
            W[t][i, r] += 1 / T
            W[t][i, 0] -= 1 / T
        i += 1
    for g in range(48):
        a, b, t = g % rows, (g + 1) % rows, f"t{g % T}"
        W[t][i, a] += 1
        W[t][i, b] -= 1
        i += 1
    return W


def scipy_vs_numpy() -> None:
    from scipy import stats

    rows, T = 15, 3
    S = default_like(rows, T)
    W = weights_for(S, rows, T)

    def ours():
        boot = PairedBootstrap({t: TaskScores(s[None]) for t, s in S.items()}, 2000, 0)
        return combine_runs(*boot.statistic(W))

    def scipy_all(method):
        out = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for s_idx in range(next(iter(W.values())).shape[0]):
                used = {t: w[s_idx] for t, w in W.items() if np.any(w[s_idx])}
                data = tuple(w @ S[t] for t, w in used.items())  # per-question contrast of each task
                res = stats.bootstrap(data, lambda *xs, axis=-1: sum(x.mean(axis=axis) for x in xs),
                                      n_resamples=2000, method=method, rng=0, paired=False, vectorized=True)
                out.append(res.confidence_interval)
        return out

    ours()
    t_ours, iv = best_of(ours)
    n = len(iv.value)
    print(f"shared-resample numpy bootstrap, {n} statistics: {t_ours * 1000:.0f} ms")
    for method in ("percentile", "BCa"):
        t, res = best_of(lambda: scipy_all(method), repeat=1)
        nan = sum(np.isnan(r.low) or np.isnan(r.high) for r in res)
        diff = np.abs(np.concatenate([[r.low for r in res], [r.high for r in res]])
                      - np.concatenate([iv.lo, iv.hi]))
        print(f"scipy.stats.bootstrap {method}, one call per statistic: {t * 1000:.0f} ms "
              f"({nan} NaN intervals; |bound − ours| median {100 * np.nanmedian(diff):.2f}, "
              f"max {100 * np.nanmax(diff):.2f} points; 150-question means move in steps of 0.67)")


def scaling() -> None:
    for n in (150, 2000, 20000, 100000):
        S = {f"t{t}": s for t, s in default_like(15, 3, n).items()}
        t, _ = best_of(lambda: PairedBootstrap({k: TaskScores(v[None]) for k, v in S.items()}, 2000, 0), repeat=1)
        print(f"resampling 3 tasks × {n} questions × 15 rows, 2000 resamples: {t:.2f} s")


def coverage(experiments=400, K=4, n=150, sigma=0.03, tau=0.15, rho=1.0, B=1000, seed=1) -> None:
    """Methods A and B answer question i in run k when latent_i + tau·noise_ki < p + sigma·shift_k.
    B's latent is the question's difficulty u_i; A's is rho·u_i + sqrt(1 − rho²)·e_i, also fixed
    across runs (rho < 1: A fails on its own subset of questions, a gap the runs share);
    shift_k is the calibration seed, noise_ki which questions a given quantization flips."""
    from scipy import stats

    rng = np.random.default_rng(seed)
    pa, pb = 0.70, 0.62

    def latent_a(u, e):
        return rho * u + np.sqrt(1 - rho ** 2) * e

    big = rng.random(4_000_000)
    truth = np.mean(latent_a(big, rng.random(big.size)) + tau * rng.standard_normal(big.size)
                    < pa + sigma * rng.standard_normal(big.size)) - \
        np.mean(big + tau * rng.standard_normal(big.size) < pb + sigma * rng.standard_normal(big.size))
    names = ("t, seeds + shared questions (leaderboard)", "two-level bootstrap (seeds, then questions)",
             "t over per-seed gaps only", "questions only (run-averaged bootstrap)")
    hits = dict.fromkeys(names, 0)
    widths = {k: [] for k in names}
    for _ in range(experiments):
        u, e = rng.random(n), rng.random(n)
        a = pa + sigma * rng.standard_normal(K)
        b = pb + sigma * rng.standard_normal(K)
        sa = (latent_a(u, e)[None] + tau * rng.standard_normal((K, n)) < a[:, None]).astype(float)
        sb = (u[None] + tau * rng.standard_normal((K, n)) < b[:, None]).astype(float)
        boot = PairedBootstrap({"t": TaskScores(np.stack([sa, sb], axis=1))}, B, int(rng.integers(1 << 30)))
        point, reps = boot.statistic({"t": np.array([[1.0, -1.0]])})
        iv = combine_runs(point, reps)
        g = point[:, 0]
        pick = rng.integers(0, K, size=(B, K))
        two = np.take_along_axis(reps[:, :, 0], pick, axis=1).mean(1)
        h = stats.t.ppf(0.975, K - 1) * g.std(ddof=1) / np.sqrt(K)
        found = {names[0]: (iv.lo[0], iv.hi[0]), names[1]: percentile_interval(two),
                 names[2]: (g.mean() - h, g.mean() + h), names[3]: percentile_interval(reps[:, :, 0].mean(1))}
        for name, (lo, hi) in found.items():
            hits[name] += lo <= truth <= hi
            widths[name].append(hi - lo)
    print(f"K={K} seeds, {n} questions, seed sd {sigma}, per-run flips {tau}, rho {rho} "
          f"({experiments} experiments, nominal 95 %):")
    for name in names:
        print(f"  {name}: {100 * hits[name] / experiments:.1f} % (mean width {100 * np.mean(widths[name]):.1f} points)")


def clustered_coverage(experiments=400, images=100, r=0.5, K=1, sigma=0.0, tau=0.5, B=1000, seed=2) -> None:
    """A VQAv2-like task: ``images`` images with 1–9 questions each (mean 5). Question i of image
    g has difficulty z_i = √r·a_g + √(1−r)·b_i; B answers it when z_i < Φ⁻¹(p_B); A when
    z_i + τ·w_i < c_A + σ·shift_k, with w_i = √r·e_g + √(1−r)·f_i (which questions the quantization
    flips, correlated within an image, shared by the runs) and c_A set so that P(A right) = p_A
    exactly at σ = 0. r is the within-image correlation of both; truth: p_A, and p_A − p_B. With
    K > 1 runs (seeds), the leaderboard's t-interval (seeds + shared resampled variance)."""
    from scipy import stats

    rng = np.random.default_rng([seed, int(100 * r), K])
    pa, pb = 0.70, 0.62
    ta, tb = stats.norm.ppf(pa) * np.sqrt(1 + tau ** 2), stats.norm.ppf(pb)
    if sigma:  # the seed shift moves A's accuracy; its expectation over seeds is the truth
        z = rng.standard_normal((2, 2_000_000))
        truth_a = float(np.mean(z[0] * np.sqrt(1 + tau ** 2) < ta + sigma * z[1]))
    else:
        truth_a = pa
    truths = {"cell A": truth_a, "gap A − B": truth_a - pb}
    hits = {(m, s): 0 for m in ("images", "questions") for s in truths}
    widths = {k: [] for k in hits}
    for _ in range(experiments):
        sizes = rng.integers(1, 10, images)
        g = np.repeat(np.arange(images), sizes)
        n = g.size
        zq = np.sqrt(r) * rng.standard_normal(images)[g] + np.sqrt(1 - r) * rng.standard_normal(n)
        wq = np.sqrt(r) * rng.standard_normal(images)[g] + np.sqrt(1 - r) * rng.standard_normal(n)
        shift = sigma * rng.standard_normal(K)
        sa = (zq[None] + tau * wq[None] < ta + shift[:, None]).astype(float)
        sb = np.broadcast_to((zq < tb).astype(float), (K, n))
        scores = np.stack([sa, sb], axis=1)  # (runs, rows, n)
        bseed = int(rng.integers(1 << 30))
        for method, clusters in (("images", g), ("questions", None)):
            boot = PairedBootstrap({"t": TaskScores(scores, clusters=clusters)}, B, bseed)
            iv = combine_runs(*boot.statistic({"t": np.array([[1.0, 0.0], [1.0, -1.0]])}))
            for j, name in enumerate(truths):
                hits[(method, name)] += iv.lo[j] <= truths[name] <= iv.hi[j]
                widths[(method, name)].append(iv.hi[j] - iv.lo[j])
    print(f"{images} images of 1–9 questions (mean 5), within-image correlation r={r}, "
          f"flips τ={tau}, K={K} runs, seed sd σ={sigma} ({experiments} experiments, nominal 95 %):")
    for name in truths:
        w_img, w_q = np.mean(widths[("images", name)]), np.mean(widths[("questions", name)])
        print(f"  {name}: images {100 * hits[('images', name)] / experiments:.1f} % (width {100 * w_img:.1f}), "
              f"questions {100 * hits[('questions', name)] / experiments:.1f} % (width {100 * w_q:.1f}); "
              f"width ratio {w_img / w_q:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", type=Path, default=Path("results/default"))
    ap.add_argument("--seeds", type=Path, default=Path("results/calibration-seeds"))
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}, "
          f"numpy {np.__version__}")
    if (args.results / "records.jsonl").exists():
        time_boards(args.results, args.seeds if args.seeds.exists() else None)
    scipy_vs_numpy()
    scaling()
    print("coverage of the true gap between two methods over calibration seeds and questions:")
    for sigma, tau, rho in ((0.03, 0.15, 1.0), (0.0, 0.15, 1.0), (0.05, 0.0, 1.0), (0.01, 0.1, 0.6),
                            (0.03, 0.1, 0.6)):
        coverage(sigma=sigma, tau=tau, rho=rho)
    print("coverage on clustered data (questions sharing an image), bootstrap over images vs questions:")
    for r in (0.0, 0.3, 0.6, 0.9):
        clustered_coverage(r=r)
    for r in (0.0, 0.6):
        clustered_coverage(r=r, K=4, sigma=0.03)


if __name__ == "__main__":
    main()
