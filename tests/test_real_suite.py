"""A suite over the three real tasks, from local copies in the Hub schemas, on the tiny model."""

import os

import pytest

from harness.suite_config import parse_suite
from harness.records import read_records
from harness.runner import run_suite
from test_real_tasks import SQA_FILE, VQA_FILE, needs_data, vizwiz_dir  # noqa: F401  (fixture)


@needs_data
def test_real_tasks_run_end_to_end_from_a_data_dir(tiny_llava_path, vizwiz_dir, tmp_path):  # noqa: F811
    data = vizwiz_dir
    for task, src, split in (("scienceqa_img", SQA_FILE, "test"), ("vqav2_val", VQA_FILE, "validation")):
        (data / task).mkdir(exist_ok=True)
        link = data / task / f"{split}.parquet"
        if not link.exists():
            os.symlink(src, link)
    suite = parse_suite({
        "name": "real", "models": [str(tiny_llava_path)], "methods": ["fp16", "rtn"],
        "schemes": ["w4a4"], "tasks": ["scienceqa_img", "vizwiz_vqa_val", "vqav2_val"],
        "data_dir": str(data), "limit": 8, "batch_size": 8, "device": "cpu",
        "calibration": {"task": "scienceqa_img", "split": "test", "n": 8}, "output": str(tmp_path),
    })
    summary = run_suite(suite, show_progress=False)
    assert (summary.ok, summary.failed) == (6, 0), [r.get("error") for r in summary.records]
    recs = read_records(tmp_path / "records.jsonl")
    n = {r["task"]: r["n"] for r in recs}
    assert n == {"scienceqa_img": 8, "vizwiz_vqa_val": 3, "vqav2_val": 3}
    for r in recs:
        # a random model's answers: counted as empty/unparsed, never dropped
        assert r["n_empty"] + r["n_unparsed"] <= r["n"]
        assert r["kernel"] in ("fp64", "simulated")
    rtn = next(r for r in recs if r["method"] == "rtn")
    assert rtn["calibration"] is None  # rtn needs none
