"""Executing one group of cells (one quantization state, several tasks) and making its records.

The same code runs in the serial runner and in every distributed worker: load the model (kept
loaded while consecutive groups use it), encode the shared calibration set, get the state (cached,
or made by ``prepare.prepare_state``: quantize, check, finalize — the path ``qvlm-bench perf``
takes too), apply it on the model's device, evaluate each task and turn each result into a record.
Records are returned, not written: the caller (one process) appends them, so records.jsonl has a single writer.
"""

from __future__ import annotations

import logging
import shutil
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from . import determinism
from .cells import Cell, CellGroup, digest
from .suite_config import Suite, TaskSpec
from .prepare import prepare_state, reset_peak
from .quant.finalize import StateError, validate_state
from .quant.simulated import apply_state
from .quant.state import QuantState
from .records import git_describe, new_record, versions
from .samples import samples_path, write_samples

log = logging.getLogger("qvlm_bench")

CACHE_RESERVE_BYTES = 1 << 30  # left free on the cache's disk: the records must always fit


def state_nbytes(state: QuantState) -> int:
    """Bytes of the state's tensors (what ``QuantState.save`` writes, less its JSON)."""
    tensors = [getattr(lq, k) for lq in state.linears.values() for k in ("codes", "scale", "zero", "weight")]
    tensors += [t for lq in state.linears.values() if lq.act is not None for t in (lq.act.scale, lq.act.zero)]
    tensors += list(state.float_params.values())
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def cache_state(state: QuantState, path) -> bool:
    """Cache ``state`` for later runs unless that would leave less than ``CACHE_RESERVE_BYTES`` free
    or the write fails: the cache saves time, a full disk would lose records (7B states are a few
    GB each; two fresh 9-group runs once filled an H200 machine's disk). Never fails the cell."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        need = state_nbytes(state) + CACHE_RESERVE_BYTES
        free = shutil.disk_usage(path.parent).free
        if free < need:
            log.warning("not caching the quantization state in %s: %.1f GB free, %.1f GB needed (state + "
                        "%.0f GB reserve); free space there or point the suite's output elsewhere",
                        path.parent, free / 1e9, need / 1e9, CACHE_RESERVE_BYTES / 1e9)
            return False
        state.save(path)
        return True
    except OSError as exc:  # save() removed its partial folder
        log.warning("could not cache the quantization state in %s (%s); the cell goes on without it",
                    path, exc)
        return False


def check_loaded_state(lm, state: QuantState, cell: Cell) -> None:
    """The checks a fresh state passes (``finalize.validate_state``) and its stored proof recomputed:
    a cached state whose bytes verify but whose content is wrong (an older bug, a hand edit) must
    not become a number. Raises ``StateError``."""
    validate_state(lm.model, state, cell.qcfg, quantizes=cell.variant.cls.quantizes)
    stored = state.meta.get("proof")
    fresh = state.proof(device=lm.device)
    if not isinstance(stored, dict) or any(stored.get(k) != v for k, v in fresh.items()):
        raise StateError(f"its stored proof {stored} differs from the proof of its content {fresh}")


@dataclass
class OpenGroup:
    """A group whose state is applied to the loaded model (or, with ``failed``, could not be)."""

    group: CellGroup
    lm: Any = None
    state: QuantState | None = None
    cached: bool = False
    handle: Any = None
    timings: dict[str, float] = field(default_factory=dict)
    failed: list[dict] | None = None

    def close(self) -> None:
        """Give the model back its float weights."""
        if self.handle is not None:
            self.handle.restore()
            self.handle = None


def task_spec(task: TaskSpec, suite: Suite):
    """What lm-eval loads for a task: its name, or a config pointing at local data."""
    from tasks.sources import task_spec as spec

    return spec(task.name, task.data or suite.data_dir, include_paths=suite.include_paths,
                **(task.options or {}))


def reset_counters(handle, device: str) -> None:
    """Before an evaluation: zero the activation quantizers' call counters and the GPU's peak
    memory (the record reports the quantizers that fired and the peak during it)."""
    for m in handle.fake_linears().values():
        m.act_calls = 0
    reset_peak(device)


class GroupWorker:
    """Runs groups of one suite on one device; keeps the last model and calibration sets."""

    def __init__(self, suite: Suite, device: str, *, show_progress: bool = False):
        self.suite = suite
        self.device = device
        self.out = suite.output_dir
        self.cache_dir = self.out / "cache" / "states"
        self.show_progress = show_progress
        self._lm = None
        self._lm_key: tuple | None = None
        self._calib: dict[str, object] = {}
        # before anything runs on the device (this process's first cuBLAS call must see the
        # variable): in the serial runner's process and in every Ray worker alike
        self.determinism = determinism.enable() if suite.deterministic else None

    # ---- resources kept between groups ---------------------------------------------------

    def model(self, cell: Cell):
        key = (cell.model.name, cell.dtype)
        if self._lm_key != key:
            from .models.loading import load_model

            self._lm = self._lm_key = None
            self._calib.clear()
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
            self._lm = load_model(cell.model.name, dtype=cell.dtype, device=self.device)
            self._lm_key = key
        return self._lm

    def calibration(self, lm, spec: dict):
        key = digest(spec)
        if key not in self._calib:
            from .prepare import suite_calibration

            self._calib[key] = suite_calibration(lm, self.suite, spec)
        return self._calib[key]

    # ---- one group ---------------------------------------------------------------------

    def state(self, lm, cell: Cell, timings: dict) -> tuple[QuantState, bool]:
        """The group's finalized state: from the cache, or quantized now (and cached)."""
        path = self.cache_dir / cell.state_key
        if (path / "state.json").exists():
            try:  # a cached state is trusted only as far as a fresh one: checksum, checks, proof
                state = QuantState.load(path)
                check_loaded_state(lm, state, cell)
                return state, True
            except Exception as exc:
                log.warning("ignoring cached state %s (%s); quantizing it again", path, exc)
        t0 = time.perf_counter()
        calib = self.calibration(lm, cell.calibration) if cell.calibration is not None else None
        timings["calibrate_s"] = time.perf_counter() - t0
        state = prepare_state(lm, cell.variant, cell.qcfg, calib, cell.act_ranges, seed=self.suite.seed,
                              timings=timings)
        cache_state(state, path)
        return state, False

    def open_group(self, group: CellGroup) -> "OpenGroup":
        """Load the model, get the group's state (cached or quantized now) and apply it.

        On failure the result holds one failed record per cell and nothing is applied. Split from
        ``run_group`` so a distributed worker can keep a group open across calls (one cell, or
        one shard of a cell, per call) with the very same steps as the serial path.
        """
        head = group.head
        timings: dict[str, float] = {}
        try:
            t0 = time.perf_counter()
            lm = self.model(head)
            timings["load_s"] = time.perf_counter() - t0
        except Exception as exc:
            return OpenGroup(group, failed=[self.failed(c, exc, "load") for c in group.cells])
        try:
            state, cached = self.state(lm, head, timings)
        except Exception as exc:
            return OpenGroup(group, failed=[self.failed(c, exc, "quantize") for c in group.cells])
        t0 = time.perf_counter()
        try:
            handle = apply_state(lm.model, state, device=lm.device)
        except Exception as exc:
            return OpenGroup(group, failed=[self.failed(c, exc, "apply", state) for c in group.cells])
        timings["apply_s"] = time.perf_counter() - t0
        return OpenGroup(group, lm=lm, state=state, cached=cached, handle=handle, timings=timings)

    def evaluate_cell(self, opened: "OpenGroup", cell: Cell) -> list[dict]:
        """The records of one cell of an open group (a failed record if evaluation raised)."""
        return self._evaluate(opened.lm, cell, opened.state, opened.cached, opened.handle,
                              dict(opened.timings))

    def run_group(self, group: CellGroup) -> Iterator[list[dict]]:
        """Yield, per cell of ``group`` in order, the records it produced (failed ones too)."""
        opened = self.open_group(group)
        if opened.failed is not None:
            for rec in opened.failed:
                yield [rec]
            return
        try:
            for cell in group.cells:
                yield self.evaluate_cell(opened, cell)
        finally:
            opened.close()

    def _evaluate(self, lm, cell: Cell, state: QuantState, cached: bool, handle, timings: dict) -> list[dict]:
        from .evaluate import evaluate_tasks

        reset_counters(handle, self.device)
        t0 = time.perf_counter()
        try:
            results = evaluate_tasks(lm, [task_spec(cell.task, self.suite)], limit=self.suite.limit,
                                     batch_size=self.suite.batch_size,
                                     include_paths=self.suite.include_paths, seed=self.suite.seed,
                                     show_progress=self.show_progress)
            if not results:
                raise RuntimeError(f"task {cell.task.name} produced no `accuracy` metric")
        except Exception as exc:
            return [self.failed(cell, exc, "evaluate", state)]
        timings["eval_s"] = time.perf_counter() - t0
        records = []
        for res in results:
            t0 = time.perf_counter()
            samples = write_samples(samples_path(self.out, cell.key, res.task), res.samples, res.task)
            timings["record_s"] = time.perf_counter() - t0
            records.append(self.ok_record(cell, state, cached, handle, res, timings,
                                          str(samples.relative_to(self.out))))
        return records

    def ok_record(self, cell: Cell, state: QuantState, cached: bool, handle, res, timings: dict,
                  samples_file: str | None) -> dict:
        """The record of a finished evaluation ``res`` (a ``TaskResult``) of ``cell``."""
        peak = None
        if self.device.startswith("cuda"):
            peak = {"quantize": state.meta.get("peak_gib_quantize"),
                    "eval": round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)}
        proof = dict(state.meta.get("proof") or state.proof())
        proof["act_quantizers_fired"] = handle.act_quantizers_fired()
        meta = {k: v for k, v in state.meta.items()
                if k not in ("options", "proof", "act_ranges", "peak_gib_quantize")}
        return new_record(
            **self.base(cell), metric=res.metric, value=res.value, stderr=res.stderr, n=res.n,
            n_empty=res.n_empty, n_unparsed=res.n_unparsed, latency=None, memory=None,
            quantize_s=state.meta.get("quantize_s"), eval_s=timings["eval_s"], status="ok",
            error=None, proof=proof, state_cached=cached, method_meta=meta,
            act_ranges=state.meta.get("act_ranges"),
            timings={k: round(v, 4) for k, v in timings.items()}, peak_gib=peak,
            samples_file=samples_file, cluster_unit=getattr(res, "cluster_unit", "question"),
        )

    # ---- records -------------------------------------------------------------------------

    def device_name(self) -> str:
        if self.device.startswith("cuda"):
            return torch.cuda.get_device_name(torch.device(self.device))
        return f"cpu ({torch.get_num_threads()} threads)"

    def base(self, cell: Cell) -> dict:
        v = cell.variant
        return dict(
            suite=self.suite.name, model=cell.model.name, method=v.method,
            variant=f"{cell.dtype} (reference)" if v.reference else v.label, reference=v.reference,
            control=not v.reference and not v.cls.quantizes,
            scheme=cell.scheme, quant_config=cell.qcfg.to_dict(), task=cell.task.name,
            device=self.device_name(), dtype=cell.dtype, seed=self.suite.seed, versions=versions(),
            git=git_describe(), config_hash=cell.key, state_key=cell.state_key,
            method_options=v.options, clip=v.act_clip_search, method_code=cell.code["method"],
            engine_code=cell.code["engine"], calibration=cell.calibration,
            limit=self.suite.limit, batch_size=self.suite.batch_size,
            kernel="simulated" if v.cls.quantizes else cell.dtype,
            **({"deterministic": True} if self.suite.deterministic else {}),
        )

    def failed(self, cell: Cell, exc: BaseException, stage: str, state: QuantState | None = None) -> dict:
        why = determinism.explain(exc)  # an op with no deterministic implementation, named
        error = f"{stage}: {type(exc).__name__}: {why or exc}"
        log.error("cell %s failed during %s: %s", cell.describe(), stage, why or exc)
        proof = None if state is None else (state.meta.get("proof") or None)
        return new_record(**self.base(cell), status="failed", metric="accuracy", error=error,
                          traceback=traceback.format_exc(limit=8), proof=proof,
                          quantize_s=None if state is None else state.meta.get("quantize_s"))
