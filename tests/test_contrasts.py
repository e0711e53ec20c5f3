"""Contrasts: A − B between two variants with the leaderboard's paired intervals (harness.contrasts)."""

import numpy as np
import pytest
from board_data import scores, write_run

from harness.aggregate import aggregate
from harness.cli import main
from harness.contrasts import contrast_table, default_contrasts, parse_contrast
from harness.leaderboard import Run, build_board, write_leaderboard
from harness.records import read_records

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
