"""Run a suite: for each model, method and scheme, quantize once and evaluate every task.

Resumable by construction: a cell whose record is already ``ok`` is skipped, states are cached on
disk under a hash of what determines them, and each record is appended the moment its cell
finishes. A cell that raises is recorded ``failed`` with its error and the suite goes on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .config import MethodSpec, ModelSpec, Suite, TaskSpec
from .models.loading import model_fingerprint
from .quant.config import QuantConfig
from .quant.simulated import apply_state
from .quant.state import QuantState
from .records import append_record, git_describe, new_record, read_records, versions, write_jsonl
from .registry import get_method, method_code_digest

log = logging.getLogger("qvlm_bench")

FLOAT_METHODS = ("fp16",)  # run once per model, at w16a16, whatever the suite's schemes
DEFAULT_CALIBRATION = {"split": "train", "n": 64, "batch_size": 8}


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was requested but no CUDA GPU is visible; use --device cpu")
    return device


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Cell:
    model: ModelSpec
    method: MethodSpec
    qcfg: QuantConfig
    task: TaskSpec

    @property
    def scheme(self) -> str:
        return self.qcfg.scheme


@dataclass
class RunSummary:
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    records: list[dict] = field(default_factory=list)


def _task_spec(task: TaskSpec, suite: Suite):
    """What lm-eval loads for a task: its name, or a config pointing at local data."""
    data = task.data or suite.data_dir
    try:
        from tasks.sources import task_spec
    except ImportError:
        return task.name
    return task_spec(task.name, data, **(task.options or {}))


def _data_version(task: str) -> str | None:
    try:
        from tasks.sources import data_version
    except ImportError:
        return None
    return data_version(task)


def _resolved_options(cell: Cell) -> dict:
    """The method's options with its defaults filled in: a changed default recomputes the cell."""
    try:
        defaults = get_method(cell.method.name).defaults
    except Exception:  # unknown method: the cell fails and is recorded as such
        defaults = {}
    return {**defaults, **(cell.method.options or {})}


def cell_hash(suite: Suite, cell: Cell, calib_spec: dict | None) -> str:
    """What determines a cell's result; a record with the same hash need not be recomputed.

    The model's weights (fingerprint), the task's data version, the method's resolved options
    (defaults included) and its source code are part of it: a retrained model, regenerated
    synthetic data, a changed default or an edited method recomputes the cells concerned instead
    of reusing stale records.
    """
    return _digest({
        "model": cell.model.name, "weights": model_fingerprint(cell.model.name),
        "data_version": _data_version(cell.task.name), "dtype": cell.model.dtype or suite.dtype,
        "method": cell.method.name, "options": _resolved_options(cell),
        "code": method_code_digest(cell.method.name),
        "quant": cell.qcfg.to_dict(), "task": cell.task.name, "data": cell.task.data or suite.data_dir,
        "task_options": cell.task.options, "limit": suite.limit, "seed": suite.seed,
        "calibration": calib_spec,
    })


class SuiteRunner:
    def __init__(self, suite: Suite, *, show_progress: bool = True,
                 on_record: Callable[[dict], None] | None = None):
        self.suite = suite
        self.out = suite.output_dir
        self.records_path = self.out / "records.jsonl"
        self.samples_dir = self.out / "samples"
        self.cache_dir = self.out / "cache" / "states"
        self.show_progress = show_progress
        self.on_record = on_record
        self.device = resolve_device(suite.device)
        torch.set_num_threads(suite.threads)

    # ---- planning ---------------------------------------------------------------------------

    def cells(self) -> list[Cell]:
        out = []
        for model in self.suite.models:
            for method in self.suite.methods:
                schemes = [QuantConfig()] if method.name in FLOAT_METHODS else self.suite.schemes
                for qcfg in schemes:
                    for task in self.suite.tasks:
                        out.append(Cell(model, method, qcfg, task))
        return out

    def calibration_spec(self, cell: Cell) -> dict | None:
        if not get_method(cell.method.name).calibrates(cell.qcfg):
            return None
        spec = {**DEFAULT_CALIBRATION, "seed": self.suite.seed, **self.suite.calibration}
        if not spec.get("task"):
            spec["task"] = self.suite.tasks[0].name
        version = _data_version(spec["task"])
        if version is not None:  # other calibration rows under another generator version
            spec["data_version"] = version
        return spec

    def done_hashes(self) -> set[str]:
        return {r["config_hash"] for r in read_records(self.records_path) if r.get("status") == "ok"}

    # ---- execution --------------------------------------------------------------------------

    def run(self) -> RunSummary:
        from tqdm.auto import tqdm

        summary = RunSummary()
        done = self.done_hashes()
        cells = self.cells()
        pending = [c for c in cells if cell_hash(self.suite, c, self.calibration_spec(c)) not in done]
        summary.skipped = len(cells) - len(pending)
        if not pending:
            log.info("all %d cells already recorded in %s", len(cells), self.records_path)
            return summary
        bar = tqdm(total=len(pending), desc=f"suite {self.suite.name}", unit="cell",
                   disable=not self.show_progress)
        for model_spec in self.suite.models:
            model_cells = [c for c in pending if c.model is model_spec]
            if not model_cells:
                continue
            try:
                lm = self._load_model(model_spec)
            except Exception as exc:  # the model never loaded: every cell of it fails
                for c in model_cells:
                    self._emit(summary, self._failed(c, exc, stage="load"))
                    bar.update(1)
                continue
            calib_cache: dict[str, Any] = {}
            groups: dict[tuple, list[Cell]] = {}
            for c in model_cells:
                groups.setdefault((c.method.name, json.dumps(c.method.options, sort_keys=True),
                                   c.qcfg.digest()), []).append(c)
            for group in groups.values():
                self._run_group(lm, group, calib_cache, summary, bar)
            del lm
        bar.close()
        return summary

    def _load_model(self, spec: ModelSpec):
        from .models.loading import load_model

        dtype = spec.dtype or self.suite.dtype
        return load_model(spec.name, dtype=None if dtype == "auto" else dtype, device=self.device)

    def _calibration(self, lm, spec: dict | None, cache: dict):
        if spec is None:
            return None
        key = _digest(spec)
        if key not in cache:
            from .calibration import encode_pairs
            from .task_data import task_pairs

            task = next((t for t in self.suite.tasks if t.name == spec["task"]), TaskSpec(spec["task"]))
            chosen = task_pairs(task.name, spec["split"], task.data or self.suite.data_dir,
                                task.options, self.suite.include_paths, n=int(spec["n"]),
                                seed=int(spec["seed"]))
            cache[key] = encode_pairs(lm, chosen, int(spec["batch_size"]), source=spec)
        return cache[key]

    def _quantize(self, lm, cell: Cell, calib_spec, calib_cache) -> tuple[QuantState, float, bool]:
        method = get_method(cell.method.name)(**(cell.method.options or {}))
        key = _digest({"model": lm.path, "weights": model_fingerprint(cell.model.name), "dtype": str(lm.dtype),
                       "method": cell.method.name, "code": method_code_digest(cell.method.name),
                       "options": method.options, "quant": cell.qcfg.to_dict(),
                       "calibration": calib_spec, "seed": self.suite.seed})
        path = self.cache_dir / key
        if (path / "state.json").exists():
            try:
                state = QuantState.load(path)
                return state, float(state.meta.get("quantize_s", 0.0)), True
            except Exception:  # a corrupt cache entry is recomputed, never trusted
                log.warning("ignoring unreadable cached state %s", path)
        calib = self._calibration(lm, calib_spec, calib_cache)
        torch.manual_seed(self.suite.seed)
        t0 = time.perf_counter()
        state = method.quantize(lm, cell.qcfg, calib)
        elapsed = time.perf_counter() - t0
        state.meta.setdefault("quantize_s", elapsed)
        state.meta.setdefault("options", method.options)
        if calib is not None:
            state.meta.setdefault("calibration", {**calib.source, "digest": calib.digest()})
        state.save(path)
        return state, elapsed, False

    def _run_group(self, lm, cells: list[Cell], calib_cache, summary: RunSummary, bar) -> None:
        head = cells[0]
        calib_spec = self.calibration_spec(head)
        try:
            state, quantize_s, cached = self._quantize(lm, head, calib_spec, calib_cache)
        except Exception as exc:
            for c in cells:
                self._emit(summary, self._failed(c, exc, stage="quantize", calib_spec=calib_spec))
                bar.update(1)
            return
        handle = apply_state(lm.model, state)
        try:
            for cell in cells:
                bar.set_postfix_str(f"{cell.model.name} {cell.method.name} {cell.scheme} {cell.task.name}")
                for m in handle.fake_linears().values():
                    m.act_calls = 0
                t0 = time.perf_counter()
                try:
                    from .evaluate import evaluate_tasks

                    results = evaluate_tasks(lm, [_task_spec(cell.task, self.suite)],
                                             limit=self.suite.limit, batch_size=self.suite.batch_size,
                                             include_paths=self.suite.include_paths,
                                             seed=self.suite.seed, show_progress=self.show_progress)
                    if not results:
                        raise RuntimeError(f"task {cell.task.name} produced no `accuracy` metric")
                except Exception as exc:
                    self._emit(summary, self._failed(cell, exc, stage="evaluate", calib_spec=calib_spec,
                                                     state=state, quantize_s=quantize_s))
                    bar.update(1)
                    continue
                eval_s = time.perf_counter() - t0
                for res in results:
                    rec = self._record(cell, state, calib_spec, quantize_s, eval_s, cached, res, handle)
                    self._emit(summary, rec)
                bar.update(1)
        finally:
            handle.restore()

    # ---- records ----------------------------------------------------------------------------

    def _base(self, cell: Cell, calib_spec) -> dict:
        return dict(
            suite=self.suite.name, model=cell.model.name, method=cell.method.name,
            scheme=cell.scheme, quant_config=cell.qcfg.to_dict(), task=cell.task.name,
            device=self._device_name(), seed=self.suite.seed, versions=versions(),
            git=git_describe(), config_hash=cell_hash(self.suite, cell, calib_spec),
            method_options=_resolved_options(cell), method_code=method_code_digest(cell.method.name),
            calibration=calib_spec, limit=self.suite.limit, batch_size=self.suite.batch_size,
            kernel="simulated" if cell.method.name not in FLOAT_METHODS else self.float_kernel,
        )

    @property
    def float_kernel(self) -> str:
        """The float reference runs the model's own dtype: "fp16", "bf16" or "fp32"."""
        dtype = self.suite.dtype if self.suite.dtype != "auto" else ("fp16" if self.device.startswith("cuda") else "fp32")
        return dtype

    def _device_name(self) -> str:
        if self.device.startswith("cuda"):
            return torch.cuda.get_device_name(torch.device(self.device))
        return f"cpu ({torch.get_num_threads()} threads)"

    def _record(self, cell, state: QuantState, calib_spec, quantize_s, eval_s, cached, res, handle) -> dict:
        proof = state.proof()
        proof["act_quantizers_fired"] = handle.act_quantizers_fired()
        samples_file = self.samples_dir / f"{cell_hash(self.suite, cell, calib_spec)}-{res.task}.jsonl"
        write_jsonl(samples_file, res.samples)
        meta = {k: v for k, v in state.meta.items() if k not in ("options",)}
        return new_record(
            **self._base(cell, calib_spec), metric=res.metric, value=res.value, stderr=res.stderr,
            n=res.n, n_empty=res.n_empty, n_unparsed=res.n_unparsed, latency=None, memory=None,
            quantize_s=quantize_s, eval_s=eval_s, status="ok", error=None, proof=proof,
            state_cached=cached, method_meta=meta,
            samples_file=str(samples_file.relative_to(self.out)),
        )

    def _failed(self, cell: Cell, exc: BaseException, *, stage: str, calib_spec=None,
                state: QuantState | None = None, quantize_s: float | None = None) -> dict:
        log.error("cell %s/%s/%s/%s failed during %s: %s", cell.model.name, cell.method.name,
                  cell.scheme, cell.task.name, stage, exc)
        try:
            base = self._base(cell, calib_spec)
        except Exception:  # e.g. the method name itself is unknown
            base = dict(suite=self.suite.name, model=cell.model.name, method=cell.method.name,
                        scheme=cell.scheme, task=cell.task.name)
        return new_record(**base, status="failed", metric="accuracy",
                          error=f"{stage}: {type(exc).__name__}: {exc}",
                          traceback=traceback.format_exc(limit=8),
                          proof=state.proof() if state is not None else None, quantize_s=quantize_s)

    def _emit(self, summary: RunSummary, rec: dict) -> None:
        append_record(self.records_path, rec)
        summary.records.append(rec)
        if rec["status"] == "ok":
            summary.ok += 1
        else:
            summary.failed += 1
        if self.on_record:
            self.on_record(rec)


def run_suite(suite: Suite, **kwargs) -> RunSummary:
    return SuiteRunner(suite, **kwargs).run()
