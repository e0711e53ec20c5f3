"""Sharded evaluation (harness.sharding): shard boundaries, the merge's scoring against independent
formulas, and a sharded cell equal to the unsharded one in every score field and sample row."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from harness.cells import group_cells, plan_cells
from harness.suite_config import SuiteError, parse_suite
from harness.samples import read_samples
from harness.sharding import ShardResult, merge_shards, requested_shards, shard_count, shard_ranges


@pytest.mark.parametrize("n, k, bs", [(13, 3, 4), (150, 8, 32), (100, 4, 25), (7, 5, 4), (1, 3, 8), (64, 64, 1)])
def test_shards_tile_the_questions_on_batch_boundaries(n, k, bs):
    ranges = shard_ranges(n, k, bs)
    assert [i for r in ranges for i in r] == list(range(n))  # every question once, in order
    assert all(r.start % bs == 0 and len(r) > 0 for r in ranges)
    assert len(ranges) == min(k, math.ceil(n / bs))
    batches = [math.ceil(len(r) / bs) for r in ranges]
    assert max(batches) - min(batches) <= 1  # balanced to within one batch


def test_shard_count_follows_request_then_threshold():
    assert shard_count(214_000, 16, None, 10_000) == 22
    assert shard_count(9_000, 16, None, 10_000) == 1
    assert shard_count(9_000, 16, 4, 10_000) == 4  # an explicit request wins over the threshold
    assert shard_count(9_000, 16, None, None) == 1
    assert shard_count(20, 8, 16, None) == 3  # never more shards than batches


def test_shards_keys_validate_and_stay_out_of_cell_keys(tmp_path):
    base = {"name": "t", "models": ["qvlm-tiny-llava"], "methods": ["rtn"], "schemes": ["w4a16"],
            "tasks": ["synth_vqav2"], "output": str(tmp_path), "device": "cpu"}
    plain = parse_suite(base)
    sharded = parse_suite({**base, "shards": 4, "tasks": [{"name": "synth_vqav2", "shards": 2}]})
    assert requested_shards(sharded, sharded.tasks[0]) == 2
    assert requested_shards(parse_suite({**base, "shards": 4}), plain.tasks[0]) == 4
    assert requested_shards(plain, plain.tasks[0]) is None
    # sharding changes how a cell is computed, not what: same keys, so records are shared
    assert [c.key for c in plan_cells(plain, "cpu")] == [c.key for c in plan_cells(sharded, "cpu")]
    for bad, where in ((0, "`shards`"), (True, "`shards`"), ("2", "`shards`")):
        with pytest.raises(SuiteError, match=f"{where} must be a positive integer"):
            parse_suite({**base, "shards": bad})
    with pytest.raises(SuiteError, match="`shards` of task 'synth_vqav2' must be a positive integer"):
        parse_suite({**base, "tasks": [{"name": "synth_vqav2", "shards": -1}]})


def _part(start, scores, empty, unparsed, key="k"):
    n = len(scores)
    return ShardResult(
        key=key, task="t", docs=(start, start + n),
        rows=[{"doc_id": start + i, "generation": f"g{start + i}", "score": s} for i, s in enumerate(scores)],
        metrics={"accuracy": list(scores), "empty": list(empty), "unparsed": list(unparsed)},
        aggregations={"accuracy": "mean", "empty": "mean", "unparsed": "mean"},
        record={"config_hash": key, "value": -1.0, "timings": {"load_s": 1.0}, "state_cached": start > 0},
        eval_s=1.5)


def test_merge_scores_once_like_the_official_formulas():
    rng = np.random.default_rng(0)
    scores = rng.choice([0.0, 0.3, 0.6, 0.9, 1.0], size=37).tolist()  # VQA-style fractional scores
    empty = (rng.random(37) < 0.1).astype(float).tolist()
    unparsed = (rng.random(37) < 0.2).astype(float).tolist()
    ranges = shard_ranges(37, 3, 8)
    parts = [_part(r.start, scores[r.start:r.stop], empty[r.start:r.stop], unparsed[r.start:r.stop])
             for r in ranges]
    rec, rows = merge_shards(parts[::-1])  # arrival order does not matter
    ref = np.asarray(scores, dtype=np.float64)
    assert rec["value"] == pytest.approx(100 * ref.mean(), rel=1e-13)
    assert rec["stderr"] == pytest.approx(100 * ref.std(ddof=1) / math.sqrt(37), rel=1e-12)
    assert (rec["n"], rec["n_empty"], rec["n_unparsed"]) == (37, int(sum(empty)), int(sum(unparsed)))
    assert [r["doc_id"] for r in rows] == list(range(37))
    assert [r["score"] for r in rows] == scores
    assert [s["docs"] for s in rec["shards"]] == [[r.start, r.stop] for r in ranges]
    assert rec["eval_s"] == pytest.approx(4.5) and rec["timings"]["eval_s"] == pytest.approx(4.5)


def test_merge_refuses_shards_that_do_not_tile():
    a, b = _part(0, [1.0] * 8, [0.0] * 8, [0.0] * 8), _part(8, [0.0] * 5, [0.0] * 5, [0.0] * 5)
    overlap = _part(4, [1.0] * 8, [0.0] * 8, [0.0] * 8)
    with pytest.raises(ValueError, match="do not tile"):
        merge_shards([a, overlap])
    with pytest.raises(ValueError, match="do not tile"):
        merge_shards([b])  # the first block is missing
    with pytest.raises(ValueError, match="different cells"):
        merge_shards([a, _part(8, [0.0] * 5, [0.0] * 5, [0.0] * 5, key="other")])
    rec, _ = merge_shards([a, b])
    assert rec["value"] == pytest.approx(100 * 8 / 13)


def test_sharded_cell_equals_the_unsharded_cell(tmp_path):
    """The bundled model, 4-bit weights (RTN), on VQA-style soft scores: three shards evaluated on
    the open group and merged give the unsharded record's numbers and its sample file, line by line."""
    from harness.sharding import evaluate_shard
    from harness.worker import GroupWorker

    suite = parse_suite({"name": "shard", "models": ["qvlm-tiny-llava"], "methods": ["rtn"],
                         "schemes": ["w3a16"], "tasks": ["synth_vqav2"], "limit": 13, "batch_size": 4,
                         "output": str(tmp_path), "device": "cpu"})
    (group,) = group_cells(plan_cells(suite, "cpu"))
    worker = GroupWorker(suite, "cpu")
    opened = worker.open_group(group)
    assert opened.failed is None
    try:
        (whole,) = worker.evaluate_cell(opened, group.cells[0])
        parts = [evaluate_shard(worker, opened, group.cells[0], r) for r in shard_ranges(13, 3, 4)]
    finally:
        opened.close()
    merged, rows = merge_shards(parts)
    assert len(parts) == 3 and [p.docs for p in parts] == [(0, 4), (4, 8), (8, 13)]
    for key in ("value", "stderr", "n", "n_empty", "n_unparsed", "config_hash", "proof", "method_meta",
                "cluster_unit"):
        assert merged[key] == whole[key], key
    assert whole["cluster_unit"] == "image" and all("cluster" in r for r in rows)
    written = read_samples(tmp_path / whole["samples_file"])
    assert [json.dumps(r) for r in written] == [json.dumps(r) for r in rows]  # key order too
    scores = [r["score"] for r in written]
    assert whole["value"] == pytest.approx(100 * np.mean(scores), rel=1e-13)
    assert 0 < whole["value"] < 100 and len(set(scores)) > 1  # a result with something to get wrong
