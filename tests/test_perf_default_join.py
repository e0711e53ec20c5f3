"""results/default's leaderboard joins each row's own perf row (issue 31).

``qvlm-bench perf --methods-from default`` makes each state as the default suite makes it (its
methods with their options and presets, the +clip lever, the suite's `quant` block — static
per-tensor ranges —, its calibration set and seed), so every perf record has the ``row_identity`` of
its accuracy rows in the committed results/default, and the board joins it there and nowhere else.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from harness.cells import act_range_rule, calibration_spec
from harness.perf.benchmark import PerfRecorder
from harness.perf.command import perf_methods
from harness.perf.states import Case, SuiteSettings, perf_variants
from harness.records import read_records
from harness.report.board import PERF_MARK, Run, build_board
from harness.report.rows import row_identity
from harness.report.text import markdown_table

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "results" / "default"
MODEL = "qvlm-tiny-llava"
CARD = "NVIDIA H100 80GB HBM3"
WORKLOAD = {"image_tokens": 576, "text_tokens": 71, "prompt_tokens": 647, "new_tokens": 64, "image_size": 336}


def _accuracy_rows() -> dict[tuple, tuple]:
    """(variant, scheme) -> row_identity of results/default's successful accuracy records (one per row)."""
    rows: dict[tuple, set] = {}
    for r in read_records(DEFAULT / "records.jsonl"):
        if r.get("status") == "ok" and r.get("metric") == "accuracy":
            rows.setdefault((r["variant"], r["scheme"]), set()).add(row_identity(r))
    assert all(len(keys) == 1 for keys in rows.values()), "a row of results/default has two identities"
    return {k: next(iter(v)) for k, v in rows.items()}


def _perf_records(tmp_path, settings, *, latency_of=None) -> list[dict]:
    """A batch-1 perf record of every default-suite row at w4a4 and w6a6, written by the perf run's
    own recorder (``PerfRecorder``) from the perf run's own resolution of the suite (``perf_methods``,
    ``perf_variants``, ``SuiteSettings``), with what ``perf_state`` puts in the state's meta
    (calibration set, range rule); a distinct decode latency per row."""
    suite = settings.suite
    common = {"suite": "perf", "model": MODEL, "task": None, "metric": "perf", "value": None, "stderr": None,
              "device": CARD, "card": CARD, "seed": 0, "run_id": "r1", "workload": WORKLOAD,
              "objective": "generate", "layouts": "storage", "methods_from": "default",
              "git": {"commit": "0123456789abcdef"}}
    rec = PerfRecorder(tmp_path / "records.jsonl", common, overrides={}, reps=5)
    out = []
    import torch

    variants = perf_variants(perf_methods(None, "default"))
    for v in variants:
        for scheme in (["w16a16"] if v.reference else ["w4a4", "w6a6"]):
            case = Case(v, scheme, torch.float16)
            case.qcfg = settings.qcfg(scheme, reference=v.reference)
            if not v.reference:
                spec = calibration_spec(suite, v, case.qcfg)
                rule = act_range_rule(suite, v, case.qcfg)
                case.state_meta = {"calibration": None if spec is None else {**spec, "digest": "d"},
                                   "act_ranges": None if rule is None else {**rule, "filled": 28}}
            ms = (latency_of or (lambda i: 1.0 + i / 100))(len(out))
            out.append(rec.write(case, 1, status="ok", error=None, kernel=f"k-{v.label}-{scheme}",
                                 latency={"decode_ms_per_token": ms},
                                 memory={"peak_bytes": int(ms * 2**30)}))
    return out


def test_every_default_row_gets_its_own_perf_row_and_no_other(tmp_path):
    settings = SuiteSettings("default")
    perf = _perf_records(tmp_path, settings)
    acc = _accuracy_rows()
    # each perf record is the state of exactly one row of results/default, and every row has one
    by_key = {row_identity(p): p for p in perf}
    assert len(by_key) == len(perf) == len(acc) == 17
    assert set(by_key) == set(acc.values())
    board = build_board([Run("default", DEFAULT, read_records(DEFAULT / "records.jsonl"))], n_resamples=100,
                        perf_records=perf)
    t = board.table
    for (model, variant, scheme) in t.index:
        own = by_key[acc[(variant, scheme)]]
        assert t.at[(model, variant, scheme), "decode ms/tok"] == own["latency"]["decode_ms_per_token"], variant
        assert t.at[(model, variant, scheme), "kernel"] == own["kernel"], (variant, scheme)
    # the columns say which card and workload they are: a tiny model's latency, not a 7B one's
    md = markdown_table(board)
    assert f"decode ms/tok (H100 80GB HBM3){PERF_MARK}" in md
    note = next(line for line in md.splitlines() if line.startswith(PERF_MARK))
    assert "H100 80GB HBM3" in note and "qvlm-tiny-llava" in note and "647 prompt tokens" in note
    assert "64 new tokens" in note and "not a 7B" in note


@pytest.mark.parametrize("change", ["dynamic ranges", "random calibration", "another calibration seed",
                                    "no suite"])
def test_a_perf_row_of_another_state_does_not_join(tmp_path, change):
    """Perf rows whose state differs from the accuracy row's (dynamic ranges: the suite's `quant`
    block not carried; random calibration batches; another seed's set; plain ``--methods``) get no
    latency cell, whatever their label."""
    settings = SuiteSettings("default")
    perf = _perf_records(tmp_path, settings)
    for p in perf:
        if p["reference"]:
            continue
        if change in ("dynamic ranges", "no suite"):
            p["quant_config"] = dict(p["quant_config"], a_granularity="per_token")
        if change in ("random calibration", "no suite") and p["calibration"]:
            p["calibration"] = {"kind": "random", "n": 4, "digest": "e"}
        if change == "another calibration seed" and p["calibration"]:
            p["calibration"] = dict(p["calibration"], seed=1)
    board = build_board([Run("default", DEFAULT, read_records(DEFAULT / "records.jsonl"))], n_resamples=100,
                        perf_records=perf)
    t = board.table
    joined = {row[1] for row in t.index if pd.notna(t.at[row, "kernel"])}
    assert joined == {"fp64 (reference)"}, joined


def test_perf_methods_from_default_makes_the_suites_states():
    """What --methods-from carries: every entry (presets, +clip, fp16+veo's options), the `quant` block
    (static per-tensor ranges), the range rule and the seed; --methods keeps only those methods."""
    settings = SuiteSettings("default")
    labels = [v.label for v in perf_variants(perf_methods(None, "default"))]
    assert labels == ["fp16", "rtn", "rtn+clip", "gptq", "gptq+clip", "awq", "awq+clip", "qvlm (fast)",
                      "fp16+veo (fast)"]
    assert [v.label for v in perf_methods(["rtn"], "default")] == ["rtn", "rtn+clip"]
    with pytest.raises(ValueError, match="not a method of suite default"):
        perf_methods(["quarot"], "default")
    q = settings.qcfg("w4a4")
    assert q.a_granularity == "per_tensor" and settings.qcfg("w4a16").a_granularity == "per_tensor"
    assert settings.qcfg("w4a4", {"w_group_size": 128}).w_group_size == 128
    assert settings.qcfg("w16a16", reference=True).a_granularity == "per_token"  # the float reference as ever
    assert SuiteSettings().qcfg("w4a4").a_granularity == "per_token"  # no suite: the scheme's defaults
    assert settings.seed(7) == settings.suite.seed == 0


@pytest.mark.slow
def test_real_perf_rows_of_the_default_suite_have_its_rows_identity(tmp_path):
    """The real perf run on the CPU (the bundled model, fp32, tiny workload) for the default suite's
    rtn entries (rtn, rtn+clip: static ranges, the suite's calibration set, the clipping search): each
    record's row_identity is its results/default row's."""
    pytest.importorskip("lm_eval")
    from harness.perf.benchmark import run_perf

    recs = run_perf(MODEL, methods=perf_methods(["rtn"], "default"), methods_from="default",
                    schemes=["w4a4"], batches=[1], out=tmp_path, new_tokens=3, text_tokens=8, warmup=1,
                    reps=1, gate_tokens=2, device="cpu", dtype="fp32", trained_gate="off", compile=False,
                    graphs=False, log=lambda *a: None)
    acc = _accuracy_rows()
    assert [(r["variant"], r["scheme"], r["status"]) for r in recs] == [
        ("fp16", "w16a16", "ok"), ("rtn", "w4a4", "ok"), ("rtn+clip", "w4a4", "ok")]
    assert row_identity(recs[0]) == acc[("fp64 (reference)", "w16a16")]
    for r in recs[1:]:
        assert r["calibration"]["task"] == "synth_scienceqa" and "instead_of" not in r["calibration"]
        assert row_identity(r) == acc[(r["variant"], r["scheme"])], r["variant"]
