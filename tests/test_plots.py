"""Leaderboard plots: the Pareto front, perf records joined by row, byte-identical reruns."""

import numpy as np
import pytest
from board_data import record, scores, write_run

from harness.report.plots import pareto_front
from harness.report.write import write_leaderboard


def test_pareto_front_keeps_exactly_the_undominated_points():
    cost = np.array([1.0, 2.0, 2.0, 3.0, 4.0, 0.5, 4.0])
    acc = np.array([50.0, 60.0, 55.0, 60.0, 70.0, 40.0, 70.0])
    # (2, 55) is beaten by (2, 60); (3, 60) by (2, 60); the two (4, 70) tie and both stay
    assert pareto_front(cost, acc).tolist() == [True, True, False, False, True, True, True]


def _perf(method, scheme, decode_ms, peak_gib, batch_size=1, **extra):
    rec = record(method, scheme, None, metric="perf", value=None, batch_size=batch_size, kernel="triton-int4",
                 latency={"decode_ms_per_token": decode_ms}, memory={"peak_bytes": int(peak_gib * 2**30)},
                 **extra)
    rec["calibration"] = dict(rec["calibration"], task="t")  # the accuracy rows' set: the same state
    return rec


@pytest.fixture
def folder(tmp_path):
    cells = {("fp16", "w16a16", "t"): scores(120, 100, 1), ("rtn", "w4a4", "t"): scores(120, 80, 2),
             ("awq", "w4a4", "t"): scores(120, 90, 3), ("rtn", "w8a8", "t"): scores(120, 98, 4)}
    perf = [_perf("fp16", "w16a16", 6.0, 13.5), _perf("rtn", "w4a4", 4.6, 4.5), _perf("awq", "w4a4", 4.7, 4.5),
            _perf("rtn", "w8a8", 5.2, 7.5), _perf("rtn", "w8a8", 9.9, 9.9, batch_size=8),
            _perf("rtn", "w4a4", 8.8, 8.8, objective="prefill"),  # layouts for prefill: perf tables only
            _perf("gptq", "w4a4", 1.0, 1.0)]  # no accuracy for gptq: not in the accuracy table
    return write_run(tmp_path / "run", cells, extra_records=perf)


def test_plots_and_perf_columns_are_written_and_reruns_are_byte_identical(folder, tmp_path):
    paths = write_leaderboard(folder)
    for name in ("accuracy_by_scheme", "accuracy_vs_cost"):
        for ext in ("png", "svg"):
            assert (folder / f"{name}.{ext}").stat().st_size > 1000
    first = {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix in (".png", ".svg", ".html", ".csv")}
    write_leaderboard(folder)
    again = {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix in (".png", ".svg", ".html", ".csv")}
    assert first == again
    csv = paths["csv"].read_text()
    assert "decode ms/tok" in csv and "gptq" not in csv  # batch-1 perf of rows with accuracy only
    md = paths["md"].read_text()
    assert "| 4.60 " in next(line for line in md.splitlines() if "| rtn " in line and "w4a4" in line)


def test_without_perf_records_no_cost_plot(tmp_path):
    folder = write_run(tmp_path / "run", {("fp16", "w16a16", "t"): scores(50, 40), ("rtn", "w4a4", "t"): scores(50, 30)})
    paths = write_leaderboard(folder)
    assert (folder / "accuracy_by_scheme.svg").is_file() and not (folder / "accuracy_vs_cost.svg").exists()
    assert "accuracy_vs_cost" not in paths["html"].read_text()
