"""Confidence intervals for leaderboard numbers: a paired, stratified, clustered bootstrap.

Every row of a leaderboard is scored on the same questions, so one set of resamples per task,
shared by every row (and every run), gives each statistic that is linear in the task means (a
cell, a row's average over tasks, the difference of two rows) a *paired* interval at once: both
sides of a difference see the same resampled questions, so the question-difficulty noise they
share cancels. Tasks are resampled independently (stratified): the average over tasks keeps each
task's weight, as the table's Avg does.

A task declares its cluster unit (``cluster_unit`` in its YAML's metadata): the resamples draw
whole clusters (the image, for VQAv2, where several questions share one) with replacement and
keep every question of a drawn cluster, so answers that correlate within an image widen the
interval as they should. A task with one question per cluster (ScienceQA, VizWiz, or clusters not
declared) is resampled by question, draw for draw as before clustering existed.

With several runs (calibration seeds) evaluated on the same questions, a statistic's seed-to-seed
variance and its cluster-resampling variance add; the interval is a t-interval with
Welch–Satterthwaite degrees of freedom (see ``combine_runs``'s docstring for why not a two-level
bootstrap). Resamples are drawn from ``numpy.random.default_rng((seed, task))``, so a cell's
interval does not change when a row is added to the table.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field

import numpy as np

DEFAULT_RESAMPLES = 2000
DEFAULT_LEVEL = 0.95
# resample weights are built in chunks of at most this many (resample, question) entries: the
# counting stays in cache (docs/benchmarks/intervals.md) and a 100k-question task does not need a
# (2000, 100k) matrix at once
_CHUNK_ENTRIES = 250_000


def task_rng(seed: int, task: str) -> np.random.Generator:
    """The generator of one task's resamples: depends on the seed and the task name only."""
    digest = int.from_bytes(hashlib.sha256(task.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, digest])


def resample_counts(n: int, n_resamples: int, rng: np.random.Generator, start: int, stop: int) -> np.ndarray:
    """How often each of ``n`` questions is drawn in resamples ``start:stop`` (float64, (stop-start, n)).

    Call with consecutive ranges on one generator: the draws are the same whatever the chunking.
    """
    k = stop - start
    idx = rng.integers(0, n, size=(k, n))
    idx += (np.arange(k) * n)[:, None]
    return np.bincount(idx.ravel(), minlength=k * n).reshape(k, n).astype(np.float64)


QUESTION = "question"  # the cluster unit of a task whose questions are resampled one by one


def cluster_index(labels) -> np.ndarray:
    """Cluster labels of the questions (any hashable values) as indices 0..C-1 in order of first
    appearance: one question per cluster gives ``arange(n)``, the question bootstrap's own draws."""
    first: dict = {}
    return np.fromiter((first.setdefault(c, len(first)) for c in labels), dtype=np.int64, count=len(labels))


@dataclass
class TaskScores:
    """Per-question scores of one task: ``scores[run, row, question]`` (NaN: not scored there).

    ``fallback``: for (run, row) pairs without per-question scores, ``(value, stderr)`` of the
    task mean (the record's own numbers); their resamples are ``value + stderr * z`` with one
    normal draw per resample, independent of every other row (so gaps involving them are unpaired).
    ``clusters``: the cluster of each question (indices 0..C-1, :func:`cluster_index`), or None:
    every question its own cluster. ``unit`` names the cluster (``"image"``; ``"question"``).
    """

    scores: np.ndarray
    fallback: dict[tuple[int, int], tuple[float, float]] = field(default_factory=dict)
    clusters: np.ndarray | None = None
    unit: str = QUESTION

    def __post_init__(self):
        if self.clusters is not None:
            c = np.asarray(self.clusters)
            n = np.shape(self.scores)[-1]
            if c.shape != (n,) or not np.issubdtype(c.dtype, np.integer):
                raise ValueError(f"clusters must be one integer index per question ({n}), got {c.shape} {c.dtype}")
            if n and (c.min() < 0 or np.bincount(c).min() == 0):
                raise ValueError("clusters must index 0..C-1 with every cluster used (harness.report.stats.cluster_index)")
            self.clusters = c

    @property
    def n_clusters(self) -> int:
        n = np.shape(self.scores)[-1]
        return n if self.clusters is None or not n else int(self.clusters.max()) + 1


class PairedBootstrap:
    """Resampled task means of every (run, row), from which any linear statistic gets an interval.

    ``tasks``: task name -> ``TaskScores``; every task has the same (runs, rows) shape. Scores are
    fractions (0..1) and statistics come out in the same units; the leaderboard multiplies by 100.
    """

    def __init__(self, tasks: dict[str, TaskScores], n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0):
        if n_resamples < 100:
            raise ValueError(f"n_resamples={n_resamples}: use at least 100 resamples (default {DEFAULT_RESAMPLES})")
        if not tasks:
            raise ValueError("no tasks to resample")
        shapes = {ts.scores.shape[:2] for ts in tasks.values()}
        if len(shapes) != 1:
            raise ValueError(f"every task needs the same (runs, rows) shape, got {sorted(shapes)}")
        self.runs, self.rows = shapes.pop()
        self.tasks = list(tasks)
        self.n_resamples = n_resamples
        self.point: dict[str, np.ndarray] = {}  # task -> (runs, rows)
        self.reps: dict[str, np.ndarray] = {}  # task -> (B, runs, rows)
        for name, ts in tasks.items():
            self.point[name], self.reps[name] = self._task(name, ts, seed)

    def _task(self, name: str, ts: TaskScores, seed: int) -> tuple[np.ndarray, np.ndarray]:
        s = np.asarray(ts.scores, dtype=np.float64)
        runs, rows, n = s.shape
        present = ~np.isnan(s)
        flat = np.where(present, s, 0.0).reshape(runs * rows, n)
        mask = present.reshape(runs * rows, n).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            point = (flat.sum(1) / mask.sum(1)).reshape(runs, rows)
        reps = np.empty((self.n_resamples, runs * rows))
        rng = task_rng(seed, name)
        # clusters: C of them drawn with replacement, each question weighted by its cluster's
        # draws; one question per cluster is the question bootstrap (the same draws, exactly)
        clusters = ts.clusters
        n_draw = ts.n_clusters
        if clusters is not None and n_draw == n and np.array_equal(clusters, np.arange(n)):
            clusters = None  # the question bootstrap; not even a copy of the counts (BLAS sums
            # can depend on the operands' memory alignment, and this must be bit for bit the same)
        # every row scored on every question, one question per cluster: each resample has n
        complete = bool(mask.all()) and n_draw == n
        if n:
            step = max(1, _CHUNK_ENTRIES // n)
            for start in range(0, self.n_resamples, step):
                stop = min(start + step, self.n_resamples)
                w = resample_counts(n_draw, self.n_resamples, rng, start, stop)
                if clusters is not None:
                    w = w[:, clusters]
                with np.errstate(invalid="ignore", divide="ignore"):
                    reps[start:stop] = (w @ flat.T) / (n if complete else w @ mask.T)
        else:
            reps[:] = np.nan
        # a resample that draws none of a partly scored row's questions keeps the row's mean
        # (only possible for rows scored on a few of the task's questions)
        reps = np.where(np.isnan(reps) & ~np.isnan(point.ravel()), point.ravel(), reps)
        reps = reps.reshape(self.n_resamples, runs, rows)
        if ts.fallback:
            z = task_rng(seed + 1, name).standard_normal((self.n_resamples, rows))
            for (k, r), (value, se) in ts.fallback.items():
                point[k, r] = value
                # the same draw for a row in every run: the runs share the questions
                reps[:, k, r] = value + (se or 0.0) * z[:, r]
        return point, reps

    def statistic(self, weights: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Point values ``(runs, S)`` and resamples ``(B, runs, S)`` of S linear statistics.

        ``weights[task]``: ``(S, rows)``; statistic s of run k is sum over tasks of
        ``weights[task][s] @ mean[task][k]``. A statistic is NaN in a run missing any row it weighs.
        """
        point = rep = None
        for name, w in weights.items():
            w = np.atleast_2d(np.asarray(w, dtype=np.float64))
            used = w != 0
            p = self.point[name]
            # NaN * 0 would leak NaN from rows a statistic does not use: zero them, then mark
            # the runs where a used row is missing
            missing = np.isnan(p)[:, None, :] & used[None, :, :]  # (runs, S, rows)
            pt = np.where(np.isnan(p), 0.0, p) @ w.T
            pt[missing.any(-1)] = np.nan
            rr = np.where(np.isnan(self.reps[name]), 0.0, self.reps[name]) @ w.T
            rr[:, np.isnan(pt)] = np.nan
            point = pt if point is None else point + pt
            rep = rr if rep is None else rep + rr
        return point, rep


@dataclass
class Interval:
    """Point values and bounds of S statistics; ``runs``: how many runs each one averages;
    ``sd``: the sample standard deviation of the per-run values (NaN with one run); ``se``: the
    combined standard error where the runs differ (NaN where the interval is a percentile one)."""

    value: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    runs: np.ndarray
    sd: np.ndarray
    se: np.ndarray

    def excludes_zero(self) -> np.ndarray:
        return (self.lo > 0) | (self.hi < 0)


def percentile_interval(reps: np.ndarray, level: float = DEFAULT_LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap bounds over axis 0, ignoring NaN resamples."""
    a = (1 - level) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanquantile(reps, [a, 1 - a], axis=0)
    return lo, hi


def combine_runs(point: np.ndarray, reps: np.ndarray, level: float = DEFAULT_LEVEL,
                 bounds: tuple[float, float] = (-np.inf, np.inf)) -> Interval:
    """Intervals of S statistics from their per-run values ``(runs, S)`` and resamples ``(B, runs, S)``.

    One run, or runs that agree exactly (the reference row): the percentile bootstrap interval of
    the run-averaged statistic. Runs that differ (calibration seeds on the same questions): the mean
    ḡ over the K runs that have the statistic, ± t · se, clipped to ``bounds``. Per question i and
    run k the statistic is d_ki = μ + α_i (the question) + β_k (the seed) + γ_ki (their
    interaction), so Var ḡ = σ_α²/n + σ_β²/K + σ_γ²/(nK) (with clusters, σ_α²/n is the variance
    of the question mean under cluster resampling, and the bootstrap variances below estimate
    that one). Its estimate is

        se² = s²/K + max(0, (K · v_avg − v_run) / (K − 1))

    s²: the variance of the K per-run values (estimates σ_β² + σ_γ²/n); v_avg: the bootstrap
    variance of the run-averaged statistic, v_run: the mean over runs of each run's bootstrap
    variance (K · v_avg − v_run)/(K − 1) estimates σ_α²/n, the question noise the runs share,
    without counting the interaction twice (it is already in s²). Degrees of freedom:
    Welch–Satterthwaite with K − 1 for the seed term, df = (K − 1) · se⁴ / (s²/K)².

    A bootstrap over 3–5 seeds would treat those seeds as the whole population: its variance is
    (K−1)/K of s²/K and it uses normal, not t, quantiles — at K = 4 its seed term is about half as
    wide as the t-interval's. scripts/bench_intervals.py measures the coverage of both.
    """
    point = np.asarray(point, dtype=np.float64)
    valid = ~np.isnan(point)
    k = valid.sum(0)
    S = point.shape[1]
    lo, hi, sd, se = (np.full(S, np.nan) for _ in range(4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # statistics no run has: all-NaN slices
        value = np.nanmean(point, axis=0)
        q = np.nanmean(reps, axis=1)  # (B, S): the run-averaged statistic per resample
        multi = k > 1
        sd[multi] = np.nanstd(point[:, multi], axis=0, ddof=1)
        # runs that agree to rounding (the reference row) have no seed noise
        spread = np.nanmax(point, axis=0) - np.nanmin(point, axis=0)
    sd[multi & (spread <= 1e-12 * np.maximum(1.0, np.abs(value)))] = 0.0
    seed_var = np.where(multi, np.nan_to_num(sd) ** 2 / np.maximum(k, 1), 0.0)
    boot = (k > 0) & (seed_var == 0)
    if boot.any():
        lo[boot], hi[boot] = percentile_interval(q[:, boot], level)
    tcase = seed_var > 0
    if tcase.any():
        from scipy import stats

        kk = k[tcase]
        v_avg = np.nanvar(q[:, tcase], axis=0, ddof=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # runs without the statistic: all NaN
            v_run = np.nanmean(np.nanvar(reps[:, :, tcase], axis=0, ddof=1), axis=0)
        shared = np.maximum(0.0, (kk * v_avg - v_run) / (kk - 1))
        se2 = seed_var[tcase] + shared
        df = (kk - 1) * se2 ** 2 / seed_var[tcase] ** 2
        se[tcase] = np.sqrt(se2)
        half = stats.t.ppf(0.5 + level / 2, df) * se[tcase]
        lo[tcase] = np.maximum(value[tcase] - half, bounds[0])
        hi[tcase] = np.minimum(value[tcase] + half, bounds[1])
    return Interval(value, lo, hi, k, sd, se)
