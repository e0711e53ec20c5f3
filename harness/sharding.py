"""Sharded evaluation: one task's questions split across workers, merged and scored once.

A shard is a contiguous block of the task's evaluation docs whose boundaries fall on multiples
of the evaluation batch size. Batches are formed in doc order (``harness.evaluate``), so every
question is generated in exactly the batch — same neighbours, same padding — as in an unsharded
run: on a GPU, where another batch could round differently in fp16, it is the same computation,
not merely a close one. Each shard returns its per-question rows and lm-eval's per-question
metrics; the merge orders them by ``doc_id`` and scores them once with the task's own lm-eval
aggregation and stderr functions, so the merged record equals an unsharded record in value,
stderr, n, n_empty, n_unparsed and per-sample file content (tests/test_sharding.py in process,
tests/test_ray_executor.py through Ray).

Sharding changes how a cell is computed, never what: ``shards`` is not part of a cell's key.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Sequence

from .cells import Cell
from .suite_config import Suite, TaskSpec

# Matches harness.evaluate.evaluate_tasks (only bootstrapped stderrs depend on it; `mean`'s is
# closed-form).
BOOTSTRAP_ITERS = 1000
# With the Ray executor, a task with more questions than this is sharded (``--shard-size``).
DEFAULT_SHARD_SIZE = 10_000


def requested_shards(suite: Suite, task: TaskSpec) -> int | None:
    """The shard count the suite asks for (the task's ``shards``, else the suite's); None when
    neither says, leaving it to the size threshold."""
    if task.shards is not None:
        return int(task.shards)
    return int(suite.shards) if suite.shards is not None else None


def shard_count(n_docs: int, batch_size: int, requested: int | None, shard_size: int | None) -> int:
    """How many shards a task of ``n_docs`` questions gets: the request, else ``ceil(n /
    shard_size)`` above the threshold, else 1; never more than it has batches."""
    if requested is not None:
        k = requested
    elif shard_size and n_docs > shard_size:
        k = math.ceil(n_docs / shard_size)
    else:
        k = 1
    return max(1, min(k, math.ceil(n_docs / batch_size)))


def shard_ranges(n_docs: int, n_shards: int, batch_size: int) -> list[range]:
    """Contiguous doc ranges covering ``range(n_docs)``, each starting on a batch boundary, sizes
    within one batch of each other."""
    if n_docs <= 0:
        raise ValueError(f"cannot shard a task with {n_docs} questions")
    n_batches = math.ceil(n_docs / batch_size)
    k = max(1, min(n_shards, n_batches))
    bounds = [min(n_docs, (i * n_batches // k) * batch_size) for i in range(k + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


@dataclass
class ShardResult:
    """What a worker returns for one shard: rows and metrics per question, in doc order."""

    key: str  # the cell's config_hash
    task: str  # lm-eval's task name (names the per-sample file, as unsharded)
    docs: tuple[int, int]  # [start, stop)
    rows: list[dict]  # per-sample rows as harness.evaluate writes them, true doc_ids
    metrics: dict[str, list[float]]  # lm-eval's per-question metric values, doc order
    aggregations: dict[str, str]  # metric -> lm-eval registered aggregation name
    record: dict  # the shard's own record (value over the shard): the merged record's template
    eval_s: float
    worker: dict = field(default_factory=dict)


def _aggregation_names(task_obj) -> dict[str, str]:
    from lm_eval.api.registry import AGGREGATION_REGISTRY

    names = {}
    for metric, fn in task_obj.aggregation().items():
        name = next((k for k, f in AGGREGATION_REGISTRY.items() if f is fn), None)
        if name is None:
            raise ValueError(f"task {task_obj.config.task!r} aggregates {metric!r} with an unregistered "
                             f"function; sharding re-scores with lm-eval's registered aggregations — "
                             f"set `shards: 1` for this task")
        names[metric] = name
    return names


def restrict_docs(task_obj, docs: range) -> None:
    """Make lm-eval evaluate only ``docs`` (indices into the task's evaluation docs, after its
    ``process_docs``). Selecting rows of the Arrow table is lazy: a shard never touches (or
    decodes the images of) the other shards' questions, as lm-eval's own ``samples=`` would."""
    eval_docs = task_obj.eval_docs
    n = len(eval_docs)
    if docs.stop > n:
        raise ValueError(f"shard {docs.start}:{docs.stop} exceeds the {n} questions of "
                         f"task {task_obj.config.task!r}")
    subset = eval_docs.select(docs) if hasattr(eval_docs, "select") else [eval_docs[i] for i in docs]
    # eval_docs calls test_docs()/validation_docs(): an instance attribute shadows the method
    if task_obj.has_test_docs():
        task_obj.test_docs = lambda: subset
    else:
        task_obj.validation_docs = lambda: subset


def count_docs(suite: Suite, tasks: Sequence[TaskSpec]) -> dict[str, int]:
    """Questions each task evaluates (its evaluation docs, capped by the suite's ``limit``)."""
    from .evaluate import load_tasks
    from .worker import task_spec

    out = {}
    for t in tasks:  # the evaluation's own cached task objects (read here, never modified)
        loaded = load_tasks([task_spec(t, suite)], suite.include_paths)["tasks"]
        (task_obj,) = loaded.values()
        n = len(task_obj.eval_docs)
        out[t.name] = min(n, suite.limit) if suite.limit is not None else n
    return out


def evaluate_shard(worker, opened, cell: Cell, docs: range, *, show_progress: bool = False) -> ShardResult:
    """Evaluate questions ``docs`` of ``cell`` on an open group (``GroupWorker.open_group``).

    The suite's ``limit`` is already applied by the caller (``docs`` lie within it).
    """
    from lm_eval import evaluator

    from .evaluate import cluster_spec, lm_class, sample_rows, task_manager
    from .worker import reset_counters, task_spec

    suite = worker.suite
    reset_counters(opened.handle, worker.device)
    t0 = time.perf_counter()
    model = lm_class()(opened.lm, batch_size=suite.batch_size, show_progress=show_progress)
    # a task object of its own (not evaluate.load_tasks' shared one): restrict_docs modifies it
    task_dict = task_manager(suite.include_paths).load([task_spec(cell.task, suite)])
    ((name, task_obj),) = task_dict["tasks"].items()
    aggregations = _aggregation_names(task_obj)
    restrict_docs(task_obj, docs)
    hash_images = getattr(evaluator, "LMEVAL_HASHMM", None)
    evaluator.LMEVAL_HASHMM = False  # as evaluate_tasks: the rows keep no images to hash
    try:
        out = evaluator.evaluate(model, task_dict, limit=None, log_samples=True,
                                 bootstrap_iters=BOOTSTRAP_ITERS, verbosity="ERROR")
    finally:
        if hash_images is not None:
            evaluator.LMEVAL_HASHMM = hash_images
    eval_s = time.perf_counter() - t0
    samples = out["samples"][name]
    if [s["doc_id"] for s in samples] != list(range(len(docs))):
        raise RuntimeError(f"lm-eval returned docs {[s['doc_id'] for s in samples][:5]}… for a shard "
                           f"of {len(docs)} questions; expected them in order")
    rows, metrics = sample_rows(task_obj, samples), {}
    for row, s, doc_id in zip(rows, samples, docs):
        row["doc_id"] = doc_id
        for m in s["metrics"]:
            metrics.setdefault(m, []).append(s[m])
    part = score(name, metrics, aggregations, len(rows))
    part.cluster_unit = cluster_spec(task_obj)[0]
    timings = {**opened.timings, "eval_s": eval_s}
    record = worker.ok_record(cell, opened.state, opened.cached, opened.handle, part, timings, None)
    return ShardResult(key=cell.key, task=name, docs=(docs.start, docs.stop), rows=rows,
                       metrics=metrics, aggregations=aggregations, record=record, eval_s=eval_s)


def score(task: str, metrics: dict[str, list[float]], aggregations: dict[str, str], n: int):
    """A ``TaskResult`` from per-question metrics, computed as lm-eval and ``evaluate_tasks`` do:
    the task's aggregation of each metric, its stderr function, percent, counts from rates."""
    from lm_eval.api.metrics import stderr_for_metric
    from lm_eval.api.registry import get_aggregation

    from .evaluate import TaskResult

    if "accuracy" not in metrics:
        raise RuntimeError(f"task {task} produced no `accuracy` metric")
    agg = {m: get_aggregation(aggregations.get(m, "mean")) for m in metrics}
    values = {m: agg[m](items) for m, items in metrics.items()}
    items = metrics["accuracy"]
    se_fn = stderr_for_metric(metric=agg["accuracy"], bootstrap_iters=BOOTSTRAP_ITERS)
    se = se_fn(items) if (se_fn and len(items) > 1) else None
    se = float(se) * 100 if isinstance(se, (int, float)) and not math.isnan(se) else None
    return TaskResult(task=task, metric="accuracy", value=float(values["accuracy"]) * 100, stderr=se,
                      n=n, n_empty=round(float(values.get("empty", 0.0)) * n),
                      n_unparsed=round(float(values.get("unparsed", 0.0)) * n))


def merge_shards(parts: Sequence[ShardResult]) -> tuple[dict, list[dict]]:
    """One record and its per-sample rows from every shard of a cell, scored once.

    The shards must cover ``0..n`` exactly once (checked: a duplicated or missing question would
    silently shift the score).
    """
    parts = sorted(parts, key=lambda p: p.docs[0])
    if not parts:
        raise ValueError("no shards to merge")
    if len({(p.key, p.task) for p in parts}) != 1:
        raise ValueError("shards of different cells cannot be merged")
    expected = 0
    for p in parts:
        if p.docs[0] != expected or len(p.rows) != p.docs[1] - p.docs[0]:
            raise ValueError(f"shards do not tile the questions: {[p.docs for p in parts]}")
        expected = p.docs[1]
    rows = [r for p in parts for r in p.rows]
    metrics: dict[str, list[float]] = {}
    for p in parts:
        for m, items in p.metrics.items():
            metrics.setdefault(m, []).extend(items)
    res = score(parts[0].task, metrics, parts[0].aggregations, len(rows))
    rec = dict(parts[0].record)
    eval_s = sum(p.eval_s for p in parts)
    rec.update(value=res.value, stderr=res.stderr, n=res.n, n_empty=res.n_empty,
               n_unparsed=res.n_unparsed, eval_s=eval_s,
               timings={**(rec.get("timings") or {}), "eval_s": round(eval_s, 4)},
               timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               shards=[{"docs": list(p.docs), "eval_s": round(p.eval_s, 4), "state_cached":
                        p.record.get("state_cached"), **p.worker} for p in parts])
    return rec, rows
