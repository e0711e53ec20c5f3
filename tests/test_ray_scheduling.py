"""The Ray executor's scheduling policy (``pick_job``) and the scale model that replays it; pure
Python on real planned cells, no Ray needed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from harness.cells import group_cells, plan_cells
from harness.suite_config import load_suite, parse_suite
from harness.executors.ray_executor import new_runs, pick_job, plan_shards

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


@pytest.fixture()
def runs_and_groups(tiny_llava_path, tmp_path):
    suite = parse_suite({"name": "s", "models": ["qvlm-tiny-llava", str(tiny_llava_path)],
                         "methods": ["fp16", "rtn"], "schemes": ["w4a16", "w8a16"],
                         "tasks": ["synth_vqav2", "synth_vizwiz"], "output": str(tmp_path), "device": "cpu"})
    groups = group_cells(plan_cells(suite, "cpu"))
    plan = plan_shards(suite, groups, {"synth_vqav2": 100}, None)  # no request, no threshold: none
    assert plan == {}
    suite.tasks[0].shards = 2
    plan = plan_shards(suite, groups, {"synth_vqav2": 100}, None)
    assert len(plan) == 6 and all([(r.start, r.stop) for r in v] == [(0, 48), (48, 100)] for v in plan.values())
    return new_runs(groups, plan), groups


def test_each_group_is_opened_once_and_its_owner_keeps_it(runs_and_groups):
    runs, groups = runs_and_groups
    m1, m2 = groups[0].head.model.name, groups[3].head.model.name
    a = pick_job(runs, None, None)
    b = pick_job(runs, None, None)
    assert (a.kind, a.run.group, b.kind, b.run.group) == ("open", groups[0], "open", groups[1])
    # a worker holding the second model starts that model's first group, not the next in plan order
    c = pick_job(runs, m2, None)
    assert (c.kind, c.run.group) == ("open", groups[3])
    a.run.status = "ready"
    # the owner evaluates its group's work, shards of the big task included, in plan order
    jobs = [pick_job(runs, m1, groups[0].state_key) for _ in range(3)]
    assert [(j.kind, j.cell) for j in jobs] == [("shard", 0), ("shard", 0), ("cell", 1)]
    assert all(j.run.group is groups[0] for j in jobs)


def test_shards_of_ready_groups_come_before_new_groups_and_the_tail_is_shared(runs_and_groups):
    runs, groups = runs_and_groups
    first = pick_job(runs, None, None)
    first.run.status = "ready"
    helper = pick_job(runs, groups[0].head.model.name, "some other group")
    assert (helper.kind, helper.run.group, helper.docs) == ("shard", groups[0], range(0, 48))
    for r in runs[1:]:
        r.status = "ready"  # every group opened: no new group left
    # an idle worker drains the remaining shards first, then plain cells other workers opened
    kinds = []
    while (job := pick_job(runs, None, None)) is not None:
        kinds.append(job.kind)
    assert kinds == ["shard"] * (6 * 2 - 1) + ["cell"] * 6


def test_scale_model_on_one_gpu_is_the_serial_sum():
    """One worker under the policy runs the groups in plan order: the makespan is the sum of every
    group's quantization, its cells' evaluation and one load per model — computed independently."""
    from scale_model import COSTS, cost, simulate

    suite = load_suite("llava-1.5")
    groups = group_cells(plan_cells(suite, "cuda"))
    want = 0.0
    for g in groups:
        model, method = g.head.model.name, g.head.variant.method
        want += cost(COSTS, "quantize_s", model, method) + cost(COSTS, "open_extra_s", model)
        want += sum(COSTS["questions"][c.task.name] for c in g.cells) * cost(COSTS, "eval_s_per_q", model)
    want += cost(COSTS, "load_s", "llava-1.5-7b") + cost(COSTS, "load_s", "llava-1.5-13b")
    one = simulate(groups, suite, 1, COSTS)
    assert one["makespan_s"] == pytest.approx(want, rel=1e-12) and one["loads"] == 2
    eight = simulate(groups, suite, 8, COSTS)
    assert eight["makespan_s"] < one["makespan_s"] / 4
    assert eight["busy_s"] >= one["busy_s"]  # more workers cost more loads, never less work
