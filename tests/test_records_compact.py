"""``compact-records`` moves each record's ``method_meta`` into a shared gzip sidecar and
``read_records`` puts it back: the records, and the tables written from them, are exactly what they
were; a missing or damaged sidecar costs only that meta, named on the console."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from harness.records import SIDECAR_FIELDS, append_record, new_record, read_records, write_jsonl

META_FIELD = SIDECAR_FIELDS["method_meta"]
from harness.records_compact import compact_records

REPO = Path(__file__).resolve().parents[1]
SEED0 = REPO / "results/ablation/seed0"  # Q-VLM's ablation: big metas, three task records per state


def _canonical(records):
    return [json.dumps(r) for r in records]


@pytest.fixture()
def folder(tmp_path):
    if not (SEED0 / "records.jsonl").is_file():
        pytest.skip("results/ablation/seed0 is not in this checkout")
    out = tmp_path / "seed0"
    shutil.copytree(SEED0, out, ignore=shutil.ignore_patterns("cache", ".lock", "meta"))
    # the records as a run writes them: every part inline (the committed folder is compacted)
    write_jsonl(out / "records.jsonl", read_records(SEED0 / "records.jsonl"))
    return out


def test_records_and_tables_read_back_exactly(folder, tmp_path):
    from harness.report import write_leaderboard

    before = read_records(folder / "records.jsonl")
    parts = {json.dumps(r[f]) for r in before for f in SIDECAR_FIELDS if len(json.dumps(r.get(f) or {})) > 1100}
    write_leaderboard(folder, out_dir=tmp_path / "before", plots=False, n_resamples=200)
    size = (folder / "records.jsonl").stat().st_size

    c = compact_records(folder)
    raw = [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines() if line.strip()]
    assert c["records"] == sum(any(f in r for f in SIDECAR_FIELDS.values()) for r in raw) > 0
    assert c["sidecars"] == len(list((folder / "meta").glob("*.json.gz"))) <= len(parts)
    assert sum("act_ranges_file" in r for r in raw) > 0  # the +clip rows' range search moved too
    assert all(part not in r for part, f in SIDECAR_FIELDS.items() for r in raw if f in r)
    assert c["bytes_after"] < size / 2, c  # Q-VLM's records: the meta was most of them
    after = read_records(folder / "records.jsonl")
    assert _canonical(after) == _canonical(before)  # key order included
    write_leaderboard(folder, out_dir=tmp_path / "after", plots=False, n_resamples=200)
    for name in ("leaderboard.md", "leaderboard.csv"):
        assert (tmp_path / "after" / name).read_text() == (tmp_path / "before" / name).read_text()
    assert compact_records(folder)["records"] == 0  # idempotent
    assert _canonical(read_records(folder / "records.jsonl")) == _canonical(before)


def test_runs_append_inline_records_after_compaction(folder):
    compact_records(folder)
    rec = new_record(method="qvlm", scheme="w4a4", task="t", status="ok", method_meta={"x": list(range(400))})
    append_record(folder / "records.jsonl", rec)
    back = read_records(folder / "records.jsonl")
    assert back[-1]["method_meta"] == {"x": list(range(400))} and META_FIELD not in back[-1]
    assert compact_records(folder)["records"] == 1


def test_a_missing_or_damaged_sidecar_costs_only_its_meta(folder, caplog):
    compact_records(folder)
    sidecars = sorted((folder / "meta").glob("*.json.gz"))
    sidecars[0].unlink()
    sidecars[1].write_bytes(sidecars[2].read_bytes())  # another meta's bytes: the digest does not match
    with caplog.at_level(logging.WARNING, logger="qvlm_bench"):
        records = read_records(folder / "records.jsonl")
    lost = [r for r in records if META_FIELD in r]
    assert lost and all("method_meta" not in r for r in lost)
    assert {r[META_FIELD] for r in lost} == {f"meta/{sidecars[0].name}", f"meta/{sidecars[1].name}"}
    assert all(r.get("value") is not None for r in lost)  # the results themselves are intact
    text = caplog.text
    assert sidecars[0].name in text and sidecars[1].name in text and "does not match" in text


def test_unreadable_lines_and_small_metas_stay_byte_for_byte(tmp_path):
    path = tmp_path / "records.jsonl"
    small = json.dumps(new_record(method="rtn", task="t", status="ok", method_meta={"a": 1}))
    big = json.dumps(new_record(method="qvlm", task="t", status="ok", method_meta={"p": [0.995] * 300}))
    path.write_text(small + "\n" + '{"torn": ' + "\n" + big + "\n")
    c = compact_records(tmp_path)
    lines = path.read_text().split("\n")
    assert c == {"records": 1, "sidecars": 1, "bytes_before": c["bytes_before"], "bytes_after": c["bytes_after"]}
    assert lines[0] == small and lines[1] == '{"torn": '
    assert json.loads(lines[2])[META_FIELD].startswith("meta/")
    assert read_records(path)[1]["method_meta"] == {"p": [0.995] * 300}


def test_not_a_results_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no records.jsonl"):
        compact_records(tmp_path)


def test_a_sidecar_name_outside_meta_is_never_read(tmp_path, caplog):
    """An edited record cannot make the reader open a file outside the folder's meta/."""
    (tmp_path / "secret.json.gz").write_bytes(b"")
    rec = new_record(method="qvlm", task="t", status="ok", value=50.0)
    rec[META_FIELD] = "../secret.json.gz"
    (tmp_path / "records.jsonl").write_text(json.dumps(rec) + "\n")
    with caplog.at_level(logging.WARNING, logger="qvlm_bench"):
        back = read_records(tmp_path / "records.jsonl")
    assert "method_meta" not in back[0] and back[0][META_FIELD] == "../secret.json.gz"
    assert "not a sidecar name" in caplog.text
