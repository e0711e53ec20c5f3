"""Perf records' per-layer detail in gzip sidecars (harness/perf/detail.py): the real writer's round
trip, records written before the sidecars (detail inline), damaged or missing sidecars named with the
fix (or a note where the reader does without), ``qvlm-bench compact-perf`` (verified, idempotent,
other lines kept byte for byte, under the folder's lock)."""

from __future__ import annotations

import copy
import gzip
import json
from dataclasses import asdict
from pathlib import Path

import pytest

from harness.cli import main
from harness.kernels.select import KernelRecord
from harness.perf import isolate
from harness.perf.detail import (DETAIL_DIR, DETAIL_KEY, PerfDetailError, compact_perf, load_detail,
                                 split_detail, write_detail)
from harness.perf.table import leaderboard_frame, load_records, write_perf_record
from harness.records import append_record, new_record
from harness.resultsdir import ResultsDirError, results_lock
from script_helpers import load_script

REPO = Path(__file__).resolve().parents[1]


def dumps(rec) -> str:
    return json.dumps(rec)  # values and key order


def _selection(decode_ms: float) -> list[dict]:
    return [asdict(KernelRecord(
        phase=phase, rows=rows, shape=(12288, 4096), chosen="gemlite",
        candidates={"gemlite": {"layout": "gemlite", "rel_err": 2e-3, "ms": decode_ms * rows},
                    "triton-int4-dot": {"layout": "ours", "rel_err": 2e-5, "ms": 0.026 * rows},
                    "ref-cublas": {"ms": 0.038 * rows, "timing_only": True}},
        quantizer={"elements": 4096, "mismatches": 0, "non_tie": 0}, layout="gemlite",
        layout_costs={"ours": 1.8, "gemlite": 1.3}, runs=63.0)) for phase, rows in (("decode", 1), ("prefill", 647))]


def _gate(passed: bool = True) -> dict:
    layer = {f"layers.{i}.{k}.{p}": 1e-4 * (i + 1) for i in (0, 31) for k in ("qkv", "down")
             for p in ("prefill", "decode")}
    producers = {"checks": {"layers.0.qkv.prefill": {"elements": 2650112, "mismatches": 0, "non_tie": 0,
                                                     "float_err": 2.8e-6, "mode": "fake"}}, "passed": passed}
    return {"policy": "auto", "tol": 0.01, "passed": passed, "strict_passed": passed,
            "layerwise_max_rel_err": 3.2e-3, "layerwise_ok": True, "layerwise": layer,
            "layerwise_rounding_ties": {}, "e2e_rel_logit_err": 4e-3, "e2e_tol": 0.01, "float_e2e": 2e-3,
            "e2e_tokens_match": False, "e2e_ok": False, "e2e_tokens_match_up_to_ties": True,
            "token_mismatches": [{"step": 3, "sim": 7, "real": 9, "gap": 1e-3, "tie_tol": 2e-3}],
            "tokens_sim": [1, 2, 3, 7], "tokens_real": [1, 2, 3, 9], "n_tokens": 4, "exact": None,
            "producers": producers,
            "trained": {"ran": True, "model": "qvlm-tiny-llava", "passed": passed, "e2e_rel_logit_err": 1e-5,
                        "layerwise_max_rel_err": 1e-6, "layerwise": dict(layer),
                        "exact": {"rel_logit_err": 0.3, "tol": 0.6, "passed": True, "token_flips": []},
                        "kernels": {"qkv.decode": "gemlite"}, "not_accepted": [], "fused_producers": True,
                        "producers": copy.deepcopy(producers)},
            "failed": [] if passed else ["fused quantizers"]}


def _fields(method="rtn", scheme="w4a4", reference=False, run="run0001", decode=3.5, batch=1) -> dict:
    return {"suite": "perf", "model": "llava-1.5-7b", "method": method, "variant": method, "scheme": scheme,
            "reference": reference, "task": None, "metric": "perf", "value": None, "batch_size": batch,
            "run_id": run, "card": "NVIDIA H100", "dtype": "fp16", "objective": "generate", "layouts": "storage",
            "config_hash": f"{method}-{scheme}-{batch}", "status": "ok", "error": None, "kernel": "decode=gemlite",
            "latency": {"decode_ms_per_token": decode, "prefill_ms": 20.0, "ttft_ms": 25.0, "vision_ms": 4.0,
                        "tokens_per_s": 1000 / decode, "iqr": {"decode_ms_per_token": 0.01}},
            "memory": {"peak_bytes": 4 * 2**30 if not reference else 13 * 2**30},
            "gate": _gate(), "kernels": {"prefill": ["gemlite-dequant+cublas"], "decode": ["gemlite"],
                                         "selection": _selection(decode / 100), "fused_producers": True,
                                         "compiled_glue": True, "cuda_graphs": ["decode", "prefill"],
                                         "graph_notes": [], "layer_notes": ["layers.0.qkv: tinygemm zero point"]}}


def _sidecar(folder: Path, rec: dict) -> Path:
    return folder / rec[DETAIL_KEY]


def test_the_writer_keeps_the_summary_inline_and_the_detail_reads_back_exactly(tmp_path):
    path = tmp_path / "records.jsonl"
    full = write_perf_record(path, **_fields())
    (line,) = path.read_text().splitlines()
    summary = json.loads(line)
    assert summary[DETAIL_KEY].startswith(f"{DETAIL_DIR}/run0001-") and summary[DETAIL_KEY] == full[DETAIL_KEY]
    g, k = summary["gate"], summary["kernels"]
    # what the tables, the join and the summaries read stays in the line
    assert g["passed"] and g["layerwise_max_rel_err"] == 3.2e-3 and g["e2e_rel_logit_err"] == 4e-3
    assert g["producers"] == {"passed": True} and g["trained"]["exact"]["rel_logit_err"] == 0.3
    assert g["trained"]["passed"] and g["tokens_sim"] == [1, 2, 3, 7] and "failed" in g
    assert k["decode"] == ["gemlite"] and k["prefill"] == ["gemlite-dequant+cublas"] and k["cuda_graphs"]
    assert summary["latency"]["decode_ms_per_token"] == 3.5 and summary["kernel"] == "decode=gemlite"
    # the bulk does not
    for gone in ("layerwise", "token_mismatches"):
        assert gone not in g and gone not in g["trained"]
    assert "selection" not in k and "layer_notes" not in k and "kernels" not in g["trained"]
    assert len(line) < len(dumps(full)) / 2
    # the one reader gives the writer's record back, key order included
    back = load_detail(summary, tmp_path)
    assert dumps(back) == dumps(json.loads(json.dumps(full)))
    assert list(back["gate"]) == list(full["gate"]) and list(back["kernels"]) == list(full["kernels"])
    # deterministic bytes: gzip without mtime; the same record gives the same file
    side = _sidecar(tmp_path, summary)
    assert side.read_bytes()[4:8] == b"\0\0\0\0"
    other = tmp_path / "other" / "records.jsonl"
    again = write_perf_record(other, **{**_fields(), "timestamp": full["timestamp"]})
    assert again[DETAIL_KEY] == full[DETAIL_KEY]
    assert (other.parent / again[DETAIL_KEY]).read_bytes() == side.read_bytes()
    # the table reads the summary alone
    df = leaderboard_frame(load_records(path))
    assert df.iloc[0]["gate"] == "pass" and df.iloc[0]["trained err"] == 0.3


def test_records_of_one_run_never_share_a_sidecar(tmp_path):
    path = tmp_path / "records.jsonl"
    recs = [write_perf_record(path, **_fields(scheme=s, batch=b, decode=3.0 + b)) for s in ("w4a4", "w8a8")
            for b in (1, 8)]
    names = {r[DETAIL_KEY] for r in recs}
    assert len(names) == 4 and len(list((tmp_path / DETAIL_DIR).iterdir())) == 4
    for line, want in zip(path.read_text().splitlines(), recs):
        assert dumps(load_detail(json.loads(line), tmp_path)) == dumps(json.loads(json.dumps(want)))


def test_a_record_without_detail_has_no_sidecar(tmp_path):
    path = tmp_path / "records.jsonl"
    rec = write_perf_record(path, **{**_fields(), "gate": None, "kernels": None, "status": "failed",
                                     "error": "not run: time budget of 10s spent"})
    assert DETAIL_KEY not in rec and DETAIL_KEY not in json.loads(path.read_text())
    assert not (tmp_path / DETAIL_DIR).exists()


def test_records_written_before_the_sidecar_still_read(tmp_path):
    """Detail inline, no ``detail_file``: every reader takes the record as it is."""
    path = tmp_path / "records.jsonl"
    legacy = new_record(**_fields())
    append_record(path, legacy)
    (rec,) = load_records(path)
    assert load_detail(rec, tmp_path) is rec
    sel = isolate.selection_of([rec], tmp_path)
    assert [s.chosen for s in sel] == ["gemlite", "gemlite"] and sel[0].shape == (12288, 4096)


def test_the_isolated_parent_reads_the_selection_through_the_sidecar(tmp_path):
    path = tmp_path / "records.jsonl"
    write_perf_record(path, **_fields())
    (rec,) = load_records(path)
    assert "selection" not in rec["kernels"]
    sel = isolate.selection_of([rec], tmp_path)
    assert sel == [KernelRecord(**{**d, "shape": tuple(d["shape"])}) for d in _selection(0.035)]


@pytest.mark.parametrize("damage", ["truncate", "missing", "edited", "garbage"])
def test_a_damaged_sidecar_is_a_clear_error_naming_the_file_and_the_fix(tmp_path, damage):
    path = tmp_path / "records.jsonl"
    write_perf_record(path, **_fields())
    (rec,) = load_records(path)
    side = _sidecar(tmp_path, rec)
    if damage == "truncate":
        side.write_bytes(side.read_bytes()[:-20])
    elif damage == "missing":
        side.unlink()
    elif damage == "edited":
        text = gzip.decompress(side.read_bytes()).decode().replace("gemlite", "tinygemm")
        side.write_bytes(gzip.compress(text.encode()))
    else:
        side.write_bytes(b"not gzip at all")
    with pytest.raises(PerfDetailError) as info:
        load_detail(rec, tmp_path)
    msg = str(info.value)
    assert str(side) in msg and f"git checkout -- {side}" in msg and "records.jsonl" in msg
    assert {"truncate": "not a complete gzip", "missing": "is missing", "edited": "digest",
            "garbage": "not a complete gzip"}[damage] in msg
    # readers that can do without it: a note, and the summary
    notes = []
    assert load_detail(rec, tmp_path, missing_ok=True, note=notes.append) is rec
    assert len(notes) == 1 and str(side) in notes[0]
    logged = []
    assert isolate.selection_of([rec], tmp_path, log=logged.append) == []
    assert str(side) in logged[0] and "bf16 pass is not considered" in logged[0]


def test_a_sidecar_of_another_record_is_refused(tmp_path):
    path = tmp_path / "records.jsonl"
    a = write_perf_record(path, **_fields(scheme="w4a4"))
    write_perf_record(path, **_fields(scheme="w8a8"))
    _, b = load_records(path)
    with pytest.raises(PerfDetailError, match="belongs to another record"):
        load_detail({**b, DETAIL_KEY: a[DETAIL_KEY]}, tmp_path)
    with pytest.raises(PerfDetailError, match="not a sidecar name"):
        load_detail({**b, DETAIL_KEY: "../../etc/passwd"}, tmp_path)


def _device_summary():
    return load_script("device_perf").summary


def test_the_device_summary_prints_the_per_layer_table_from_the_sidecars(tmp_path, capsys):
    path = tmp_path / "records.jsonl"
    write_perf_record(path, **_fields(method="fp16", scheme="w16a16", reference=True, decode=5.9))
    write_perf_record(path, **_fields())
    summary = _device_summary()
    assert summary(path) == 0
    out = capsys.readouterr().out
    assert "llava-1.5-7b rtn w4a4 fp16 generate decode  (12288, 4096): gemlite [gemlite] 35.0 vs cublas 38.0" in out
    side = tmp_path / load_records(path)[1][DETAIL_KEY]
    side.unlink()
    assert summary(path) == 0  # the table still prints; the missing file is a note
    out = capsys.readouterr().out
    assert f"note: {side}: the detail sidecar of a perf record is missing" in out
    assert out.count("vs cublas") == 2  # the baseline's layers only


def _legacy_folder(folder: Path) -> tuple[Path, list[bytes]]:
    """A records file as perf runs wrote it before the sidecars, with an accuracy record, a failed
    perf record without detail and a torn line among the perf records."""
    path = folder / "records.jsonl"
    folder.mkdir(parents=True, exist_ok=True)
    recs = [new_record(**_fields(method="fp16", scheme="w16a16", reference=True, decode=5.9)),
            new_record(**_fields()),
            new_record(suite="default", model="m", method="rtn", scheme="w4a16", task="t", metric="accuracy",
                       value=0.5, status="ok"),
            new_record(**{**_fields(scheme="w8a8"), "gate": None, "kernels": None, "status": "failed",
                          "error": "child process died"}),
            new_record(**_fields(scheme="w6a6", batch=8))]
    lines = [json.dumps(r).encode() for r in recs]
    lines.insert(3, b'{"metric": "perf", "torn')
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, lines


def test_compact_perf_rewrites_in_place_verified_and_idempotent(tmp_path):
    path, lines = _legacy_folder(tmp_path / "perf")
    before = [json.loads(x) for x in lines if x != b'{"metric": "perf", "torn']
    c = compact_perf(tmp_path / "perf")
    assert c["records"] == 3 and c["files"] == 3 and c["bytes_after"] < c["bytes_before"]
    new = path.read_bytes().split(b"\n")
    assert len(new) == len(lines) + 1 and new[-1] == b""
    for i in (2, 3, 4):  # the accuracy record, the torn line, the record without detail: byte for byte
        assert new[i] == lines[i]
    got = [load_detail(r, tmp_path / "perf") for r in load_records(path)]
    for g in got:
        g.pop(DETAIL_KEY, None)
    assert [dumps(g) for g in got] == [dumps(b) for b in before if b["metric"] == "perf"]
    # again: nothing changes, not a byte
    side = sorted((tmp_path / "perf" / DETAIL_DIR).iterdir())
    snapshot = path.read_bytes(), [p.read_bytes() for p in side]
    assert compact_perf(tmp_path / "perf")["records"] == 0
    assert (path.read_bytes(), [p.read_bytes() for p in sorted((tmp_path / "perf" / DETAIL_DIR).iterdir())]) \
        == snapshot
    # the same records compacted elsewhere give the same bytes
    _legacy_folder(tmp_path / "copy")
    compact_perf(tmp_path / "copy")
    assert (tmp_path / "copy" / "records.jsonl").read_bytes() == snapshot[0]
    assert [p.read_bytes() for p in sorted((tmp_path / "copy" / DETAIL_DIR).iterdir())] == snapshot[1]


def test_compact_perf_after_a_kill_and_its_command(tmp_path, capsys):
    path, lines = _legacy_folder(tmp_path / "perf")
    # killed after writing the sidecars, before records.jsonl was replaced: the old file reads as it was
    for line in lines:
        rec = json.loads(line) if line.startswith(b'{"suite"') else None
        if rec and rec["metric"] == "perf":
            write_detail(tmp_path / "perf", rec)
    assert len(list((tmp_path / "perf" / DETAIL_DIR).iterdir())) == 3 and path.read_bytes().split(b"\n")[:-1] == lines
    assert main(["compact-perf", str(tmp_path / "perf")]) == 0
    assert "3 perf record(s) rewritten, their detail in 3 sidecar(s)" in capsys.readouterr().out
    assert main(["compact-perf", str(tmp_path / "perf")]) == 0
    assert "already compact" in capsys.readouterr().out
    assert main(["compact-perf", str(tmp_path / "nothing")]) == 2
    assert "not a perf results folder" in capsys.readouterr().err


def test_compact_perf_waits_for_no_run(tmp_path, capsys):
    path, lines = _legacy_folder(tmp_path / "perf")
    with results_lock(tmp_path / "perf"):
        with pytest.raises(ResultsDirError):
            compact_perf(tmp_path / "perf")
        assert main(["compact-perf", str(tmp_path / "perf")]) == 2
    assert "in use by another qvlm-bench run" in capsys.readouterr().err
    assert path.read_bytes().split(b"\n")[:-1] == lines


def test_committed_perf_records_keep_their_detail_in_sidecars():
    """results/perf as committed: compact (no perf record with its detail inline), every sidecar
    there and whole."""
    folder = REPO / "results" / "perf"
    if not (folder / "records.jsonl").is_file():
        pytest.skip("results/perf is not in this checkout")
    recs = load_records(folder / "records.jsonl")
    inline = [r.get("config_hash") for r in recs if split_detail(r)[1] is not None]
    assert not inline, f"perf records with inline detail: run `qvlm-bench compact-perf results/perf`: {inline[:5]}"
    for r in recs:
        load_detail(r, folder)
