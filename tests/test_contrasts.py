"""Contrasts: A − B between two variants with the leaderboard's paired intervals (harness.report.contrasts)."""

import numpy as np
import pandas as pd
import pytest
from board_data import scores, write_run

from harness.cli import main
from harness.records import read_records
from harness.report.aggregate import aggregate
from harness.report.board import Run, build_board
from harness.report.contrasts import contrast_table, default_contrasts, parse_contrast
from harness.report.write import write_leaderboard

N = 400
TASKS = ("a", "b")


def _flip(x: np.ndarray, up: int, down: int, seed: int) -> np.ndarray:
    """``x`` with ``up`` wrong answers made right and ``down`` right ones made wrong."""
    rng = np.random.default_rng(seed)
    y = x.copy()
    y[rng.choice(np.flatnonzero(x == 0), up, replace=False)] = 1.0
    y[rng.choice(np.flatnonzero(x == 1), down, replace=False)] = 0.0
    return y


def _cells(seed: int = 0) -> dict:
    base = {t: scores(N, 300 + 20 * k, seed=k) for k, t in enumerate(TASKS)}
    data = {("fp16", "fp16", "w16a16", t): base[t] for t in TASKS}
    for t in TASKS:
        plain = _flip(base[t], 10, 60 + 5 * seed, seed=11 + seed)
        data[("rtn", "rtn", "w4a4", t)] = plain
        data[("rtn", "rtn+clip", "w4a4", t)] = _flip(plain, 30, 6, seed=21 + seed)
        data[("rtn", "rtn:odd", "w4a4", t)] = plain  # a label with a colon in it
    return data


@pytest.fixture
def run_dir(tmp_path):
    return write_run(tmp_path / "run", _cells())


def _board(folder):
    return build_board([Run(folder.name, folder, read_records(folder / "records.jsonl"))])


def test_clip_lever_is_contrasted_by_default_against_float64_math(run_dir):
    board = _board(run_dir)
    assert ("rtn+clip", "rtn") in default_contrasts(board)
    table = contrast_table(board, [("rtn+clip", "rtn")])
    row = table.loc[("m", "w4a4", "rtn+clip − rtn")]
    cells = _cells()
    diffs = {t: cells[("rtn", "rtn+clip", "w4a4", t)] - cells[("rtn", "rtn", "w4a4", t)] for t in TASKS}
    for t, d in diffs.items():
        assert row[t] == pytest.approx(100 * d.mean(), abs=1e-9)
        # the paired percentile interval against the normal approximation of a paired mean
        half = 1.96 * 100 * d.std(ddof=1) / np.sqrt(N)
        assert row[f"{t} lo"] == pytest.approx(100 * d.mean() - half, abs=0.6)
        assert row[f"{t} hi"] == pytest.approx(100 * d.mean() + half, abs=0.6)
        assert bool(row[f"{t} sig"])  # +6 points on 400 paired questions
    avg = (diffs["a"] + diffs["b"]) / 2
    assert row["Avg"] == pytest.approx(100 * avg.mean(), abs=1e-9)
    # tasks resampled separately: var(Avg) = (var_a + var_b) / 4
    half = 1.96 * 100 * np.sqrt(sum(d.var(ddof=1) / N for d in diffs.values()) / 4)
    assert row["Avg hi"] - row["Avg lo"] == pytest.approx(2 * half, abs=0.6)


def test_pairing_narrows_the_interval_below_the_unpaired_one(run_dir):
    board = _board(run_dir)
    row = contrast_table(board, [("rtn+clip", "rtn")]).loc[("m", "w4a4", "rtn+clip − rtn")]
    cells = _cells()
    a, b = cells[("rtn", "rtn+clip", "w4a4", "a")], cells[("rtn", "rtn", "w4a4", "a")]
    unpaired = 2 * 1.96 * 100 * np.sqrt(a.var(ddof=1) / N + b.var(ddof=1) / N)
    assert row["a hi"] - row["a lo"] < 0.7 * unpaired


def test_runs_average_the_per_run_differences(tmp_path):
    dirs = [write_run(tmp_path / f"s{s}", _cells(s), seed=s) for s in range(3)]
    board = aggregate(dirs)
    row = contrast_table(board, [("rtn+clip", "rtn")]).loc[("m", "w4a4", "rtn+clip − rtn")]
    per_run = []
    for s in range(3):
        c = _cells(s)
        per_run.append(np.mean([(c[("rtn", "rtn+clip", "w4a4", t)] - c[("rtn", "rtn", "w4a4", t)]).mean()
                                for t in TASKS]))
    assert row["Avg"] == pytest.approx(100 * np.mean(per_run), abs=1e-9)
    assert row["Avg lo"] < row["Avg"] < row["Avg hi"]


def test_files_cli_and_bad_contrasts(run_dir, capsys):
    paths = write_leaderboard(run_dir, plots=False)
    text = paths["contrasts md"].read_text()
    assert "rtn+clip − rtn" in text and "**" in text  # the default lever, significant
    assert main(["table", str(run_dir), "--no-plots", "--contrast", "rtn:odd:rtn+clip"]) == 0
    assert "rtn:odd − rtn+clip" in (run_dir / "contrasts.md").read_text()
    before = (run_dir / "leaderboard.md").stat().st_mtime_ns
    assert main(["table", str(run_dir), "--no-plots", "--contrast", "qvlm:rtn"]) == 2
    err = capsys.readouterr().err
    assert "qvlm:rtn" in err and "known variants" in err and "rtn+clip" in err
    assert (run_dir / "leaderboard.md").stat().st_mtime_ns == before  # nothing rewritten
    with pytest.raises(ValueError, match="A:B"):
        parse_contrast("rtn", ["rtn", "rtn+clip"])
    with pytest.raises(ValueError, match="itself"):
        parse_contrast("rtn:rtn", ["rtn"])


def test_no_pair_no_file(tmp_path):
    folder = write_run(tmp_path / "r", {("fp16", "w16a16", "a"): scores(50, 40), ("rtn", "w4a4", "a"): scores(50, 30)})
    (folder / "contrasts.md").write_text("stale")
    paths = write_leaderboard(folder, plots=False)
    assert "contrasts md" not in paths and not (folder / "contrasts.md").exists()


def _images(n: int, seed: int) -> list[int]:
    """Image ids of n questions in doc order: 1–7 questions per image, ids unordered."""
    rng = np.random.default_rng(seed)
    sizes = []
    while sum(sizes) < n:
        sizes.append(int(rng.integers(1, 8)))
    ids = rng.permutation(len(sizes)) * 1000 + 7  # like COCO ids: not 0..C-1, not sorted
    return [int(i) for i in np.repeat(ids, sizes)[:n]]


def _image_cells(images: dict[str, list[int]]) -> dict:
    """rtn+clip fixes or breaks whole images at once: its gap to rtn correlates within an image."""
    rng = np.random.default_rng(4)
    data = {}
    for t, img in images.items():
        per_image = {i: rng.random() for i in set(img)}
        base = np.array([float(per_image[i] < 0.75) for i in img])
        plain = _flip(base, 10, 40, seed=31)
        shift = {i: rng.choice([-1.0, 0.0, 1.0], p=[0.15, 0.6, 0.25]) for i in set(img)}
        clip = np.clip(plain + np.array([shift[i] for i in img]), 0, 1)
        data.update({("fp16", "fp16", "w16a16", t): base, ("rtn", "rtn", "w4a4", t): plain,
                     ("rtn", "rtn+clip", "w4a4", t): clip})
    return data


def test_contrasts_pair_by_question_within_image(tmp_path):
    from harness.report.stats import cluster_index, percentile_interval, resample_counts, task_rng

    images = {t: _images(N, seed=k) for k, t in enumerate(TASKS)}
    cells = _image_cells(images)
    folder = write_run(tmp_path / "img", cells, clusters=images)
    # one row's samples file in another order: rows are joined by doc_id, not by position
    rtn_a = next(p for p in (folder / "samples").iterdir() if p.name.endswith("-rtn-w4a4-a.jsonl"))
    rtn_a.write_text("".join(reversed(rtn_a.read_text().splitlines(keepends=True))))
    board = _board(folder)
    row = contrast_table(board, [("rtn+clip", "rtn")]).loc[("m", "w4a4", "rtn+clip − rtn")]
    for t in TASKS:
        # independent reference: draw the images as the bootstrap does (same generator), weight each
        # question by its image's draws, and average the per-question differences A − B
        cl = cluster_index(images[t])
        C = int(cl.max()) + 1
        assert board.clusters[t] == ("image", C, N)
        w = resample_counts(C, board.n_resamples, task_rng(board.seed, t), 0, board.n_resamples)[:, cl]
        d = cells[("rtn", "rtn+clip", "w4a4", t)] - cells[("rtn", "rtn", "w4a4", t)]
        lo, hi = percentile_interval((w @ d) / w.sum(1))
        assert row[t] == pytest.approx(100 * d.mean(), abs=1e-9)
        assert (row[f"{t} lo"], row[f"{t} hi"]) == pytest.approx((100 * lo, 100 * hi), abs=1e-9)
    # the same answers with the images ignored: intervals too narrow
    flat = _board(write_run(tmp_path / "flat", cells))
    naive = contrast_table(flat, [("rtn+clip", "rtn")]).loc[("m", "w4a4", "rtn+clip − rtn")]
    assert flat.clusters["a"] == ("question", N, N)
    for t in TASKS:
        assert row[f"{t} hi"] - row[f"{t} lo"] > 1.4 * (naive[f"{t} hi"] - naive[f"{t} lo"])


def test_tables_say_the_cluster_unit(tmp_path):
    images = {"a": _images(N, seed=0)}
    folder = write_run(tmp_path / "img", _image_cells(images), clusters=images)
    paths = write_leaderboard(folder, plots=False)
    C = len(set(images["a"]))
    note = f"Cluster unit resampled — a: images ({N} questions in {C} images)"
    assert note in paths["md"].read_text() and note in paths["contrasts md"].read_text()
    csv = pd.read_csv(paths["csv"])
    assert set(csv["a cluster unit"]) == {"image"} and set(csv["a clusters"]) == {C}
