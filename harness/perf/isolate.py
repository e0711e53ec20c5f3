"""Each variant of a perf run in a fresh process (``qvlm-bench perf --isolate``): a CUDA fault costs one variant.

A CUDA illegal memory access poisons the process's CUDA context: after it every CUDA call of that
process fails, so in one process a fault of one variant failed every later cell of the run. With
isolation the parent process never touches the device: it runs the float baseline, then each
(method, scheme) with all its batch sizes, each in a child process
(``python -m harness.perf.command perf --child SPEC``: ``benchmark.run_child``) that loads the
model, opens its own ``PerfSession``
with the parent's ``run_id`` (so ``table.py`` pairs every row with the baseline of the same run,
batch and dtype) and appends its records to the same ``records.jsonl`` through the one records
writer. The parent holds the results folder's lock for the whole run; the children, part of that
run, take none. The parent's side is ``benchmark.IsolatedRun``; this module holds the process
machinery below it (the spec, running a child and reading its end, the injected faults).

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
(``os.abort``: SIGABRT, as a CUDA fault's abort; default), ``exit139`` (``os._exit(139)``) or
``cuda-assert`` (a real CUDA fault: an out-of-range gather trips a device-side assert, which
poisons the child's CUDA context as an illegal memory access does; CUDA devices only).
Children only: a run without isolation ignores it.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

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


def inject(spec: ChildSpec, point: str) -> None:
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
            if how == "cuda-assert":
                cuda_fault()
            os.abort()


def cuda_fault() -> None:
    """Trip a device-side assert (a sticky CUDA error: every later CUDA call of the process fails)."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(f"{INJECT_ENV}: cuda-assert needs a CUDA device")
    x = torch.zeros(4, device="cuda")
    x[torch.tensor([1 << 30], device="cuda")].sum().item()  # out of range: the assert fires here
    torch.cuda.synchronize()


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


def selection_of(recs: list[dict], folder: str | Path, log=print) -> list:
    """The kernel selection of a variant's first batch size, back from its record (its detail
    sidecar in ``folder``, the records file's folder: ``detail.load_detail``). The run can do
    without it (no bf16 pass for the variant): a missing or damaged sidecar is logged as a note."""
    from ..kernels.select import KernelRecord
    from .detail import load_detail

    for r in recs:
        r = load_detail(r, folder, missing_ok=True, note=lambda msg: log(f"[perf] {msg}; the bf16 pass is "
                                                                         "not considered for this variant"))
        sel = (r.get("kernels") or {}).get("selection")
        if sel:
            return [KernelRecord(**{**d, "shape": tuple(d["shape"])}) for d in sel]
        break  # the first batch size only, as in one process
    return []
