"""Per-question sample logs (harness/samples.py): the prompts stored once per task, gzip, exact
round trips, deterministic bytes, old plain files still read, damaged files named with the fix;
``qvlm-bench compact-samples``; the committed results/ compact and (the goal) at most 8 MB."""

from __future__ import annotations

import ast
import gzip
import json
import shutil
from pathlib import Path

import pytest
from board_data import scores, write_run

from harness.cli import main
from harness.records import read_records, write_jsonl
from harness.resultsdir import results_lock
from harness.samples import (SamplesError, compact_samples, encode_samples, read_samples, samples_path,
                             write_samples)

REPO = Path(__file__).resolve().parents[1]


def rows(n: int = 6, prompt: str = "Q{}?\nAnswer briefly.", shift: int = 0) -> list[dict]:
    """Rows as harness.evaluate.sample_rows logs them (doc_id, prompt first)."""
    return [{"doc_id": i, "prompt": prompt.format(i), "generation": ["yes", "no", "ü"][(i + shift) % 3],
             "question_id": 1000 * i, "parsed": None if i == 2 else "x", "score": float((i + shift) % 2),
             "cluster": i // 2} for i in range(n)]


def dumps(rs: list[dict]) -> str:
    return json.dumps(rs)  # key order and values: the rows exactly


def test_round_trip_gives_the_rows_back_exactly(tmp_path):
    want = rows()
    path = write_samples(samples_path(tmp_path, "0123456789abcdef", "t"), want, "t")
    assert path == tmp_path / "samples" / "0123456789abcdef-t.jsonl.gz"
    assert dumps(read_samples(path)) == dumps(want)
    lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    head = json.loads(lines[0])
    assert head["samples_format"] == 1 and head["prompts"].startswith("prompts-t-")
    assert all("prompt" not in json.loads(x) for x in lines[1:])  # stored once, in the prompts file
    assert len(lines) == 1 + len(want)


def test_the_same_rows_give_the_same_bytes(tmp_path):
    a = write_samples(tmp_path / "a" / "k-t.jsonl.gz", rows(), "t")
    b = write_samples(tmp_path / "b" / "k-t.jsonl.gz", [dict(r) for r in rows()], "t")
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes()[4:8] == b"\0\0\0\0"  # gzip mtime 0
    (pa,), (pb,) = (sorted(p.parent.glob("prompts-*")) for p in (a, b))
    assert pa.name == pb.name and pa.read_bytes() == pb.read_bytes()
    assert encode_samples(rows(), "t") == encode_samples(rows(), "t")


def test_cells_that_saw_the_same_prompts_share_one_prompts_file(tmp_path):
    sdir = tmp_path / "samples"
    write_samples(sdir / "a-t.jsonl.gz", rows(shift=0), "t")
    write_samples(sdir / "b-t.jsonl.gz", rows(shift=1), "t")  # other answers, the same prompts
    write_samples(sdir / "c-t.jsonl.gz", rows(prompt="USER: Q{}? ASSISTANT:"), "t")  # another format
    write_samples(sdir / "d-u.jsonl.gz", rows(), "u")  # another task
    prompts = sorted(p.name for p in sdir.glob("prompts-*"))
    assert len(prompts) == 3 and sum(p.startswith("prompts-t-") for p in prompts) == 2
    assert dumps(read_samples(sdir / "b-t.jsonl.gz")) == dumps(rows(shift=1))
    assert dumps(read_samples(sdir / "c-t.jsonl.gz")) == dumps(rows(prompt="USER: Q{}? ASSISTANT:"))
    # rows in another order (a merge of shards) point to the same file: keyed by doc_id
    write_samples(sdir / "e-t.jsonl.gz", rows()[::-1], "t")
    assert len(list(sdir.glob("prompts-*"))) == 3
    assert dumps(read_samples(sdir / "e-t.jsonl.gz")) == dumps(rows()[::-1])


@pytest.mark.parametrize("case", ["no prompt", "prompt not second", "two prompts for one doc", "float doc_id",
                                  "empty"])
def test_rows_that_cannot_be_split_exactly_are_stored_whole(tmp_path, case):
    want = {"no prompt": [{"doc_id": 0, "score": 1.0}],
            "prompt not second": [{"doc_id": 0, "generation": "a", "prompt": "p"}],
            "two prompts for one doc": [{"doc_id": 0, "prompt": "p"}, {"doc_id": 0, "prompt": "q"}],
            "float doc_id": [{"doc_id": 0.5, "prompt": "p"}],
            "empty": []}[case]
    path = write_samples(tmp_path / "k-t.jsonl.gz", want, "t")
    assert json.loads(gzip.decompress(path.read_bytes()).splitlines()[0])["prompts"] is None
    assert not list(tmp_path.glob("prompts-*"))
    assert dumps(read_samples(path)) == dumps(want)


def test_plain_files_of_older_runs_are_still_read(tmp_path):
    old = tmp_path / "k-t.jsonl"
    write_jsonl(old, rows())  # how runs before format 1 wrote them
    assert dumps(read_samples(old)) == dumps(rows())
    old.write_text(old.read_text() + "\n\n")  # blank lines are no rows
    assert dumps(read_samples(old)) == dumps(rows())
    old.write_text(old.read_text() + "not json\n")
    with pytest.raises(SamplesError, match=rf"{old} line 9: not JSON"):
        read_samples(old)


@pytest.mark.parametrize("damage", ["truncated", "flipped", "empty", "not gzip"])
def test_a_damaged_gzip_is_a_clear_error_naming_the_file_and_the_fix(tmp_path, damage):
    path = write_samples(tmp_path / "k-t.jsonl.gz", rows(40), "t")
    data = path.read_bytes()
    path.write_bytes({"truncated": data[:len(data) // 2], "empty": b"", "not gzip": b"{\"doc_id\": 0}\n",
                      "flipped": data[:20] + bytes([data[20] ^ 0xFF]) + data[21:]}[damage])
    with pytest.raises(SamplesError) as err:
        read_samples(path)
    msg = str(err.value)
    assert str(path) in msg and "git checkout" in msg and "records.jsonl" in msg and "recomputes" in msg
    if damage != "empty":
        assert "gzip" in msg


def test_a_missing_or_mismatched_prompts_file_is_a_clear_error(tmp_path):
    path = write_samples(tmp_path / "k-t.jsonl.gz", rows(), "t")
    (prompts,) = tmp_path.glob("prompts-*")
    good = prompts.read_bytes()
    text = gzip.decompress(good).decode().replace("Q3?", "Q3!")
    prompts.write_bytes(gzip.compress(text.encode(), mtime=0))
    with pytest.raises(SamplesError, match=rf"{prompts}: its prompts do not match the digest"):
        read_samples(path)
    prompts.unlink()
    with pytest.raises(SamplesError, match=rf"{path}: the prompts file it points to, {prompts}, is missing"):
        read_samples(path)
    prompts.write_bytes(good)
    assert dumps(read_samples(path)) == dumps(rows())


def test_the_leaderboard_reads_both_formats_and_names_a_damaged_file(tmp_path, capsys):
    folder = write_run(tmp_path / "r", {("fp16", "w16a16", "t"): scores(40, 30),
                                        ("rtn", "w4a4", "t"): scores(40, 20, seed=1),
                                        ("awq", "w4a4", "t"): scores(40, 25, seed=2)})
    recs = read_records(folder / "records.jsonl")
    # one cell in format 1 (with prompts), the others plain
    new = folder / (recs[1]["samples_file"] + ".gz")
    write_samples(new, [{"doc_id": r["doc_id"], "prompt": f"q{r['doc_id']}", **r}
                        for r in read_samples(folder / recs[1]["samples_file"])], "t")
    (folder / recs[1]["samples_file"]).unlink()
    recs[1]["samples_file"] += ".gz"
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert main(["table", str(folder), "--no-plots", "--resamples", "100"]) == 0
    assert "samples file" not in capsys.readouterr().out
    new.write_bytes(new.read_bytes()[:-9])  # cut short
    assert main(["table", str(folder), "--no-plots", "--resamples", "100"]) == 0
    out = capsys.readouterr().out
    assert "samples file unreadable" in out and f"{new}: not a complete gzip file" in out


# ---- qvlm-bench compact-samples ------------------------------------------------------------------


def _old_folder(path: Path) -> Path:
    """A results folder as runs before format 1 left it: plain samples with a prompt per line,
    two tasks, and a torn last line in records.jsonl."""
    cells = {("fp16", "w16a16", "t"): scores(30, 25), ("rtn", "w4a4", "t"): scores(30, 20, seed=1),
             ("rtn", "w4a4", "u"): scores(30, 10, seed=2), ("fp16", "w16a16", "u"): scores(30, 18, seed=3)}
    folder = write_run(path, cells, clusters={"t": [i // 2 for i in range(30)]})
    for rec in read_records(folder / "records.jsonl"):
        f = folder / rec["samples_file"]
        write_jsonl(f, [{"doc_id": r["doc_id"], "prompt": f"{rec['task']} question {r['doc_id']}?",
                         "generation": "g", **{k: v for k, v in r.items() if k != "doc_id"}}
                        for r in read_samples(f)])
    with open(folder / "records.jsonl", "a") as f:
        f.write('{"suite": "synthetic", "model": "m", "meth')  # a torn write: kept as it is
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def _tables(folder: Path) -> dict[str, bytes]:
    assert main(["table", str(folder), "--no-plots", "--resamples", "200"]) == 0
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.is_file() and p.suffix in (".md", ".csv", ".tex", ".html")}


def test_compact_samples_rewrites_repoints_and_keeps_the_tables(tmp_path, capsys):
    folder = _old_folder(tmp_path / "r")
    before_recs = read_records(folder / "records.jsonl")
    old_rows = {r["samples_file"]: read_samples(folder / r["samples_file"]) for r in before_recs}
    reference = shutil.copytree(folder, tmp_path / "reference")
    want_tables = _tables(reference)

    assert main(["compact-samples", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "4 samples file(s) rewritten" in out and "2 new prompts file(s)" in out and "4 record(s)" in out
    sdir = folder / "samples"
    assert not list(sdir.glob("*.jsonl"))
    assert len(list(sdir.glob("prompts-*.jsonl.gz"))) == 2
    recs = read_records(folder / "records.jsonl")
    assert len(recs) == len(before_recs)
    for old, new in zip(before_recs, recs):
        assert new["samples_file"] == old["samples_file"] + ".gz"
        assert {k: v for k, v in new.items() if k != "samples_file"} == \
            {k: v for k, v in old.items() if k != "samples_file"}
        assert dumps(read_samples(folder / new["samples_file"])) == dumps(old_rows[old["samples_file"]])
    assert (folder / "records.jsonl").read_bytes().endswith(b'"meth')  # the torn line kept, byte for byte
    assert _tables(folder) == want_tables

    # idempotent: a second run changes nothing
    first = _snapshot(folder)
    assert main(["compact-samples", str(folder)]) == 0
    assert "already compact" in capsys.readouterr().out
    assert _snapshot(folder) == first


def test_compact_samples_after_a_kill_and_with_a_damaged_file(tmp_path, capsys):
    folder = _old_folder(tmp_path / "r")
    recs = read_records(folder / "records.jsonl")
    # killed after writing one new file, before repointing the records: the rerun completes it
    first = folder / recs[0]["samples_file"]
    write_samples(first.with_name(first.name + ".gz"), read_samples(first), "t")
    bad = folder / recs[1]["samples_file"]
    bad.write_text(bad.read_text() + "not json\n")
    assert main(["compact-samples", str(folder)]) == 1
    captured = capsys.readouterr()
    assert "3 samples file(s) rewritten" in captured.out
    assert f"kept as it is: {bad} line 31: not JSON" in captured.err
    assert bad.exists() and not bad.with_name(bad.name + ".gz").exists()
    after = {r["samples_file"] for r in read_records(folder / "records.jsonl")}
    assert recs[1]["samples_file"] in after and recs[0]["samples_file"] + ".gz" in after


def test_compact_samples_waits_for_no_run(tmp_path, capsys):
    folder = _old_folder(tmp_path / "r")
    before = _snapshot(folder)
    with results_lock(folder):
        assert main(["compact-samples", str(folder)]) == 2
    assert "in use by another qvlm-bench run" in capsys.readouterr().err
    assert _snapshot(folder) == before
    assert main(["compact-samples", str(tmp_path / "nothing")]) == 2
    assert "not a results folder" in capsys.readouterr().err


def test_compact_samples_counts(tmp_path):
    folder = _old_folder(tmp_path / "r")
    c = compact_samples(folder)
    assert (c["files"], c["prompt_files"], c["records"], c["skipped"]) == (4, 2, 4, [])
    assert 0 < c["bytes_after"] < c["bytes_before"]


def test_no_module_imports_private_names_of_evaluate():
    """sharding (and everything else) uses evaluate's public API: lm_class, sample_rows, ..."""
    found = []
    for f in sorted((REPO / "harness").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("evaluate"):
                found += [f"{f.relative_to(REPO)}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert found == []


# ---- the committed results -----------------------------------------------------------------------

RESULTS = REPO / "results"
RESULTS_LIMIT = 8_000_000  # bytes: results/ travels with the tree to the GPU machine (64 MiB in all)


def _results_sizes() -> dict[str, int]:
    """Bytes per top-level folder of results/: the files git tracks (what a clone carries; a run's
    caches and a multi-seed experiment's per-seed tables are ignored), or every file without git."""
    import subprocess

    if not RESULTS.is_dir():
        pytest.skip("results/ is not in this checkout")
    try:
        out = subprocess.run(["git", "ls-files", "-z", "results"], cwd=REPO, capture_output=True, check=True)
        files = [REPO / f for f in out.stdout.decode().split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        files = [p for p in RESULTS.rglob("*") if p.is_file()]
    sizes: dict[str, int] = {}
    for p in files:
        if p.is_file():
            top = p.relative_to(RESULTS).parts[0]
            sizes[top] = sizes.get(top, 0) + p.stat().st_size
    return sizes


def test_committed_samples_are_compact():
    _results_sizes()
    plain = sorted(str(p.relative_to(REPO)) for p in RESULTS.rglob("samples/*.jsonl"))
    assert not plain, f"plain samples files: run `qvlm-bench compact-samples` on their folders: {plain[:5]}"


def test_committed_results_stay_small():
    sizes = _results_sizes()
    total = sum(sizes.values())
    assert total <= RESULTS_LIMIT, (f"results/ holds {total / 1e6:.2f} MB, over {RESULTS_LIMIT / 1e6:g} MB: "
                                    + ", ".join(f"{k} {v / 1e6:.2f}" for k, v in sorted(sizes.items())))
