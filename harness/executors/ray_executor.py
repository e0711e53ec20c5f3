"""Run a suite's groups on Ray workers (``qvlm-bench run SUITE --executor ray``).

Decisions (notes/README-ray.md has the reasoning at length):

* **Unit of work: the group** (model, variant, scheme: one quantization state). A worker opens a
  group — loads the model, quantizes (or loads the state another worker cached in the shared
  output folder), applies the state — and then evaluates the group's cells one call at a time.
* **Workers are Ray actors holding a ``GroupWorker``** (the serial runner's code), so a loaded
  model stays loaded across groups; an idle worker prefers a group of the model it already has.
  One GPU per worker (``--gpus-per-worker``), or ``--workers N`` CPU workers.
* **One call per cell** (or per shard of a cell): each cell's records come back to the driver as
  soon as it finishes, and **the driver alone appends them** to records.jsonl. On a shared
  filesystem (NFS, Lustre) ``O_APPEND`` from several hosts is not atomic — NFS computes the
  append offset on the client — so one writer is the safe design; workers only write files named
  by content keys (the state cache, per-sample files), each atomically renamed into place.
* **Nothing lost, nothing duplicated**: a record exists only once its cell has finished and been
  returned; a worker that dies mid-cell is restarted by Ray and the driver resubmits the cell
  (``retries`` times, then records it ``failed``, which the next run retries). Resume is the
  serial runner's: the planner skips cells whose key is recorded ``ok``.
* **Sharding** (``harness.sharding``): a cell whose task is larger than ``shard_size`` questions
  (or has ``shards: N``) is split into batch-aligned blocks evaluated by any worker once the
  group's state is cached; the driver merges and scores them once.

The calls are self-contained (a call for a group a worker does not have open opens it first), so
a retry on a restarted worker needs no special path.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .. import determinism
from ..cells import EVAL_CODE, STATE_CODE, Cell, CellGroup, code_digest
from ..records import new_record
from ..suite_config import Suite
from ..registry import method_code_digest
from ..samples import samples_path, write_samples
from ..sharding import DEFAULT_SHARD_SIZE, ShardResult, merge_shards, requested_shards, shard_count, shard_ranges

log = logging.getLogger("qvlm_bench")

# How long the driver waits for workers to start, and for Ray to restart dead workers when none
# is left alive.
STARTUP_TIMEOUT_S = 600.0
RESTART_TIMEOUT_S = 600.0
INSTALL_HINT = ("the Ray executor needs Ray: pip install 'qvlm-bench[distributed]' "
                "(or pip install 'ray>=2.9')")


def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError(f"{INSTALL_HINT} ({exc})") from None
    return ray


def code_identity(suite: Suite) -> dict:
    """Digests of the code that computes the suite's cells, compared between driver and workers:
    cell keys are computed by the driver, so a worker running other code would file its results
    under keys that do not describe them."""
    return {"state": code_digest(STATE_CODE), "eval": code_digest(EVAL_CODE),
            "methods": {m.name: method_code_digest(m.name) for m in suite.methods}}


def worker_suite(suite: Suite) -> Suite:
    """The suite as workers get it: folders made absolute (a worker's working directory is not
    the driver's on a cluster)."""
    def absolute(p):
        return str(Path(p).expanduser().resolve()) if p else p

    return dataclasses.replace(suite, output=absolute(suite.output_dir), data_dir=absolute(suite.data_dir),
                               include_paths=[absolute(p) for p in suite.include_paths])


class WorkerActor:
    """One Ray worker: a ``GroupWorker`` plus the group it has open (made a Ray actor at runtime,
    so importing this module does not need Ray)."""

    def __init__(self, suite: Suite, device: str, threads: int | None):
        import torch

        from ..worker import GroupWorker

        if threads:
            torch.set_num_threads(threads)
        self.worker = GroupWorker(suite, device)
        self.opened = None

    def hello(self, marker: str) -> dict:
        import harness

        return {"pid": os.getpid(), "host": socket.gethostname(), "node": _node_ip(),
                "device": self.worker.device_name(), "code": code_identity(self.worker.suite),
                "marker_seen": Path(marker).exists(), "harness": str(Path(harness.__file__).parent),
                "determinism": determinism.settings()}

    def _ensure(self, group: CellGroup):
        if self.opened is not None and self.opened.group.state_key == group.state_key:
            return self.opened
        if self.opened is not None:
            self.opened.close()
            self.opened = None
        self.opened = self.worker.open_group(group)
        return self.opened

    def open(self, group: CellGroup) -> dict:
        opened = self._ensure(group)
        return {"pid": os.getpid(), "failed": opened.failed}

    def cell(self, group: CellGroup, i: int) -> dict:
        opened = self._ensure(group)
        if opened.failed is not None:
            return {"pid": os.getpid(), "records": [opened.failed[i]]}
        return {"pid": os.getpid(), "records": self.worker.evaluate_cell(opened, group.cells[i])}

    def shard(self, group: CellGroup, i: int, start: int, stop: int) -> dict:
        from ..sharding import evaluate_shard

        opened = self._ensure(group)
        cell = group.cells[i]
        if opened.failed is not None:
            return {"pid": os.getpid(), "records": [opened.failed[i]]}
        try:
            result = evaluate_shard(self.worker, opened, cell, range(start, stop))
        except Exception as exc:
            return {"pid": os.getpid(), "records": [self.worker.failed(cell, exc, "evaluate", opened.state)]}
        return {"pid": os.getpid(), "shard": result}

    def ping(self) -> int:
        return os.getpid()

    def count(self, tasks) -> dict:
        from ..sharding import count_docs

        return count_docs(self.worker.suite, tasks)


def _node_ip() -> str | None:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:
        return None


# ---- the driver ------------------------------------------------------------------------------


@dataclass
class GroupRun:
    """A pending group and its queue of jobs (cells, shards of cells)."""

    group: CellGroup
    status: str = "new"  # new -> opening -> ready (its jobs may run on any worker) -> done
    queue: deque = field(default_factory=deque)


@dataclass
class Job:
    kind: str  # open | cell | shard
    run: GroupRun
    cell: int = -1
    docs: range | None = None
    attempts: int = 0

    def describe(self) -> str:
        c = self.run.group.cells[max(self.cell, 0)]
        what = f"{Path(c.model.name).name} / {c.variant.label} / {c.scheme}"
        if self.kind == "open":
            return f"open {what}"
        if self.kind == "shard":
            return f"{what} / {c.task.name} [{self.docs.start}:{self.docs.stop}]"
        return f"{what} / {c.task.name}"


@dataclass
class _Slot:
    index: int
    handle: object
    info: dict = field(default_factory=dict)
    model: str | None = None  # what the driver believes the worker has loaded / open
    open_key: str | None = None
    job: Job | None = None
    since: float = 0.0
    down_since: float | None = None  # died; Ray is restarting it
    pinging: bool = False
    retry_at: float = 0.0


@dataclass
class _Sharded:
    cell: Cell
    expected: int
    parts: list = field(default_factory=list)
    done: bool = False


def pick_job(runs: list[GroupRun], model: str | None, open_key: str | None) -> Job | None:
    """The scheduling policy: the next job for an idle worker that has ``model`` loaded and the
    group ``open_key`` open. In order: work of the group it has open (no reload); a shard of a
    ready group (shards exist to be spread); a new group, preferring its loaded model; else a
    cell of a group another worker opened (the tail of the suite, where workers would idle).
    Picking a new group marks it ``opening``: no other worker starts it until it is ready."""
    ready = [r for r in runs if r.status == "ready" and r.queue]
    for r in ready:
        if r.group.state_key == open_key:
            return r.queue.popleft()

    def other_model(r: GroupRun) -> bool:  # sorts the worker's loaded model first
        return r.group.head.model.name != model

    for r in sorted(ready, key=other_model):
        for job in r.queue:
            if job.kind == "shard":
                r.queue.remove(job)
                return job
    new = [r for r in runs if r.status == "new"]
    if new:
        r = sorted(new, key=other_model)[0]
        r.status = "opening"
        return Job("open", r)
    for r in sorted(ready, key=other_model):
        return r.queue.popleft()
    return None


def plan_shards(suite: Suite, groups: list[CellGroup], sizes: dict[str, int],
                shard_size: int | None) -> dict[str, list[range]]:
    """``{cell key: doc ranges}`` for the cells evaluated in shards, given each task's size."""
    plan = {}
    for g in groups:
        for c in g.cells:
            n = sizes.get(c.task.name)
            if n:
                k = shard_count(n, suite.batch_size, requested_shards(suite, c.task), shard_size)
                if k > 1:
                    plan[c.key] = shard_ranges(n, k, suite.batch_size)
    return plan


def tasks_to_size(suite: Suite, groups: list[CellGroup], shard_size: int | None) -> dict:
    """The tasks whose size decides their shards: asked for (``shards`` > 1), or possibly above
    the threshold (the suite's ``limit`` does not already keep them under it)."""
    out = {}
    for g in groups:
        for c in g.cells:
            t = c.task
            req = requested_shards(suite, t)
            if req == 1 or t.name in out:
                continue
            if req is None and (not shard_size or (suite.limit is not None and suite.limit <= shard_size)):
                continue
            out[t.name] = t
    return out


def new_runs(groups: list[CellGroup], plan: dict[str, list[range]]) -> list[GroupRun]:
    """A ``GroupRun`` per group, its queue holding one job per cell or per shard of a cell."""
    runs = []
    for g in groups:
        r = GroupRun(g)
        for i, c in enumerate(g.cells):
            if c.key in plan:
                r.queue.extend(Job("shard", r, i, docs) for docs in plan[c.key])
            else:
                r.queue.append(Job("cell", r, i))
        runs.append(r)
    return runs


class RayExecutor:
    """Runs pending groups on Ray workers; yields each cell's records as it finishes."""

    name = "ray"

    def __init__(self, suite: Suite, *, address: str | None = None, workers: int | None = None,
                 gpus_per_worker: float = 1.0, shard_size: int | None = DEFAULT_SHARD_SIZE,
                 retries: int = 1, show_progress: bool = True):
        if suite.device.startswith("cuda:"):
            raise ValueError(f"device {suite.device!r} pins one GPU; with --executor ray every worker "
                             f"gets its own GPU: use device cuda (or auto)")
        if workers is not None and workers < 1:
            raise ValueError(f"--workers must be at least 1, got {workers}")
        if gpus_per_worker < 0:
            raise ValueError(f"--gpus-per-worker must not be negative, got {gpus_per_worker}")
        if shard_size is not None and shard_size < 0:
            raise ValueError(f"--shard-size must not be negative (0: never shard), got {shard_size}")
        self.ray = import_ray()
        self.suite = suite
        # RAY_ADDRESS is Ray's own way to name a cluster; ray.init would join it anyway
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.workers = workers
        self.gpus_per_worker = float(gpus_per_worker)
        self.shard_size = shard_size or None
        self.retries = int(retries)
        self.show_progress = show_progress
        self._started_ray = False
        if self.address:  # a cluster's resources decide the device kind: connect now
            self._connect()
        self.device = self._resolve_device()
        self.slots: list[_Slot] = []
        self._status = None

    # ---- Ray instance and workers -----------------------------------------------------------

    def _local_gpus(self) -> int:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0

    def _connect(self) -> None:
        ray = self.ray
        if ray.is_initialized():
            return
        # workers' own progress bars would interleave on the driver's console: the status lines
        # under the suite's bar say what each worker does instead
        env = {"TQDM_DISABLE": "1"}
        if self.address:
            ray.init(address=self.address, logging_level=logging.WARNING,
                     runtime_env={"env_vars": env})
        else:
            import harness

            # workers import this checkout's code, as the driver does (not another installed copy)
            root = str(Path(harness.__file__).resolve().parents[1])
            env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
            ray.init(num_cpus=max(os.cpu_count() or 1, self.workers or 1), num_gpus=self._local_gpus(),
                     include_dashboard=False, logging_level=logging.WARNING, runtime_env={"env_vars": env})
        self._started_ray = True

    def _cluster(self, key: str) -> float:
        if self.ray.is_initialized():
            return float(self.ray.cluster_resources().get(key, 0))
        return float(self._local_gpus() if key == "GPU" else (os.cpu_count() or 1))

    def _resolve_device(self) -> str:
        gpus = self._cluster("GPU")
        want = self.suite.device
        if want == "cpu" or self.gpus_per_worker == 0:
            return "cpu"
        if want == "cuda" and gpus == 0:
            raise RuntimeError("the suite asks for device cuda but the Ray cluster has no GPU; "
                               "use --device cpu with --workers N")
        return "cuda" if gpus > 0 else "cpu"

    def _worker_count(self) -> tuple[int, dict]:
        """How many workers, and the resources each asks Ray for: a GPU worker gets its share of
        its node's cores (the least any GPU node offers per worker, so every worker fits)."""
        if self.device == "cuda":
            gpus = self._cluster("GPU")
            fit = int(gpus // self.gpus_per_worker)
            n = self.workers or fit
            if n > fit:
                raise RuntimeError(f"--workers {n} × --gpus-per-worker {self.gpus_per_worker:g} needs "
                                   f"{n * self.gpus_per_worker:g} GPUs; the Ray cluster has {gpus:g}")
            shares = [int(node["Resources"].get("CPU", 0) // max(1, node["Resources"]["GPU"] // self.gpus_per_worker))
                      for node in self.ray.nodes() if node.get("Alive") and node["Resources"].get("GPU", 0) > 0]
            return n, {"num_gpus": self.gpus_per_worker, "num_cpus": max(1, min(shares, default=1))}
        n = self.workers or 1
        return n, {"num_cpus": max(1, int(self._cluster("CPU")) // n)}

    def _start_workers(self) -> None:
        ray = self.ray
        n, resources = self._worker_count()
        threads = self.suite.threads or resources["num_cpus"]
        # deterministic: true: the cuBLAS variable is in each worker's environment from its start
        # (cuBLAS reads it once, at the process's first call); the worker enables the rest itself
        env = determinism.environment(self.suite.deterministic)
        extra = {"runtime_env": {"env_vars": env}} if env else {}
        actor = ray.remote(WorkerActor).options(max_restarts=-1, max_task_retries=0, **resources, **extra)
        suite = worker_suite(self.suite)
        self.slots = [_Slot(i, actor.remote(suite, self.device, threads)) for i in range(n)]
        out = Path(suite.output)
        out.mkdir(parents=True, exist_ok=True)
        marker = out / f".ray-{uuid.uuid4().hex}"
        marker.write_text("visible to every worker?\n")
        try:
            infos = ray.get([s.handle.hello.remote(str(marker)) for s in self.slots], timeout=STARTUP_TIMEOUT_S)
        except self.ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"{n} workers asking for {resources} each did not start within "
                               f"{STARTUP_TIMEOUT_S:.0f} s: the Ray cluster lacks the resources "
                               f"(see `ray status`); use fewer --workers") from None
        finally:
            marker.unlink(missing_ok=True)
        mine = code_identity(self.suite)
        for slot, info in zip(self.slots, infos):
            slot.info = info
            where = f"worker {slot.index} on {info['host']} ({info['node']})"
            if not info["marker_seen"]:
                raise RuntimeError(f"{where} cannot see the output folder {out}: put it on a filesystem "
                                   f"every node mounts at the same path (--output)")
            if self.suite.deterministic and not determinism.in_effect(info["determinism"]):
                raise RuntimeError(f"{where} is not in deterministic mode ({info['determinism']}) although "
                                   f"the suite sets `deterministic: true`")
            if info["code"] != mine:
                raise RuntimeError(f"{where} runs other qvlm-bench code ({info['harness']}) than the "
                                   f"driver: install the same checkout on every node")

    def _stop(self) -> None:
        for s in self.slots:
            try:
                self.ray.kill(s.handle)
            except Exception:
                pass
        self.slots = []
        if self._started_ray:
            self.ray.shutdown()
            self._started_ray = False

    # ---- sharding plan ----------------------------------------------------------------------

    def _shard_plan(self, groups: list[CellGroup]) -> dict[str, list[range]]:
        """``{cell key: doc ranges}`` for the cells evaluated in shards (tasks sized by workers,
        which have the data)."""
        need = tasks_to_size(self.suite, groups, self.shard_size)
        names = list(need)
        refs = [self.slots[i % len(self.slots)].handle.count.remote([need[n]]) for i, n in enumerate(names)]
        sizes = {}
        for name, ref in zip(names, refs):
            try:
                sizes.update(self.ray.get(ref))
            except Exception as exc:  # the cell will fail with the same error when evaluated
                log.warning("could not count the questions of task %s (%s); not sharding it", name, exc)
        return plan_shards(self.suite, groups, sizes, self.shard_size)

    # ---- scheduling -------------------------------------------------------------------------

    def _submit(self, slot: _Slot, job: Job):
        g = job.run.group
        h = slot.handle
        if job.kind == "open":
            ref = h.open.remote(g)
        elif job.kind == "cell":
            ref = h.cell.remote(g, job.cell)
        else:
            ref = h.shard.remote(g, job.cell, job.docs.start, job.docs.stop)
        slot.job, slot.since = job, time.time()
        return ref

    def execute(self, groups: list[CellGroup]) -> Iterator[list[dict]]:
        if not groups:
            return
        self._status = None
        self._connect()
        try:
            self._start_workers()
            plan = self._shard_plan(groups)
            sharded = {c.key: _Sharded(c, len(plan[c.key])) for g in groups for c in g.cells if c.key in plan}
            runs = new_runs(groups, plan)
            self._status = _StatusLines(self.slots, self.show_progress)
            inflight: dict = {}  # ObjectRef -> (slot, "job" | "ping")
            while True:
                now = time.time()
                for slot in self.slots:
                    if slot.down_since is not None:  # restarting: ask until it answers
                        if not slot.pinging and now >= slot.retry_at:
                            inflight[slot.handle.ping.remote()] = (slot, "ping")
                            slot.pinging = True
                    elif slot.job is None:
                        job = pick_job(runs, slot.model, slot.open_key)
                        if job is not None:
                            inflight[self._submit(slot, job)] = (slot, "job")
                self._status.refresh()
                if not any(kind == "job" for _, kind in inflight.values()):
                    left = [r for r in runs if r.status in ("new", "opening") or r.queue]
                    if not left:
                        return
                    if all(s.down_since is not None for s in self.slots):
                        self._check_restarts(now)
                if not inflight:  # every worker is down and its next ping is not due yet
                    time.sleep(0.2)
                    continue
                done, _ = self.ray.wait(list(inflight), num_returns=1, timeout=1.0)
                for ref in done:
                    slot, kind = inflight.pop(ref)
                    if kind == "ping":
                        self._pinged(slot, ref)
                        continue
                    job, slot.job = slot.job, None
                    try:
                        result = self.ray.get(ref)
                    except self.ray.exceptions.RayActorError as exc:
                        yield from self._worker_died(slot, job, exc, sharded)
                        continue
                    except self.ray.exceptions.RayError as exc:  # a bug outside the cell's own try
                        yield from self._job_failed(slot, job, "worker", exc, sharded)
                        continue
                    yield from self._finished(slot, job, result, sharded)
        finally:
            if self._status is not None:
                self._status.close()
            self._stop()

    def _pinged(self, slot: _Slot, ref) -> None:
        slot.pinging = False
        try:
            slot.info["pid"] = self.ray.get(ref)
        except self.ray.exceptions.RayActorError:
            slot.retry_at = time.time() + 0.5
        else:
            log.warning("worker %d is back (pid %s)", slot.index, slot.info["pid"])
            slot.down_since = None

    def _check_restarts(self, now: float) -> None:
        """Every worker is down: wait for Ray to restart them, but not forever."""
        oldest = min(s.down_since for s in self.slots)
        if now - oldest > RESTART_TIMEOUT_S:
            raise RuntimeError(f"no worker has come back for {RESTART_TIMEOUT_S:.0f} s after dying; the "
                               f"finished cells are recorded: run the suite again to resume")

    # ---- results ----------------------------------------------------------------------------

    def _tag(self, slot: _Slot, rec: dict, pid: int | None) -> dict:
        rec["executor"] = {"name": "ray", "worker": slot.index, "pid": pid, "host": slot.info.get("host")}
        return rec

    def _finished(self, slot: _Slot, job: Job, result: dict, sharded: dict) -> Iterator[list[dict]]:
        slot.info["pid"] = result.get("pid", slot.info.get("pid"))
        r = job.run
        slot.model, slot.open_key = r.group.head.model.name, r.group.state_key
        if job.kind == "open":
            if result["failed"] is not None:
                r.status, r.queue = "done", deque()
                for rec in result["failed"]:
                    yield [self._tag(slot, rec, result["pid"])]
            else:
                r.status = "ready"
            return
        if "records" in result:
            recs = [self._tag(slot, rec, result["pid"]) for rec in result["records"]]
            cell = r.group.cells[job.cell]
            if job.kind == "shard":
                entry = sharded[cell.key]
                if entry.done:
                    return
                entry.done = True
                self._drop_shards(r, job.cell)
            yield recs
            return
        part: ShardResult = result["shard"]
        part.worker = {"worker": slot.index, "pid": result["pid"]}
        entry = sharded[part.key]
        if entry.done:
            return
        entry.parts.append(part)
        if len(entry.parts) == entry.expected:
            entry.done = True
            rec, rows = merge_shards(entry.parts)
            out = Path(self.suite.output_dir)
            path = write_samples(samples_path(out, part.key, part.task), rows, part.task)
            rec["samples_file"] = str(path.relative_to(out))
            yield [self._tag(slot, rec, result["pid"])]

    def _drop_shards(self, r: GroupRun, cell: int) -> None:
        r.queue = deque(j for j in r.queue if not (j.kind == "shard" and j.cell == cell))

    def _worker_died(self, slot: _Slot, job: Job, exc, sharded: dict) -> Iterator[list[dict]]:
        """The worker died during ``job`` (killed, crashed, its node lost). Ray restarts the actor;
        no call goes to it until it answers a ping (calls to a restarting actor fail at once)."""
        slot.model = slot.open_key = None
        slot.down_since, slot.pinging, slot.retry_at = time.time(), False, time.time() + 0.5
        if "actor is restarting" in str(exc):  # refused before it ran: not an attempt
            if job.kind == "open":
                job.run.status = "new"
            else:
                job.run.queue.appendleft(job)
            return
        job.attempts += 1
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if job.attempts <= self.retries:
            log.warning("worker %d (pid %s) died during %s; retrying (%d/%d): %s", slot.index,
                        slot.info.get("pid"), job.describe(), job.attempts, self.retries, first)
            if job.kind == "open":
                job.run.status = "new"
            else:
                job.run.queue.appendleft(job)
            return
        yield from self._job_failed(slot, job, "worker died", exc, sharded)

    def _job_failed(self, slot: _Slot, job: Job, stage: str, exc, sharded: dict) -> Iterator[list[dict]]:
        r = job.run
        if job.kind == "open":
            cells = list(r.group.cells)
            r.status, r.queue = "done", deque()
        else:
            cells = [r.group.cells[job.cell]]
            entry = sharded.get(cells[0].key)
            if entry is not None:
                if entry.done:
                    return
                entry.done = True
                self._drop_shards(r, job.cell)
        text = str(exc).strip().splitlines()
        message = f"{stage}: {type(exc).__name__}: {text[0] if text else ''}"
        log.error("%s on worker %d: %s", job.describe(), slot.index, message)
        for cell in cells:
            yield [self._tag(slot, self._failed_record(slot, cell, message, str(exc)), slot.info.get("pid"))]

    def _failed_record(self, slot: _Slot, cell: Cell, message: str, detail: str) -> dict:
        from ..worker import GroupWorker

        base = GroupWorker(self.suite, "cpu").base(cell)  # the cell's fields; device is the worker's
        base["device"] = slot.info.get("device")
        return new_record(**base, status="failed", metric="accuracy", error=message, traceback=detail[-4000:])


class _StatusLines:
    """One line per worker under the runner's bar: which group (cell, shard) it runs, for how long."""

    def __init__(self, slots: list[_Slot], enabled: bool):
        self.slots = slots
        self.lines = []
        if enabled:
            from tqdm.auto import tqdm

            self.lines = [tqdm(total=0, position=i + 1, bar_format="{desc}", leave=False)
                          for i in range(len(slots))]

    def refresh(self) -> None:
        now = time.time()
        for slot, line in zip(self.slots, self.lines):
            who = f"worker {slot.index} [{slot.info.get('host')}:{slot.info.get('pid')}]"
            if slot.down_since is not None:
                what = f"died; Ray is restarting it ({now - slot.down_since:.0f}s)"
            elif slot.job is None:
                what = "idle"
            else:
                what = f"{slot.job.describe()} ({now - slot.since:.0f}s)"
            line.set_description_str(f"{who} {what}", refresh=True)

    def close(self) -> None:
        for line in self.lines:
            line.close()
