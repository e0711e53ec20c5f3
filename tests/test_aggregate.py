"""Averaging leaderboards over runs with different calibration seeds (harness.aggregate, `table A B`)."""

import json
import statistics

import pytest

from harness.aggregate import aggregate, run_tables, write_aggregate
from harness.cli import main


def _rec(method, scheme, task, value, seed):
    return {"model": "m", "method": method, "scheme": scheme, "task": task, "metric": "accuracy",
            "value": value, "status": "ok", "device": "cpu", "kernel": "simulated", "batch_size": 8,
            "n": 10, "stderr": 1.0, "seed": seed}


RUNS = {  # seed -> {(method, scheme): (task a, task b)}
    0: {("fp16", "w16a16"): (80.0, 60.0), ("rtn", "w4a4"): (70.0, 50.0), ("awq", "w4a4"): (75.0, 55.0)},
    1: {("fp16", "w16a16"): (80.0, 60.0), ("rtn", "w4a4"): (66.0, 52.0), ("awq", "w4a4"): (77.0, 51.0)},
    2: {("fp16", "w16a16"): (80.0, 60.0), ("rtn", "w4a4"): (71.0, 47.0)},  # awq missing in this run
}


@pytest.fixture
def run_dirs(tmp_path):
    dirs = []
    for seed, cells in RUNS.items():
        d = tmp_path / f"seed{seed}"
        d.mkdir()
        recs = [_rec(m, s, t, v, seed) for (m, s), vals in cells.items() for t, v in zip("ab", vals)]
        (d / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        dirs.append(d)
    return dirs


def test_mean_and_sd_per_cell_match_the_definitions(run_dirs):
    agg = aggregate(run_tables(run_dirs))
    rtn = agg.loc[("m", "rtn", "w4a4")]
    a = [RUNS[s][("rtn", "w4a4")][0] for s in RUNS]
    avgs = [sum(RUNS[s][("rtn", "w4a4")]) / 2 for s in RUNS]
    assert rtn["a mean"] == pytest.approx(statistics.mean(a))
    assert rtn["a sd"] == pytest.approx(statistics.stdev(a))
    assert rtn["Avg mean"] == pytest.approx(statistics.mean(avgs))
    assert (rtn["Avg min"], rtn["Avg max"]) == (min(avgs), max(avgs))
    assert rtn["Δ fp16 mean"] == pytest.approx(statistics.mean(avgs) - 70.0)  # fp16 Avg is 70 in every run
    awq = agg.loc[("m", "awq", "w4a4")]
    assert awq["a runs"] == 2 and awq["a mean"] == pytest.approx(76.0)
    assert agg.loc[("m", "fp16", "w16a16")]["a sd"] == 0.0


def test_cli_writes_the_averaged_table(run_dirs, tmp_path, capsys):
    out = tmp_path / "agg"
    assert main(["table", *map(str, run_dirs), "--output", str(out)]) == 0
    md = (out / "leaderboard.md").read_text()
    row = next(line for line in md.splitlines() if "| rtn" in line)
    assert "69.0 ± 2.6" in row  # task a: 70, 66, 71
    assert "(2 runs)" in next(line for line in md.splitlines() if "| awq" in line)
    assert "seed0 (seed [0])" in md and (out / "leaderboard.csv").is_file()


def test_bad_inputs_name_the_fix(run_dirs, tmp_path, capsys):
    assert main(["table", str(run_dirs[0]), str(run_dirs[1])]) == 2
    assert "--output" in capsys.readouterr().err
    with pytest.raises(ValueError, match="at least two runs"):
        write_aggregate([run_dirs[0]], tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="no records"):
        run_tables([run_dirs[0], tmp_path / "empty"])
