"""The accuracy leaderboard: rows per variant, the reference row, paired intervals with answers known
by construction, significance marks, fallbacks for old records, and the failed-cell notes."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from board_data import record, scores, write_run

from harness.records import read_records
from harness.report.board import Run, build_board
from harness.report.rows import unresolved_failures
from harness.report.write import write_leaderboard


def _base(n=200, seed=0):
    """Fractional (VQA-like) scores with room to subtract 0.3 on every question."""
    return np.random.default_rng(seed).choice([0.4, 0.7, 1.0], size=n)


def _board(folder, **kw):
    return build_board([Run(folder.name, folder, read_records(folder / "records.jsonl"))], **kw)


def test_variant_rows_reference_key_and_exact_paired_gaps(tmp_path):
    a, b = _base(seed=1), _base(seed=2)
    cells = {("float", "float", "w16a16", "ta"): a, ("float", "float", "w16a16", "tb"): b,
             ("rtn", "rtn", "w4a4", "ta"): a - 0.2, ("rtn", "rtn", "w4a4", "tb"): b - 0.2,
             ("rtn", "rtn+clip", "w4a4", "ta"): a - 0.1, ("rtn", "rtn+clip", "w4a4", "tb"): b - 0.1}
    ref_keys = {"reference": True, "dtype": "fp64"}
    write_run(tmp_path, cells, keys={k: ref_keys for k in cells if k[0] == "float"})
    board = _board(tmp_path)
    t = board.table
    assert list(t.index) == [("m", "float", "w16a16"), ("m", "rtn", "w4a4"), ("m", "rtn+clip", "w4a4")]
    # every question moves by the same amount: the gap and both ends of its interval are exact
    for row, gap in ((("m", "rtn", "w4a4"), -20.0), (("m", "rtn+clip", "w4a4"), -10.0)):
        assert t.loc[row, ["Δ ref", "Δ ref lo", "Δ ref hi"]].tolist() == pytest.approx([gap] * 3, abs=1e-9)
    assert t.loc[("m", "rtn+clip", "w4a4"), ["vs best", "vs best lo", "vs best hi"]].tolist() == \
        pytest.approx([10.0] * 3, abs=1e-9)
    assert t.loc[("m", "rtn", "w4a4"), "vs best"] == pytest.approx(-10.0)
    assert t.loc[("m", "rtn+clip", "w4a4"), "Avg mark"] == "lead" and t.loc[("m", "rtn", "w4a4"), "Avg mark"] == ""
    assert board.reference_desc == {"m": "float (ran in fp64)"}

    paths = write_leaderboard(tmp_path, plots=False)
    md = paths["md"].read_text()
    header = md.splitlines()[0]
    assert "Δ ref" in header and "fp16" not in md
    assert "float (ran in fp64)" in md
    row = next(line for line in md.splitlines() if "| rtn+clip" in line)
    assert "**" in row and "-10.0 [-10.0, -10.0]" in row
    assert "\\textbf{" in paths["tex"].read_text()
    csv = pd.read_csv(paths["csv"])
    for col in ("ta", "tb", "Avg", "Δ ref", "vs best"):
        assert {f"{col} lo", f"{col} hi"} <= set(csv.columns)
    ok = csv["Avg lo"].notna()
    assert (csv.loc[ok, "Avg lo"] <= csv.loc[ok, "Avg"]).all() and (csv.loc[ok, "Avg"] <= csv.loc[ok, "Avg hi"]).all()


def test_records_without_the_new_keys_use_method_and_fp16_as_reference(tmp_path):
    a = _base()
    write_run(tmp_path, {("fp16", "w16a16", "t"): a, ("rtn", "w4a4", "t"): a - 0.3})
    board = _board(tmp_path)
    assert board.references == {"m": ("m", "fp16", "w16a16")}
    assert board.reference_desc == {"m": "fp16 (ran in fp32)"}  # dtype falls back to the kernel
    assert board.table.loc[("m", "rtn", "w4a4"), "Δ ref"] == pytest.approx(-30.0)


def test_each_model_is_compared_with_its_own_reference(tmp_path):
    a, b = _base(seed=3), _base(seed=4)
    cells = {("fp16", "w16a16", "t"): a, ("rtn", "w4a4", "t"): a - 0.1,
             ("fp16", "fp16", "w16a16", "t"): b, ("rtn", "rtn", "w4a4", "t"): b - 0.3}
    other = {"model": "n", "dtype": "bf16"}
    write_run(tmp_path, cells, keys={k: other for k in cells if len(k) == 4})
    board = _board(tmp_path)
    assert board.table.loc[("m", "rtn", "w4a4"), "Δ ref"] == pytest.approx(-10.0)
    assert board.table.loc[("n", "rtn", "w4a4"), "Δ ref"] == pytest.approx(-30.0)
    assert board.reference_desc == {"m": "fp16 (ran in fp32)", "n": "fp16 (ran in bf16)"}


def test_bold_only_for_a_significant_lead_and_ties_marked(tmp_path):
    base = scores(200, 150, seed=3)
    one_less = base.copy()
    one_less[np.flatnonzero(base)[0]] = 0.0  # one question lost: not a significant gap
    much_worse = base.copy()
    much_worse[np.flatnonzero(base)[:40]] = 0.0  # 40 questions lost: significant
    write_run(tmp_path, {("fp16", "w16a16", "t"): base, ("awq", "w6a6", "t"): base, ("gptq", "w6a6", "t"): base,
                         ("rtn", "w6a6", "t"): one_less, ("qvlm", "w6a6", "t"): much_worse})
    t = _board(tmp_path).table
    marks = {row[1]: t.loc[row, "Avg mark"] for row in t.index}
    assert marks == {"fp16": "", "awq": "tie", "gptq": "tie", "rtn": "tie", "qvlm": ""}
    assert t.loc[("m", "qvlm", "w6a6"), "vs best hi"] < 0  # significantly behind the best
    assert t.loc[("m", "awq", "w6a6"), ["vs best", "vs best lo", "vs best hi"]].tolist() == [0, 0, 0]
    md = write_leaderboard(tmp_path, plots=False)["md"].read_text()
    assert "**" not in md.split("\n\n")[0]  # no significant lead: nothing bold
    assert "*75.0 [" in next(line for line in md.splitlines() if "| awq" in line)


def test_record_without_samples_gets_a_normal_interval_from_its_stderr(tmp_path):
    a = _base()
    no_samples = record("awq", "w4a4", "t", value=80.0, stderr=2.0)
    write_run(tmp_path, {("fp16", "w16a16", "t"): a, ("rtn", "w4a4", "t"): a - 0.1},
              extra_records=[no_samples])
    board = _board(tmp_path, n_resamples=4000)
    row = board.table.loc[("m", "awq", "w4a4")]
    assert row["t"] == 80.0
    assert (row["t lo"], row["t hi"]) == pytest.approx((80 - 1.96 * 2, 80 + 1.96 * 2), abs=0.3)
    assert row["intervals"] == "normal (no samples)"
    assert board.table.loc[("m", "rtn", "w4a4"), "intervals"] == "bootstrap"
    assert any("no samples_file" in n for n in board.notes)


def test_a_samples_file_that_disagrees_with_its_record_is_not_used(tmp_path):
    a = _base()
    write_run(tmp_path, {("fp16", "w16a16", "t"): a, ("rtn", "w4a4", "t"): a - 0.1})
    recs = read_records(tmp_path / "records.jsonl")
    recs[1]["value"] += 5  # the file is from another run
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    board = _board(tmp_path)
    assert board.table.loc[("m", "rtn", "w4a4"), "intervals"] == "normal (no samples)"
    assert any("another run" in n for n in board.notes)


def test_two_reference_rows_for_one_model_are_refused(tmp_path):
    a = _base()
    write_run(tmp_path, {("fp16", "w16a16", "t"): a, ("float", "w16a16", "t"): a},
              keys={("float", "w16a16", "t"): {"reference": True}})
    with pytest.raises(ValueError, match="two reference rows"):
        _board(tmp_path)


def _rec(method, scheme, task, status="ok", value=50.0):
    return record(method, scheme, task, value=value, stderr=1.0, status=status)


def test_only_failures_not_retried_successfully_are_reported(tmp_path):
    recs = [_rec("fp16", "w16a16", "t"),
            _rec("rtn", "w4a4", "t", status="failed"), _rec("rtn", "w4a4", "t", value=40.0),  # retried: ok
            _rec("gptq", "w4a4", "t", value=45.0), _rec("gptq", "w4a4", "t", status="failed"),  # broke later
            _rec("awq", "w4a4", "t", status="failed")]
    left = unresolved_failures(recs)
    assert sorted(r["method"] for r in left) == ["awq", "gptq"]
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    md = write_leaderboard(tmp_path, plots=False)["md"].read_text()
    failed = next(line for line in md.splitlines() if "failed record(s)" in line)
    assert failed.startswith("2 failed record(s)") and "rtn/w4a4" not in failed


def test_a_control_row_is_shown_but_not_ranked(tmp_path):
    base = scores(200, 150, seed=3)
    worse = base.copy()
    worse[np.flatnonzero(base)[:40]] = 0.0
    better = np.ones(200)  # the control beats everyone, significantly
    write_run(tmp_path, {("fp16", "w16a16", "t"): base, ("fp16+veo", "w4a4", "t"): better,
                         ("qvlm", "w4a4", "t"): base, ("rtn", "w4a4", "t"): worse},
              keys={("fp16+veo", "w4a4", "t"): {"control": True}})
    t = _board(tmp_path).table
    marks = {row[1]: t.loc[row, "Avg mark"] for row in t.index}
    assert marks == {"fp16": "", "fp16+veo": "", "qvlm": "lead", "rtn": ""}
    assert t.loc[("m", "fp16+veo", "w4a4"), "Avg"] == 100.0


def test_cluster_ids_missing_or_conflicting_fall_back_to_questions_with_a_note(tmp_path):
    a = _base(seed=3)
    img = [i // 3 for i in range(len(a))]
    cells = {("fp16", "w16a16", "t"): a, ("rtn", "w4a4", "t"): a - 0.1}
    new = write_run(tmp_path / "new", cells, clusters={"t": img})
    old = write_run(tmp_path / "old", cells)  # written before cluster ids were logged
    fp16, rtn = "samples/0-fp16-w16a16-t.jsonl", "samples/1-rtn-w4a4-t.jsonl"

    def mix(first: Path, second: Path, into: Path) -> None:
        """``into``: the fp16 record and samples of ``first``, the rtn ones of ``second``."""
        recs = [(first / "records.jsonl").read_text().splitlines()[0],
                (second / "records.jsonl").read_text().splitlines()[1]]
        (into / "samples").mkdir(parents=True, exist_ok=True)
        (into / "records.jsonl").write_text("\n".join(recs) + "\n")
        (into / fp16).write_text((first / fp16).read_text())
        (into / rtn).write_text((second / rtn).read_text())

    # one record with image ids beside an old one: the ids serve every row (the cluster of a
    # question is a property of the data)
    mix(new, old, tmp_path / "m1")
    board = _board(tmp_path / "m1")
    assert board.clusters["t"] == ("image", len(set(img)), len(a)) and not board.notes
    # records that declare images but whose samples carry no ids
    mix(new, new, tmp_path / "m2")
    for f in (fp16, rtn):
        (tmp_path / "m2" / f).write_text((old / f).read_text())
    board = _board(tmp_path / "m2")
    assert board.clusters["t"] == ("question", len(a), len(a))
    assert any("have no image id" in n for n in board.notes)
    # two records that put one question in different images
    other = write_run(tmp_path / "other", cells, clusters={"t": [i // 2 for i in range(len(a))]})
    mix(new, other, tmp_path / "m3")
    board = _board(tmp_path / "m3")
    assert board.clusters["t"][0] == "question" and any("in one record and" in n for n in board.notes)
