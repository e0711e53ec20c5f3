"""harness.report.stats: bootstrap intervals checked against independent references (Wilson,
normal theory, scipy.stats.bootstrap, the t-interval) and against answers known by construction of
the data."""

import numpy as np
import pytest
from scipy import stats as sps

from harness.report import stats
from harness.report.stats import PairedBootstrap, TaskScores, combine_runs


def _boot(rows_by_task: dict[str, np.ndarray], n_resamples=2000, seed=0) -> PairedBootstrap:
    """rows_by_task[task]: (rows, n) for one run, or (runs, rows, n)."""
    return PairedBootstrap({t: TaskScores(a if a.ndim == 3 else a[None]) for t, a in rows_by_task.items()},
                           n_resamples=n_resamples, seed=seed)


def _interval(boot, weights, **kw):
    return combine_runs(*boot.statistic(weights), **kw)


def _bernoulli(n, ones, seed):
    x = np.zeros(n)
    x[:ones] = 1
    return np.random.default_rng(seed).permutation(x)


def wilson(k, n, z=1.959963984540054):
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_mean_of_bernoulli_scores_matches_wilson_at_large_n():
    x = _bernoulli(2000, 1400, 1)
    iv = _interval(_boot({"t": x[None]}, n_resamples=4000), {"t": np.eye(1)})
    lo, hi = wilson(1400, 2000)
    assert iv.value[0] == pytest.approx(0.7)
    # Wilson's half-width is 0.020; the bootstrap's Monte Carlo error at 4000 resamples ~0.001
    assert iv.lo[0] == pytest.approx(lo, abs=0.003) and iv.hi[0] == pytest.approx(hi, abs=0.003)


def _correlated_pair(n=400, seed=0):
    """Two rows that agree on most questions (as two quantized variants of one model do)."""
    rng = np.random.default_rng(seed)
    a = (rng.random(n) < 0.8).astype(float)
    b = a.copy()
    flip = rng.random(n) < 0.12
    b[flip] = 1 - b[flip]
    return a, b


def test_paired_gap_matches_scipy_bootstrap_and_normal_theory():
    a, b = _correlated_pair()
    iv = _interval(_boot({"t": np.stack([a, b])}, n_resamples=4000), {"t": np.array([[1.0, -1.0]])})
    d = a - b
    ref = sps.bootstrap((d,), np.mean, n_resamples=4000, method="percentile", rng=1).confidence_interval
    half = 1.959964 * d.std(ddof=1) / np.sqrt(len(d))
    assert iv.value[0] == pytest.approx(d.mean())
    assert iv.lo[0] == pytest.approx(ref.low, abs=0.1 * half)
    assert iv.hi[0] == pytest.approx(ref.high, abs=0.1 * half)
    assert (iv.hi[0] - iv.lo[0]) / 2 == pytest.approx(half, rel=0.08)


def test_paired_interval_is_narrower_than_unpaired_on_correlated_rows():
    a, b = _correlated_pair()
    iv = _interval(_boot({"t": np.stack([a, b])}), {"t": np.array([[1.0, -1.0]])})
    unpaired = sps.bootstrap((a, b), lambda x, y, axis=-1: x.mean(axis) - y.mean(axis), n_resamples=2000,
                             method="percentile", rng=1).confidence_interval
    paired_w, unpaired_w = iv.hi[0] - iv.lo[0], unpaired.high - unpaired.low
    # theory: var(a−b) = var a + var b − 2 cov; with 88 % agreement the paired width is ~0.45×
    assert paired_w < 0.6 * unpaired_w


def test_identical_rows_give_a_zero_width_gap():
    a, _ = _correlated_pair()
    iv = _interval(_boot({"t": np.stack([a, a]), "u": np.stack([a[::-1], a[::-1]])}),
                   {"t": np.array([[0.5, -0.5]]), "u": np.array([[0.5, -0.5]])})
    assert (iv.value[0], iv.lo[0], iv.hi[0]) == (0.0, 0.0, 0.0)
    assert not iv.excludes_zero()[0]


def test_a_constant_gap_is_recovered_exactly():
    rng = np.random.default_rng(3)
    a = rng.choice([0.3, 0.6, 1.0], size=300)  # VQA-style fractional scores
    iv = _interval(_boot({"t": np.stack([a, a - 0.25])}), {"t": np.array([[-1.0, 1.0]])})
    assert iv.value[0] == pytest.approx(-0.25, abs=1e-12)
    assert iv.lo[0] == pytest.approx(-0.25, abs=1e-12) and iv.hi[0] == pytest.approx(-0.25, abs=1e-12)
    assert iv.excludes_zero()[0]


def test_average_over_tasks_resamples_within_each_task():
    # tasks of different sizes and accuracies: the stratified Avg has variance (1/T²) Σ p(1−p)/n_t
    x = _bernoulli(400, 360, 4)
    y = _bernoulli(1600, 800, 5)
    iv = _interval(_boot({"x": x[None], "y": y[None]}, n_resamples=4000), {"x": np.eye(1) / 2, "y": np.eye(1) / 2})
    se = 0.5 * np.sqrt(x.var() / 400 + y.var() / 1600)
    assert iv.value[0] == pytest.approx((0.9 + 0.5) / 2)
    assert (iv.hi[0] - iv.lo[0]) / 2 == pytest.approx(1.959964 * se, rel=0.08)


def test_a_rows_interval_does_not_depend_on_other_rows_or_on_chunking(monkeypatch):
    a, b = _correlated_pair()
    one = _interval(_boot({"t": a[None]}), {"t": np.eye(1)})
    monkeypatch.setattr(stats, "_CHUNK_ENTRIES", 1000)  # 2 resamples per chunk
    two = _interval(_boot({"t": np.stack([a, b])}), {"t": np.array([[1.0, 0.0]])})
    assert (one.lo[0], one.hi[0]) == (two.lo[0], two.hi[0])


def test_a_row_scored_on_fewer_questions_keeps_its_own_mean():
    # row b has no score on the first 100 questions: its mean is over its own 300, the gap is paired
    # on the questions both have
    a, b = _correlated_pair()
    b_part = b.copy()
    b_part[:100] = np.nan
    iv = _interval(_boot({"t": np.stack([a, b_part])}), {"t": np.array([[0.0, 1.0], [1.0, -1.0]])})
    assert iv.value[0] == pytest.approx(np.nanmean(b_part))
    assert iv.value[1] == pytest.approx(a.mean() - np.nanmean(b_part))
    assert iv.lo[0] < iv.value[0] < iv.hi[0]


def test_rows_without_samples_fall_back_to_the_records_stderr_unpaired():
    a, _ = _correlated_pair()
    ts = TaskScores(np.stack([a, np.full_like(a, np.nan)])[None], fallback={(0, 1): (0.6, 0.02)})
    boot = PairedBootstrap({"t": ts}, n_resamples=4000)
    iv = combine_runs(*boot.statistic({"t": np.array([[0.0, 1.0], [1.0, -1.0]])}))
    assert iv.value[0] == 0.6
    assert (iv.lo[0], iv.hi[0]) == pytest.approx((0.6 - 1.96 * 0.02, 0.6 + 1.96 * 0.02), abs=0.003)
    se_gap = np.sqrt(a.var(ddof=1) / len(a) + 0.02 ** 2)  # independent: variances add
    assert (iv.hi[1] - iv.lo[1]) / 2 == pytest.approx(1.96 * se_gap, rel=0.08)


def test_runs_whose_gaps_are_question_independent_give_the_classic_t_interval():
    # in run k, row 1 = row 0 − c_k on every question: no question noise in the gap, only seed noise
    rng = np.random.default_rng(6)
    base = rng.choice([0.5, 0.8, 1.0], size=200)
    c = np.array([0.10, 0.14, 0.05, 0.11])
    scores = np.stack([np.stack([base, base - ck]) for ck in c])  # (runs, rows, n)
    iv = _interval(_boot({"t": scores}), {"t": np.array([[1.0, -1.0]])})
    lo, hi = sps.t.interval(0.95, len(c) - 1, loc=c.mean(), scale=c.std(ddof=1) / np.sqrt(len(c)))
    assert iv.value[0] == pytest.approx(c.mean())
    assert iv.sd[0] == pytest.approx(c.std(ddof=1))
    assert iv.lo[0] == pytest.approx(lo, rel=1e-9) and iv.hi[0] == pytest.approx(hi, rel=1e-9)
    assert iv.runs[0] == 4


def test_identical_runs_give_the_single_run_interval():
    a, b = _correlated_pair()
    one = _interval(_boot({"t": np.stack([a, b])}), {"t": np.array([[1.0, -1.0], [1.0, 0.0]])})
    three = _interval(_boot({"t": np.stack([np.stack([a, b])] * 3)}), {"t": np.array([[1.0, -1.0], [1.0, 0.0]])})
    np.testing.assert_allclose(three.lo, one.lo, rtol=0, atol=1e-12)
    np.testing.assert_allclose(three.hi, one.hi, rtol=0, atol=1e-12)


def _two_way(K=4, n=300, seed=7):
    """Two rows over K runs: shared question difficulty u, seed shifts, and per-run flips."""
    rng = np.random.default_rng(seed)
    u = rng.random(n)
    a = (u[None] + 0.15 * rng.standard_normal((K, n)) < 0.75 + 0.03 * rng.standard_normal((K, 1))).astype(float)
    b = (u[None] + 0.15 * rng.standard_normal((K, n)) < 0.65 + 0.03 * rng.standard_normal((K, 1))).astype(float)
    return np.stack([a, b], axis=1)  # (runs, rows, n)


def test_seed_interval_matches_the_two_way_anova_variance():
    # independent reference: the unbiased variance of the grand mean of a K × n two-way table
    # with random question, seed and interaction effects, (MS_q + MS_seed − MS_int) / (n K)
    scores = _two_way()
    K, n = scores.shape[0], scores.shape[2]
    iv = _interval(_boot({"t": scores}, n_resamples=4000), {"t": np.array([[1.0, -1.0]])})
    d = scores[:, 0] - scores[:, 1]
    resid = d - d.mean(1, keepdims=True) - d.mean(0, keepdims=True) + d.mean()
    ms_seed = n * d.mean(1).var(ddof=1)
    ms_q = K * d.mean(0).var(ddof=1)
    ms_int = (resid ** 2).sum() / ((K - 1) * (n - 1))
    var = (ms_q + ms_seed - ms_int) / (n * K)
    assert iv.value[0] == pytest.approx(d.mean())
    assert iv.se[0] == pytest.approx(np.sqrt(var), rel=0.05)
    # and the interval is that se times the t quantile at the Welch–Satterthwaite df
    seed_var = d.mean(1).var(ddof=1) / K
    df = (K - 1) * iv.se[0] ** 4 / seed_var ** 2
    assert (iv.hi[0] - iv.lo[0]) / 2 == pytest.approx(sps.t.ppf(0.975, df) * iv.se[0], rel=1e-9)


def test_a_row_missing_from_a_run_is_averaged_over_the_runs_that_have_it():
    a, b = _correlated_pair()
    scores = np.stack([np.stack([a, b]), np.stack([a, np.full_like(b, np.nan)]), np.stack([a, b])])
    iv = _interval(_boot({"t": scores}), {"t": np.array([[0.0, 1.0], [1.0, 0.0]])})
    assert list(iv.runs) == [2, 3]
    assert iv.value[0] == pytest.approx(b.mean())


def test_bad_input_names_the_fix():
    with pytest.raises(ValueError, match="at least 100 resamples"):
        _boot({"t": np.ones((1, 5))}, n_resamples=10)
    with pytest.raises(ValueError, match="same \\(runs, rows\\) shape"):
        PairedBootstrap({"t": TaskScores(np.ones((1, 2, 5))), "u": TaskScores(np.ones((1, 3, 5)))})


# ---- clusters (several questions about one image) -----------------------------------------------


def _clustered(sizes, seed=0, p=0.7):
    """Scores perfectly correlated within each cluster: every question of cluster g scores y_g."""
    rng = np.random.default_rng(seed)
    y = (rng.random(len(sizes)) < p).astype(float)
    return np.repeat(y, sizes), np.repeat(np.arange(len(sizes)), sizes)


def cluster_robust_se(x: np.ndarray, clusters: np.ndarray) -> float:
    """CR0 standard error of a mean (intercept-only least squares), float64:
    se² = Σ_g (Σ_{i∈g} (x_i − x̄))² / N²."""
    x = np.asarray(x, dtype=np.float64)
    resid = np.bincount(clusters, weights=x - x.mean())
    return float(np.sqrt((resid ** 2).sum()) / len(x))


def test_cluster_index_numbers_clusters_in_order_of_first_appearance():
    assert list(stats.cluster_index(["b", "a", "b", 7, "a"])) == [0, 1, 0, 2, 1]
    assert list(stats.cluster_index([f"img{i}" for i in (5, 3, 9)])) == [0, 1, 2]  # singletons: arange
    with pytest.raises(ValueError, match="every cluster used"):
        TaskScores(np.ones((1, 1, 3)), clusters=np.array([0, 2, 2]))
    with pytest.raises(ValueError, match="one integer index per question"):
        TaskScores(np.ones((1, 1, 3)), clusters=np.array([0, 1]))


@pytest.mark.parametrize("chunk", [None, 1000])
def test_one_question_per_cluster_is_the_question_bootstrap_exactly(monkeypatch, chunk):
    if chunk:
        monkeypatch.setattr(stats, "_CHUNK_ENTRIES", chunk)
    rng = np.random.default_rng(8)
    scores = rng.choice([0.0, 0.3, 0.6, 1.0], size=(2, 3, 300))
    scores[1, 2, :40] = np.nan  # a row scored on fewer questions in one run
    weights = {"t": np.array([[1.0, 0, 0], [1.0, -1.0, 0], [0, 0.5, -0.5]])}
    plain = PairedBootstrap({"t": TaskScores(scores)}, seed=5)
    labels = [f"VizWiz_{i:05d}.png" for i in range(300)]  # one image per question
    one = PairedBootstrap({"t": TaskScores(scores, clusters=stats.cluster_index(labels), unit="image")}, seed=5)
    assert np.array_equal(plain.reps["t"], one.reps["t"], equal_nan=True)
    a, b = combine_runs(*plain.statistic(weights)), combine_runs(*one.statistic(weights))
    for f in ("value", "lo", "hi", "se"):
        assert np.array_equal(getattr(a, f), getattr(b, f), equal_nan=True)


@pytest.mark.parametrize("sizes", [[4] * 300, list(np.random.default_rng(1).integers(1, 8, 400))])
def test_perfectly_correlated_clusters_give_the_cluster_robust_se(sizes):
    x, g = _clustered(sizes, seed=2)
    se = cluster_robust_se(x, g)
    naive_se = x.std() / np.sqrt(len(x))
    assert se > 1.7 * naive_se  # clusters of ~4 identical answers: about sqrt(4) wider
    boot = PairedBootstrap({"t": TaskScores(x[None, None], clusters=g, unit="image")}, n_resamples=20000)
    reps = boot.reps["t"][:, 0, 0]
    # Monte Carlo error of a bootstrap sd at 20 000 resamples ≈ 0.5 %; the ratio estimator of
    # unequal clusters and the (C−1)/C factor add < 0.5 %
    assert reps.std(ddof=1) == pytest.approx(se, rel=0.02)
    iv = combine_runs(*boot.statistic({"t": np.eye(1)}))
    assert iv.value[0] == pytest.approx(x.mean(), abs=1e-12)
    assert (iv.hi[0] - iv.lo[0]) / 2 == pytest.approx(1.959964 * se, rel=0.04)
    # the question bootstrap of the same data is too narrow by the design effect
    naive = combine_runs(*_boot({"t": x[None]}, n_resamples=4000).statistic({"t": np.eye(1)}))
    assert (naive.hi[0] - naive.lo[0]) / 2 == pytest.approx(1.959964 * naive_se, rel=0.06)


def test_seed_interval_adds_the_cluster_variance_of_the_shared_questions():
    # d_ki = α_i + β_k: question effects correlated within images, a seed shift per run, no
    # interaction; then se² = var(β)/K + CR0(α)² exactly in expectation
    rng = np.random.default_rng(9)
    sizes = rng.integers(1, 7, 250)
    g = np.repeat(np.arange(len(sizes)), sizes)
    alpha = np.repeat(rng.normal(0, 0.3, len(sizes)), sizes) + rng.normal(0, 0.1, g.size)
    beta = np.array([0.02, -0.01, 0.03, 0.0])
    base = rng.random(g.size)
    scores = np.stack([np.stack([base + alpha + bk, base]) for bk in beta])  # (runs, rows, n)
    boot = PairedBootstrap({"t": TaskScores(scores, clusters=g, unit="image")}, n_resamples=20000)
    iv = combine_runs(*boot.statistic({"t": np.array([[1.0, -1.0]])}))
    K = len(beta)
    ref = np.sqrt(beta.var(ddof=1) / K + cluster_robust_se(alpha, g) ** 2)
    assert iv.value[0] == pytest.approx(alpha.mean() + beta.mean(), abs=1e-12)
    assert iv.se[0] == pytest.approx(ref, rel=0.02)
    # ignoring the images would understate the shared term
    flat = combine_runs(*PairedBootstrap({"t": TaskScores(scores)}, n_resamples=4000).statistic(
        {"t": np.array([[1.0, -1.0]])}))
    assert flat.se[0] < 0.75 * iv.se[0]
