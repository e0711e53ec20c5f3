"""One leaderboard over runs with different calibration seeds (harness.report.aggregate, `table A B`)."""

import statistics
import shutil

import numpy as np
import pytest
from board_data import scores, write_run
from scipy import stats as sps

from harness.cli import main
from harness.report.aggregate import aggregate, read_runs
from harness.report.board import Run, build_board
from harness.report.write import write_aggregate

N = 100
BASE = {"a": scores(N, 80, seed=1), "b": scores(N, 60, seed=2)}
LOST = {  # seed -> {(method, scheme): questions lost against the reference, per task}
    0: {("rtn", "w4a4"): (10, 10), ("awq", "w4a4"): (5, 5)},
    1: {("rtn", "w4a4"): (14, 8), ("awq", "w4a4"): (3, 9)},
    2: {("rtn", "w4a4"): (9, 13)},  # awq missing in this run
}


def _lose(x, k):
    y = x.copy()
    y[np.flatnonzero(x)[:k]] = 0.0
    return y


@pytest.fixture
def run_dirs(tmp_path):
    dirs = []
    for seed, cells in LOST.items():
        data = {("fp16", "w16a16", t): BASE[t] for t in "ab"}
        for (m, s), lost in cells.items():
            data.update({(m, s, t): _lose(BASE[t], k) for t, k in zip("ab", lost)})
        dirs.append(write_run(tmp_path / f"seed{seed}", data, seed=seed))
    return dirs


def test_means_spread_and_intervals_over_seeds(run_dirs):
    t = aggregate(run_dirs).table
    rtn = t.loc[("m", "rtn", "w4a4")]
    a = [80 - LOST[s][("rtn", "w4a4")][0] for s in LOST]
    avgs = [(80 - LOST[s][("rtn", "w4a4")][0] + 60 - LOST[s][("rtn", "w4a4")][1]) / 2 for s in LOST]
    assert rtn["a"] == pytest.approx(statistics.mean(a))
    assert rtn["a sd"] == pytest.approx(statistics.stdev(a))
    assert rtn["Avg"] == pytest.approx(statistics.mean(avgs))
    assert (rtn["Avg min"], rtn["Avg max"]) == pytest.approx((min(avgs), max(avgs)))
    # the questions lost are a subset of the reference's correct answers, so each run's gap is
    # question-for-question −1 or 0: the Δ interval is at least the seed-only t-interval wide
    deltas = [v - 70.0 for v in avgs]
    t_lo, t_hi = sps.t.interval(0.95, 2, loc=statistics.mean(deltas), scale=statistics.stdev(deltas) / np.sqrt(3))
    assert rtn["Δ ref"] == pytest.approx(statistics.mean(deltas))
    assert rtn["Δ ref lo"] <= t_lo and rtn["Δ ref hi"] >= t_hi
    assert rtn["runs"] == 3
    awq = t.loc[("m", "awq", "w4a4")]
    assert awq["runs"] == 2 and awq["a"] == pytest.approx(80 - 4)


def test_the_reference_row_keeps_its_single_run_interval(run_dirs):
    # fp16 does not depend on the calibration seed: averaging identical runs changes nothing
    agg = aggregate(run_dirs).table.loc[("m", "fp16", "w16a16")]
    one = build_board([read_runs(run_dirs[:2])[0]]).table.loc[("m", "fp16", "w16a16")]
    for col in ("a", "b", "Avg"):
        assert (agg[f"{col} lo"], agg[f"{col} hi"]) == pytest.approx((one[f"{col} lo"], one[f"{col} hi"]), abs=1e-9)
    assert agg["Avg sd"] == 0.0


def test_cli_writes_the_averaged_tables_page_and_plots(run_dirs, tmp_path):
    out = tmp_path / "agg"
    assert main(["table", *map(str, run_dirs), "--output", str(out)]) == 0
    md = (out / "leaderboard.md").read_text()
    row = next(line for line in md.splitlines() if "| rtn" in line)
    assert "69.0 [" in row  # task a: 70, 66, 71
    assert "seed0 (seed [0])" in md and "Welch–Satterthwaite" in md
    for name in ("leaderboard.csv", "leaderboard.html", "leaderboard.tex", "accuracy_by_scheme.png",
                 "accuracy_by_scheme.svg"):
        assert (out / name).is_file()


def test_runs_with_the_same_seed_are_flagged(run_dirs, tmp_path):
    twin = write_run(tmp_path / "twin", {("fp16", "w16a16", "a"): BASE["a"]}, seed=0)
    board = aggregate([run_dirs[0], twin])
    assert any("same seed" in n for n in board.notes)


def test_bad_inputs_name_the_fix(run_dirs, tmp_path, capsys):
    assert main(["table", str(run_dirs[0]), str(run_dirs[1])]) == 2
    assert "--output" in capsys.readouterr().err
    with pytest.raises(ValueError, match="at least two runs"):
        write_aggregate([run_dirs[0]], tmp_path / "x")
    with pytest.raises(ValueError, match="given twice"):
        read_runs([run_dirs[0], run_dirs[0]])
    with pytest.raises(FileNotFoundError, match="no records"):
        read_runs([run_dirs[0], tmp_path / "empty"])
    assert isinstance(read_runs(run_dirs[:2])[0], Run)


def test_one_folder_with_output_writes_its_tables_there_and_leaves_the_folder(run_dirs, tmp_path, capsys):
    """`table ONE --output DIR` (e.g. beside the perf records it joins): one run's tables, not an
    average, and nothing written into the results folder; --perf with several folders is refused."""
    out = tmp_path / "one"
    before = sorted(p.name for p in run_dirs[0].iterdir())
    assert main(["table", str(run_dirs[0]), "--output", str(out), "--no-plots"]) == 0
    assert sorted(p.name for p in run_dirs[0].iterdir()) == before
    md = (out / "leaderboard.md").read_text()
    assert "Welch–Satterthwaite" not in md  # a single run's table, not the seed-aware aggregate
    single = tmp_path / "copy"
    shutil.copytree(run_dirs[0], single)
    assert main(["table", str(single), "--no-plots"]) == 0
    assert md == (single / "leaderboard.md").read_text()  # the same table as written in place
    assert main(["table", str(run_dirs[0]), str(run_dirs[1]), "--output", str(out), "--perf", str(out)]) == 2
    assert "one results folder" in capsys.readouterr().err
