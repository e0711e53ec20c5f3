"""Each variant of a perf run in a fresh process (``qvlm-bench perf --isolate``): a CUDA fault costs one variant.

A CUDA illegal memory access poisons the process's CUDA context: after it every CUDA call of that
process fails, so in one process a fault of one variant failed every later cell of the run. With
isolation the parent process never touches the device: it runs the float baseline, then each
(method, scheme) with all its batch sizes, each in a child process
(``python -m harness.perf.isolate SPEC``) that loads the model, opens its own ``PerfSession``
with the parent's ``run_id`` (so ``table.py`` pairs every row with the baseline of the same run,
batch and dtype) and appends its records to the same ``records.jsonl`` through the one records
writer. The parent holds the results folder's lock for the whole run; the children, part of that
run, take none.

Why a subprocess of our own rather than ``multiprocessing`` (spawn): the child's stderr is a pipe
the parent reads, so what a dying process writes at the C level (CUDA's messages, an abort) is
kept, and its last lines become the error of the cells it did not finish; the exit status names
the signal; a child past the time budget is killed on a deadline; nothing depends on the parent's
``__main__`` being importable (spawn re-imports it). The child needs what a row's measurement
needs from the parent, passed in a pickled ``ChildSpec``: the config, the variant (its method
class by reference), the budget's clock, and from the baseline's records its end-to-end error and
trained-model reference (the tolerances of the other variants' gates).

A child that dies (a signal, a nonzero exit, killed at the deadline: the budget's end plus
``CHILD_GRACE_S``) gets a ``status: failed`` record for each batch size it did not record, whose
error names the exit and quotes the last lines of its stderr (all of them in ``stderr_tail``); the
run goes on with the next variant. Each child loads the model once for all its batch sizes; its
load time is logged and recorded (``isolation.load_s``), and a child is not started when the time
left would not cover the last child's load.

``QVLM_PERF_INJECT_FAULT=<method>:<scheme>[:<point>[:<how>]]`` (comma-separated for several)
makes the matching child die on purpose, for tests of this path: ``point`` ``start`` (model
loaded, nothing recorded) or ``after-first`` (after its first record; default); ``how`` ``abort``
(``os.abort``: SIGABRT, as a CUDA fault's abort; default) or ``exit139`` (``os._exit(139)``).
Children only: a run without isolation ignores it.
"""

from __future__ import annotations

import collections
import os
import pickle
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

INJECT_ENV = "QVLM_PERF_INJECT_FAULT"
CHILD_GRACE_S = 30.0  # a child may finish the batch it started before the budget's end
STDERR_TAIL = 40  # lines of a child's stderr kept for its failure records
ERROR_LINES = 4  # of which the error string quotes the last few
PROGRESS = re.compile(r"\d+%\||[\d.]+(it/s|s/it)\]")  # progress bars are not what went wrong


# ---------------------------------------------------------------------------- the child process

@dataclass
class ChildSpec:
    """Everything a child needs to run one variant of the parent's run."""

    model: str
    cfg: object  # PerfConfig (isolate off: the child runs in process)
    run_id: str
    command: str
    child: int
    variant: object  # cells.Variant
    scheme: str
    dtype: str  # the pass: fp16, bf16, ...
    load_dtype: str  # what the model is loaded in (the bf16 pass converts, as in one process)
    share: int
    budget: dict
    float_e2e: dict = field(default_factory=dict)  # dtype name -> the float engine's e2e error
    float_trained: dict = field(default_factory=dict)  # dtype name -> its trained-model exact record
    common_path: str | None = None  # the child writes its records' common fields here first


@dataclass
class ChildResult:
    returncode: int | None
    timed_out: bool
    wall_s: float
    stderr_tail: list[str]
    pid: int | None = None
    timeout_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def reason(self) -> str:
        """How the child ended, in words (exit status or signal, or the deadline)."""
        rc = self.returncode
        if self.timed_out:
            return (f"killed after {self.wall_s:.0f}s: past the time budget's end (+{CHILD_GRACE_S:.0f}s grace, "
                    f"deadline {self.timeout_s:.0f}s)")
        if rc is None:
            return "did not start"
        if rc < 0:
            try:
                name = signal.Signals(-rc).name
            except ValueError:
                name = f"signal {-rc}"
            return f"killed by {name} (exit {rc})"
        if rc > 128:
            try:
                name = f" (128 + {signal.Signals(rc - 128).name})"
            except ValueError:
                name = ""
            return f"exit status {rc}{name}"
        return f"exit status {rc}"


def _inject(spec: ChildSpec, point: str) -> None:
    for item in os.environ.get(INJECT_ENV, "").split(","):
        parts = [p.strip() for p in item.split(":")]
        if len(parts) < 2:
            continue
        at = parts[2] if len(parts) > 2 and parts[2] else "after-first"
        how = parts[3] if len(parts) > 3 and parts[3] else "abort"
        if parts[0] in (spec.variant.method, spec.variant.label) and parts[1] == spec.scheme and at == point:
            sys.stdout.flush()
            sys.stderr.write(f"[perf] {INJECT_ENV}: injected fault ({how}) in {spec.variant.label} "
                             f"{spec.scheme} at {point}\n")
            sys.stderr.flush()
            if how == "exit139":
                os._exit(139)
            os.abort()


def child_main(spec_path: str) -> int:
    """Run one variant of a parent's run in this (fresh) process; records go to the run's file."""
    import json

    from .benchmark import Budget, open_session
    from .states import DTYPE_NAMES, Case

    with open(spec_path, "rb") as f:
        spec: ChildSpec = pickle.load(f)
    names = {v: k for k, v in DTYPE_NAMES.items()}
    isolation = {"mode": "child", "child": spec.child, "pid": os.getpid()}
    session = open_session(spec.model, spec.cfg, run_id=spec.run_id, load_dtype=spec.load_dtype,
                           command=spec.command, extra_common={"isolation": isolation})
    isolation["load_s"] = round(session.load_s, 3)
    if spec.common_path:
        Path(spec.common_path).write_text(json.dumps(session.common, default=str))
    dtype = names[spec.dtype]
    session.to_dtype(dtype)
    runner = session.runner
    runner.float_e2e = {names[k]: v for k, v in spec.float_e2e.items()}
    runner.trained.float_trained = {names[k]: v for k, v in spec.float_trained.items()}
    _inject(spec, "start")
    written = []

    def after(rec):
        written.append(rec)
        if len(written) == 1:
            _inject(spec, "after-first")

    session.recorder.after_write = after
    runner.run_variant(Case(spec.variant, spec.scheme, dtype), Budget.restore(spec.budget), spec.share)
    return 0


# ---------------------------------------------------------------------------- the parent's side

def run_child_process(argv: list[str], *, timeout: float | None = None, log=print, env: dict | None = None,
                      tail: int = STDERR_TAIL) -> ChildResult:
    """Run ``argv``: its stdout lines go to ``log``, its stderr to ours, the last ``tail`` lines of
    stderr are kept; killed (SIGTERM, then SIGKILL) after ``timeout`` seconds."""
    env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
    t0 = time.time()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
                            errors="replace", bufsize=1)
    last: collections.deque = collections.deque(maxlen=tail)

    def pump_out():
        for line in proc.stdout:
            log(line.rstrip("\n"))

    def pump_err():
        for line in proc.stderr:
            sys.stderr.write(line)
            last.append(line.rstrip("\n"))

    threads = [threading.Thread(target=pump_out, daemon=True), threading.Thread(target=pump_err, daemon=True)]
    for t in threads:
        t.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    except BaseException:  # the parent is stopped: the child goes with it
        proc.kill()
        proc.wait()
        raise
    for t in threads:
        t.join(timeout=10)
    return ChildResult(proc.returncode, timed_out, time.time() - t0, list(last), proc.pid, timeout)


def child_env() -> dict:
    """Our environment, with this harness first on the child's path (not another checkout's)."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def failure_error(res: ChildResult, label: str, B: int) -> str:
    """The error of a cell a dead child did not record: the exit and its stderr's last lines."""
    lines = [x for x in (line.split("\r")[-1].strip() for line in res.stderr_tail)
             if x and not PROGRESS.search(x)][-ERROR_LINES:]
    err = f"child process of {label} {res.reason()} before recording batch {B}"
    if lines:
        err += "; stderr: " + " // ".join(lines)
    return err[:1200]


COMMON_KEYS = ("suite", "model", "task", "metric", "value", "stderr", "n_empty", "n_unparsed", "device", "card",
               "driver", "torch", "copy_bandwidth_gbs", "versions", "git", "seed", "run_id", "workload",
               "model_path", "objective", "layouts", "command")


class IsolatedRun:
    """The parent of an isolated run: one child per variant, failures recorded, the baseline's
    gate figures handed to the variants after it."""

    def __init__(self, model: str, cfg, *, log=print):
        from .benchmark import new_run_id

        self.model, self.log = model, log
        self.cfg = replace(cfg, isolate="off", leaderboard=False)  # what each child runs
        self.parent_cfg = cfg
        self.run_id = new_run_id()
        self.path = Path(cfg.out) / "records.jsonl"
        self.command = " ".join(shlex.quote(a) for a in sys.argv)
        self.children = 0
        self.load_s: float | None = None  # the last child's model load time
        self.common: dict | None = None  # the records' common fields, from the first child that had them
        self.float_e2e: dict = {}
        self.float_trained: dict = {}

    # -- records ---------------------------------------------------------------------------------

    def _records_of(self, child: int) -> list[dict]:
        from .table import load_records

        if not self.path.exists():
            return []
        return [r for r in load_records(self.path) if r.get("run_id") == self.run_id
                and (r.get("isolation") or {}).get("child") == child]

    def _fallback_common(self) -> dict:
        """Common fields when no child got as far as writing them (the first child died loading)."""
        from ..records import git_describe
        from .measure import device_info

        info = device_info(self.cfg.device)  # initialises CUDA here: only when no child could say
        return {"suite": self.cfg.suite, "model": self.model, "task": None, "metric": "perf", "value": None,
                "stderr": None, "n_empty": None, "n_unparsed": None, "device": info.get("card"),
                "card": info.get("card"), "driver": info.get("driver"), "torch": info["torch"],
                "copy_bandwidth_gbs": None, "versions": info, "git": git_describe(), "seed": self.cfg.seed,
                "run_id": self.run_id, "workload": {}, "model_path": None, "objective": self.cfg.objective,
                "layouts": self.cfg.layouts, "command": self.command}

    def _write_failed(self, case, batches, common: dict, errors: dict, isolation: dict) -> list[dict]:
        from ..quant.config import parse_scheme
        from .benchmark import PerfRecorder

        case.qcfg = parse_scheme(case.scheme, **({} if case.is_reference else self.cfg.overrides))
        rec = PerfRecorder(self.path, dict(common, isolation=isolation), overrides=self.cfg.overrides,
                           reps=self.cfg.reps)
        return [rec.write(case, B, **errors[B]) for B in batches]

    # -- one child -------------------------------------------------------------------------------

    def run_variant(self, var, scheme: str, dtype: torch.dtype, load_dtype: str, share: int, budget,
                    tmp: Path) -> list[dict]:
        from .states import DTYPE_NAMES, Case

        cfg, log = self.cfg, self.log
        case = Case(var, scheme, dtype)
        child = self.children
        self.children += 1
        remaining = budget.remaining()
        if not budget.allow(share, True) or (remaining is not None and self.load_s is not None
                                              and remaining < self.load_s):
            why = f"not run: time budget of {budget.seconds:.0f}s spent"
            if budget.allow(share, True):
                why += f" (a fresh process needs ~{self.load_s:.0f}s to load the model; {remaining:.0f}s left)"
            log(f"[perf] {case.label}: {why}")
            common = self.common or self._fallback_common()
            return self._write_failed(case, cfg.batches, common, {B: {"error": why} for B in cfg.batches},
                                      {"mode": "parent", "child": None})
        spec = ChildSpec(self.model, cfg, self.run_id, self.command, child, var, scheme,
                         DTYPE_NAMES[dtype], load_dtype, share, budget.state(),
                         float_e2e=dict(self.float_e2e), float_trained=dict(self.float_trained),
                         common_path=str(tmp / f"common-{child}.json"))
        spec_path = tmp / f"child-{child}.pkl"
        with open(spec_path, "wb") as f:
            pickle.dump(spec, f)
        timeout = None if remaining is None else max(remaining, 0.0) + CHILD_GRACE_S
        log(f"[perf] {case.label}: child process {child} (deadline "
            f"{'none' if timeout is None else f'{timeout:.0f}s'})")
        res = run_child_process([sys.executable, "-m", "harness.perf.isolate", str(spec_path)],
                                timeout=timeout, log=log, env=child_env())
        common_file = Path(spec.common_path)
        child_common = None
        if common_file.exists():
            import json

            child_common = json.loads(common_file.read_text())
            self.common = self.common or {k: child_common.get(k) for k in COMMON_KEYS}
        load_s = ((child_common or {}).get("isolation") or {}).get("load_s")
        if load_s is not None:
            self.load_s = load_s
        recs = self._records_of(child)
        done = {r.get("batch_size") for r in recs}
        missing = [B for B in cfg.batches if B not in done]
        log(f"[perf] {case.label}: child process {child} {'exited' if res.ok else res.reason()} after "
            f"{res.wall_s:.0f}s (model load {'?' if load_s is None else f'{load_s:.1f}s'}); "
            f"{len(recs)} of {len(cfg.batches)} batch sizes recorded")
        if missing:
            isolation = {"mode": "child", "child": child, "pid": res.pid, "load_s": load_s,
                         "returncode": res.returncode, "timed_out": res.timed_out,
                         "stderr_tail": res.stderr_tail}
            if res.ok:
                errors = {B: {"error": f"child process of {case.label} exited 0 without recording batch {B}"}
                          for B in missing}
            else:
                errors = {B: {"error": failure_error(res, case.label, B)} for B in missing}
            for B in missing:
                log(f"[perf] B={B} {case.label}: FAILED: {errors[B]['error']}")
            recs += self._write_failed(case, missing, self.common or self._fallback_common(), errors, isolation)
        order = {B: i for i, B in enumerate(cfg.batches)}
        recs.sort(key=lambda r: order.get(r.get("batch_size"), len(order)))
        if case.is_reference:
            self._keep_baseline(recs, DTYPE_NAMES[dtype])
        return recs

    def _keep_baseline(self, recs: list[dict], dtype: str) -> None:
        """The float engine's gate figures the other variants' gates compare against (as in one
        process: the last batch size's end-to-end error; the trained-model record of the first)."""
        for r in recs:
            g = r.get("gate") or {}
            if g.get("e2e_rel_logit_err") is not None:
                self.float_e2e[dtype] = g["e2e_rel_logit_err"]
            exact = (g.get("trained") or {}).get("exact")
            if exact is not None and dtype not in self.float_trained:
                self.float_trained[dtype] = exact

    # -- the run ---------------------------------------------------------------------------------

    def run(self) -> list[dict]:
        from ..models.loading import auto_dtype
        from .benchmark import Budget, finish, run_pairs, wants_bf16
        from .states import DTYPE_NAMES

        cfg, log = self.parent_cfg, self.log
        t_start = time.time()
        cuda = str(cfg.device).startswith("cuda")
        auto = cfg.dtype == "auto"
        first = auto_dtype(cfg.device) if auto else cfg.dtype
        names = {v: k for k, v in DTYPE_NAMES.items()}
        pairs = run_pairs(cfg)
        budget = Budget(cfg.time_budget_s, len(pairs) + (1 if auto and cuda else 0))
        log(f"[perf] {self.model}: run {self.run_id}, {len(pairs)} variants, each in a child process "
            f"(--isolate {cfg.isolate})")
        records: list[dict] = []
        wanted = []
        with tempfile.TemporaryDirectory(prefix="qvlm-perf-isolate-") as tmp:
            for i, (var, s) in enumerate(pairs):
                recs = self.run_variant(var, s, names[first], first, i, budget, Path(tmp))
                records += recs
                if i == 0:
                    budget.reference_done()
                if auto and cuda and not var.reference and wants_bf16(selection_of(recs)):
                    wanted.append((var, s))
            if wanted:
                log(f"[perf] bf16 pass (a kernel that needs bf16 wins there): {[(v.label, s) for v, s in wanted]}")
                for var, s in [pairs[0]] + wanted:  # the bf16 baseline first, with every batch size
                    share = 0 if var.reference else budget.shares - 1
                    records += self.run_variant(var, s, torch.bfloat16, first, share, budget, Path(tmp))
        finish(cfg, records, log=log, t_start=t_start)
        return records


def selection_of(recs: list[dict]) -> list:
    """The kernel selection of a variant's first batch size, back from its record."""
    from ..kernels.select import KernelRecord

    for r in recs:
        sel = (r.get("kernels") or {}).get("selection")
        if sel:
            return [KernelRecord(**{**d, "shape": tuple(d["shape"])}) for d in sel]
        break  # the first batch size only, as in one process
    return []


def run_isolated(model: str, cfg, *, log=print) -> list[dict]:
    """``run_perf`` with every variant in a child process of its own (module doc)."""
    return IsolatedRun(model, cfg, log=log).run()


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1]))
