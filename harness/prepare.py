"""``prepare_state``: one path from a method to a finalized quantization state.

Both consumers of a state make it here — the accuracy worker (``harness.worker``, which caches it)
and ``qvlm-bench perf`` (``harness.perf.benchmark``, which times it) — so the state a latency row
measures is the state an accuracy row scores:

1. the method with the row's resolved options (``cells.Variant``);
2. ``Method.quantize`` under a fixed torch seed;
3. the model must be exactly as the method found it (``check_model_unchanged``);
4. ``finalize_state``: validation against the scheme, undecided activation ranges filled by the
   rule (``cells.act_range_rule``), the proof of quantization;
5. what the records need in ``state.meta``: quantize time, peak memory on a GPU, options,
   calibration source.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from .quant.finalize import check_model_unchanged, finalize_state, param_checksum
from .quant.state import QuantState

if TYPE_CHECKING:
    from .calibration import CalibrationSet
    from .cells import Variant
    from .quant.config import QuantConfig


def reset_peak(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def prepare_state(lm, variant: "Variant", qcfg: "QuantConfig", calib: "CalibrationSet | None",
                  rule: dict | None, *, seed: int = 0, timings: dict | None = None) -> QuantState:
    """The finalized state of ``variant`` at ``qcfg`` on the loaded model ``lm`` (module doc).

    ``calib``: the calibration set (None where the row gets no data: ``cells.calibration_spec``);
    ``rule``: how undecided activation quantizers are filled (``cells.act_range_rule``);
    ``timings`` (optional) receives ``quantize_s`` and ``finalize_s``.
    """
    timings = {} if timings is None else timings
    device = str(lm.device)
    method = variant.cls(**variant.options)
    reset_peak(device)
    before = param_checksum(lm.model)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    state = method.quantize(lm, qcfg, calib)
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    timings["quantize_s"] = time.perf_counter() - t0
    check_model_unchanged(before, param_checksum(lm.model), variant.method)
    t0 = time.perf_counter()
    batches = list(calib.inputs()) if calib is not None else None
    finalize_state(lm.model, state, qcfg, batches, rule, quantizes=variant.cls.quantizes, device=lm.device)
    timings["finalize_s"] = time.perf_counter() - t0
    state.meta["quantize_s"] = timings["quantize_s"]
    if device.startswith("cuda"):
        state.meta["peak_gib_quantize"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    state.meta.setdefault("options", variant.options)
    if calib is not None:
        state.meta.setdefault("calibration", {**calib.source, "digest": calib.digest()})
    return state


def suite_calibration(lm, suite, spec: dict) -> "CalibrationSet":
    """The calibration set a suite's cell gets (``spec``: ``cells.calibration_spec``): ``spec["n"]``
    seeded pairs of the task's split (``task_data.task_pairs``, through lm-eval), encoded for ``lm``.
    The one path of the accuracy worker and of ``qvlm-bench perf --methods-from``."""
    from .calibration import encode_pairs
    from .suite_config import TaskSpec
    from .task_data import task_pairs

    task = next((t for t in suite.tasks if t.name == spec["task"]), TaskSpec(spec["task"]))
    pairs = task_pairs(task.name, spec["split"], task.data or suite.data_dir, task.options,
                       suite.include_paths, n=int(spec["n"]), seed=int(spec["seed"]))
    return encode_pairs(lm, pairs, int(spec["batch_size"]), source=spec,
                        with_images=spec.get("modality", "image-text") != "text")
