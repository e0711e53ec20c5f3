"""How long a suite takes on 1, 8, 32 GPUs: the Ray executor's own scheduling policy replayed
on per-stage costs (a discrete-event simulation, no GPU, no Ray).

The groups and cells come from the real planner (``plan_cells`` on the suite file); every idle
worker gets its next job from ``harness.executors.ray_executor.pick_job``, the function the
executor uses; a job's duration is built from per-stage costs: loading the model when the worker
has another one loaded, quantizing (open) or loading the cached state (a worker joining a group
another worker opened), and evaluating the task's questions (or a shard's share of them).

The default costs are for LLaVA-1.5 on one H200, measured (docs/benchmarks/quantize_cost.md,
qvlm_cost.md, suite_7b.md) except where docs/benchmarks/scale.md marks them assumed. Replace them
with other measurements:

    PYTHONPATH=. python scripts/scale_model.py                          # llava-1.5, default costs
    PYTHONPATH=. python scripts/scale_model.py --costs costs.json --gpus 1,8,32 --shards 1,4
    PYTHONPATH=. python scripts/scale_model.py --questions vqav2_val=214354     # full VQAv2 split
    PYTHONPATH=. python scripts/scale_model.py --from-records OUT/serial0/records.jsonl   # calibrate
        # load_s and eval s/question of the 7B from a run's records (e.g. bench_ray_overhead.py's)
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COSTS = {
    "_note": "seconds on one H200; 13B = 7B x scale_13b where not given; sources in docs/benchmarks/scale.md",
    "load_s": {"7b": 2.8},  # measured, page-cached folder (docs/benchmarks/suite_7b.md)
    "state_load_s": {"7b": 5.0},  # assumed: 3.5 GB of cached codes read back (~2 s to write) + apply (1 s)
    "open_extra_s": {"7b": 4.0},  # measured: finalize ~1 s + apply ~1 s + state save ~2 s (suite_7b.md)
    "quantize_s": {"7b": {"fp16": 0.0, "rtn": 4.7, "gptq": 109.5, "awq": 80.9, "qvlm": 382.0}},
    "eval_s_per_q": {"7b": 1 / 12.2},  # measured: 12.2 q/s through lm-eval, batch 16 (suite_7b.md)
    "scale_13b": 1.95,  # per-layer work (5120/4096)^2 x 40/32 layers
    "ray_startup_s": 30.0,  # assumed: local instance + workers importing torch/transformers
    "questions": {"scienceqa_img": 2017, "vizwiz_vqa_val": 4319, "vqav2_val": 2000},
}


def size(model: str) -> str:
    return "13b" if "13b" in model.lower() else "7b"


def cost(costs: dict, key: str, model: str, method: str | None = None) -> float:
    table = costs[key]
    s = size(model)
    if s in table:
        v = table[s]
        return float(v[method] if method is not None else v)
    v = table["7b"]
    return float(v[method] if method is not None else v) * costs["scale_13b"]


def simulate(groups, suite, workers: int, costs: dict, shard_size: int | None = None) -> dict:
    """Makespan and busy time of ``groups`` on ``workers`` GPUs under the executor's policy."""
    from harness.executors.ray_executor import new_runs, pick_job, plan_shards

    sizes = {t.name: min(costs["questions"][t.name], suite.limit or 10**9) for t in suite.tasks}
    runs = new_runs(groups, plan_shards(suite, groups, sizes, shard_size))
    state = [{"model": None, "open": None} for _ in range(workers)]
    events: list = []  # (finish time, worker, job)
    idle = list(range(workers))
    now = busy = 0.0
    reloads = 0
    while True:
        for w in list(idle):
            job = pick_job(runs, state[w]["model"], state[w]["open"])
            if job is None:
                continue
            g = job.run.group
            model, method = g.head.model.name, g.head.variant.method
            d = 0.0
            if state[w]["model"] != model:
                d += cost(costs, "load_s", model)
                reloads += 1
            if job.kind == "open":
                d += cost(costs, "quantize_s", model, method) + cost(costs, "open_extra_s", model)
            else:
                if state[w]["open"] != g.state_key:
                    d += cost(costs, "state_load_s", model)
                task = g.cells[job.cell].task.name
                n = len(job.docs) if job.docs is not None else sizes[task]
                d += n * cost(costs, "eval_s_per_q", model)
            state[w] = {"model": model, "open": g.state_key}
            busy += d
            heapq.heappush(events, (now + d, w, id(job), job))
            idle.remove(w)
        if not events:
            break
        now, w, _, job = heapq.heappop(events)
        if job.kind == "open":
            job.run.status = "ready"
        idle.append(w)
    return {"makespan_s": now, "busy_s": busy, "loads": reloads}


def from_records(path: str, costs: dict) -> dict:
    """Costs with the 7B's load time and evaluation seconds per question taken from records."""
    from harness.records import read_records

    recs = [r for r in read_records(path) if r.get("status") == "ok"]
    loads = [r["timings"]["load_s"] for r in recs if (r.get("timings") or {}).get("load_s", 0) > 1]
    per_q = [r["timings"]["eval_s"] / r["n"] for r in recs if r.get("n")]
    out = json.loads(json.dumps(costs))
    if loads:
        out["load_s"]["7b"] = max(loads)
    if per_q:
        out["eval_s_per_q"]["7b"] = sum(per_q) / len(per_q)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suite", default="llava-1.5")
    ap.add_argument("--gpus", default="1,8,32")
    ap.add_argument("--shards", default="1,4", help="`shards:` values to compare (1: none)")
    ap.add_argument("--costs", help="JSON file overriding COSTS keys")
    ap.add_argument("--from-records", help="records.jsonl of a 7B run: its load_s and eval s/question")
    ap.add_argument("--shard-size", type=int, default=None,
                    help="questions above which a task is sharded (the executor's --shard-size; "
                         "default: its default)")
    ap.add_argument("--questions", action="append", default=[], metavar="TASK=N",
                    help="questions of a task, e.g. vqav2_val=214354 for the full validation split")
    ap.add_argument("--json", help="write the table here too")
    args = ap.parse_args(argv)
    from harness.cells import group_cells, plan_cells
    from harness.suite_config import load_suite

    costs = dict(COSTS)
    if args.costs:
        costs.update(json.loads(Path(args.costs).read_text()))
    if args.from_records:
        costs = from_records(args.from_records, costs)
    for item in args.questions:
        task, _, n = item.partition("=")
        costs["questions"] = {**costs["questions"], task: int(n)}
    from harness.sharding import DEFAULT_SHARD_SIZE

    shard_size = DEFAULT_SHARD_SIZE if args.shard_size is None else (args.shard_size or None)
    rows = []
    for shards in [int(s) for s in args.shards.split(",")]:
        suite = load_suite(args.suite, overrides={"shards": shards} if shards > 1 else None)
        groups = group_cells(plan_cells(suite, "cuda"))
        serial = None
        for gpus in [int(g) for g in args.gpus.split(",")]:
            res = simulate(groups, suite, gpus, costs, shard_size)
            if gpus == 1 and serial is None:
                serial = res["makespan_s"]
            wall = res["makespan_s"] + (costs["ray_startup_s"] if gpus > 1 else 0.0)
            rows.append({"shards": shards, "gpus": gpus, "groups": len(groups),
                         "cells": sum(len(g.cells) for g in groups), "wall_h": wall / 3600,
                         "gpu_h": res["busy_s"] / 3600, "speedup": (serial or wall) / wall,
                         "efficiency": res["busy_s"] / (gpus * res["makespan_s"]), "model_loads": res["loads"]})
    print(f"suite {args.suite}: " + ", ".join(f"{k}={v}" for k, v in costs.items() if not k.startswith("_")))
    print(f"{'shards':>6} {'GPUs':>5} {'wall h':>7} {'GPU h':>6} {'speedup':>8} {'busy':>5} {'loads':>6}")
    for r in rows:
        print(f"{r['shards']:>6} {r['gpus']:>5} {r['wall_h']:>7.2f} {r['gpu_h']:>6.2f} {r['speedup']:>8.2f} "
              f"{r['efficiency']:>5.0%} {r['model_loads']:>6}")
    if args.json:
        Path(args.json).write_text(json.dumps({"costs": costs, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
