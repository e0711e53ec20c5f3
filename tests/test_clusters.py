"""The cluster unit each task declares (its YAML metadata), how the harness logs each question's
cluster in the samples, and the record's ``cluster_unit``: what the leaderboard's bootstrap
resamples (harness.report.stats)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from harness.suite_config import load_suite
from harness.evaluate import cluster_spec, load_tasks, sample_rows
from harness.records import read_records
from harness.runner import run_suite
from harness.samples import read_samples

SYNTH = ("synth_scienceqa", "synth_vizwiz", "synth_vqav2")


def test_tasks_declare_their_cluster_unit():
    tasks = load_tasks(list(SYNTH))["tasks"]
    assert {n: cluster_spec(t) for n, t in tasks.items()} == {
        "synth_scienceqa": ("question", None),
        "synth_vizwiz": ("image", "question_id"),  # VizWiz's question_id is the photo's file name
        "synth_vqav2": ("image", "image_id"),
    }
    # the synthetic VQAv2 draws a new scene for every question: one question per image, so its
    # clustered interval is the question-level one (clustering shows on the real VQAv2)
    for name in ("synth_vqav2", "synth_vizwiz"):
        col = cluster_spec(tasks[name])[1]
        ids = [d[col] for d in tasks[name].eval_docs]
        assert len(set(ids)) == len(ids) == 150


def test_sample_rows_carry_the_cluster_and_a_missing_id_fails():
    task = SimpleNamespace(config=SimpleNamespace(task="t", metadata={"cluster_unit": "image",
                                                                      "cluster_field": "image_id"}))
    (row,) = sample_rows(task, [{"doc_id": 3, "doc": {"image_id": 42}, "accuracy": 1.0}])
    assert (row["doc_id"], row["cluster"], row["score"]) == (3, 42, 1.0)
    with pytest.raises(ValueError, match="image_id"):
        sample_rows(task, [{"doc_id": 4, "doc": {}, "accuracy": 0.0}])
    plain = SimpleNamespace(config=SimpleNamespace(task="q", metadata={"version": 1.0}))
    assert "cluster" not in sample_rows(plain, [{"doc_id": 0, "doc": {}, "accuracy": 1.0}])[0]
    assert cluster_spec(plain) == ("question", None)
    for bad in ({"cluster_unit": "image"}, {"cluster_field": "image_id"}):
        with pytest.raises(ValueError, match="cluster_field"):
            cluster_spec(SimpleNamespace(config=SimpleNamespace(task="b", metadata=bad)))


def test_records_and_samples_of_a_run_say_the_cluster(tmp_path):
    suite = load_suite("default", overrides={"methods": ["fp16"], "schemes": ["w16a16"], "tasks": list(SYNTH),
                                             "limit": 4, "output": str(tmp_path)})
    summary = run_suite(suite, show_progress=False)
    assert (summary.ok, summary.failed) == (3, 0), [r.get("error") for r in summary.records]
    recs = {r["task"]: r for r in read_records(tmp_path / "records.jsonl")}
    assert {t: r["cluster_unit"] for t, r in recs.items()} == {
        "synth_scienceqa": "question", "synth_vizwiz": "image", "synth_vqav2": "image"}
    assert all(r["samples_file"].endswith(".jsonl.gz") for r in recs.values())  # harness/samples.py
    rows = read_samples(tmp_path / recs["synth_vqav2"]["samples_file"])
    assert all(r["prompt"] for r in rows)  # read back from the task's prompts file
    assert len(list((tmp_path / "samples").glob("prompts-synth_vqav2-*.jsonl.gz"))) == 1
    assert [r["cluster"] for r in rows] == [30_000_000 + i for i in range(4)]  # image_id = 3·10⁷ + row
    assert [r["question_id"] for r in rows] == [1000 * r["cluster"] for r in rows]
