"""A suite's ``deterministic: true``: run-to-run identical results on a GPU, at a cost.

On a CPU the project is deterministic already (float64, portable reductions, Q-VLM's encoder
single-threaded: docs/design.md). On a GPU, by default, two runs of one suite may differ in a few
generations (cuBLAS and cuDNN pick algorithms and reduction orders per call; some backward kernels
accumulate with atomics). ``deterministic: true`` makes every process that computes cells, before
it computes anything:

* ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (cuBLAS's deterministic workspace; read once per process, at
  its first cuBLAS call: so the worker sets it first thing, and the Ray executor starts its
  workers with it in their environment);
* ``torch.use_deterministic_algorithms(True)``: PyTorch takes its deterministic implementation of
  every op that has one (``index_add_``, ``scatter_add_``, embedding backward, ...) and raises for
  one that has none; ``explain`` turns that error into one naming the op and the suite setting;
* ``torch.backends.cudnn.deterministic = True``, ``torch.backends.cudnn.benchmark = False``.

The project's own code that could choose a nondeterministic path asks
``torch.are_deterministic_algorithms_enabled()`` (the kernels: a fixed Triton configuration
instead of the fastest measured one, no gemlite kernels, which reduce with atomics).

This module imports nothing of the harness: the worker, the Ray executor and the tests use it.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("qvlm_bench")

CUBLAS_ENV = "CUBLAS_WORKSPACE_CONFIG"
CUBLAS_CONFIG = ":4096:8"
# both values cuBLAS documents as deterministic (the second uses less memory, runs slower)
CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")
NONDETERMINISTIC_MARK = "does not have a deterministic implementation"


def environment(deterministic: bool) -> dict[str, str]:
    """Environment variables a process that computes cells must start with (for Ray workers)."""
    if not deterministic:
        return {}
    value = os.environ.get(CUBLAS_ENV)
    return {CUBLAS_ENV: value if value in CUBLAS_DETERMINISTIC else CUBLAS_CONFIG}


def enable() -> dict:
    """Put this process in deterministic mode (idempotent); returns ``settings()``.

    If CUDA was initialized before the cuBLAS variable was set here, cuBLAS may already have made
    its workspace (then its reductions are not guaranteed deterministic): that is a warning naming
    the fix, since nothing can undo it in this process."""
    if os.environ.get(CUBLAS_ENV) not in CUBLAS_DETERMINISTIC:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            log.warning("deterministic: CUDA was initialized in this process (pid %d) before %s was set; "
                        "cuBLAS may have chosen its workspace already, so its results may still vary: run the "
                        "suite in a fresh process (qvlm-bench run), or export %s=%s before starting Python",
                        os.getpid(), CUBLAS_ENV, CUBLAS_ENV, CUBLAS_CONFIG)
        os.environ[CUBLAS_ENV] = CUBLAS_CONFIG
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    return settings()


def settings() -> dict:
    """What this process runs under (asserted by the tests, reported by Ray workers)."""
    return {
        "pid": os.getpid(),
        "use_deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        CUBLAS_ENV: os.environ.get(CUBLAS_ENV),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
    }


def in_effect(s: dict | None = None) -> bool:
    """Whether ``s`` (default: this process's ``settings()``) is the deterministic mode."""
    s = settings() if s is None else s
    return bool(s["use_deterministic_algorithms"] and not s["warn_only"] and s[CUBLAS_ENV] in CUBLAS_DETERMINISTIC
                and s["cudnn_deterministic"] and not s["cudnn_benchmark"])


def explain(exc: BaseException) -> str | None:
    """The message for an error PyTorch raised because an op has no deterministic implementation
    (None for any other error): the op as PyTorch names it, and the suite setting that asked."""
    text = str(exc)
    if NONDETERMINISTIC_MARK not in text:
        return None
    op = text.split(NONDETERMINISTIC_MARK)[0].strip() or "an operation"
    return (f"{op} has no deterministic implementation, and the suite sets `deterministic: true` "
            f"(torch.use_deterministic_algorithms(True)); run this cell with `deterministic: false`, or "
            f"change the code that calls {op.split()[0]} (PyTorch: {text.splitlines()[0]})")
