"""A suite's cells and what identifies each one, resolved once, in one place.

A *cell* is (model, variant, scheme, task). Everything that determines its result is resolved
here when the suite is planned — the method class and its options with defaults filled in, the
row label, the dtype and device it runs in, the calibration it gets, the rule that fills its
static activation ranges, and a digest of the code that computes it — and hashed into two keys:

* ``state_key``: what determines the quantization state (shared by the cells of one group: the
  same model, variant and scheme on every task); the on-disk state cache is keyed by it;
* ``key`` (the record's ``config_hash``): the state key plus what determines one task's score.

A record whose ``config_hash`` equals a cell's key is that cell's result; anything else is
recomputed. Executors (serial, Ray) take the groups of a plan and never recompute identities.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from .quant.config import QuantConfig
from .registry import Method, files_digest, get_method, method_code_digest
from .suite_config import CALIBRATION_MODALITIES, MethodSpec, ModelSpec, Suite, SuiteError, TaskSpec

REPO = Path(__file__).resolve().parents[1]
# Engine code a quantization state depends on (besides the method's own source), and the code
# a score depends on (besides the state). Editing any of these recomputes the cells concerned.
STATE_CODE = ("harness/quant", "harness/calibration.py", "harness/prompting.py",
              "harness/models/capture.py", "harness/models/layers.py", "harness/models/parts.py",
              "harness/models/family.py",
              "harness/task_data.py")
EVAL_CODE = ("harness/evaluate.py", "tasks/metrics.py", "tasks/sources.py", "tasks/subset.py",
             "tasks/sampling.py")
DEFAULT_CALIBRATION = {"split": "train", "n": 64, "batch_size": 8}


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@lru_cache(maxsize=None)
def code_digest(paths: tuple[str, ...]) -> str:
    """Digest of the repository files (or every ``.py`` under the folders) named in ``paths``."""
    files: list[Path] = []
    for rel in paths:
        p = REPO / rel
        files.extend(sorted(p.rglob("*.py")) if p.is_dir() else [p] if p.is_file() else [])
    return files_digest(files, REPO)


def suite_dtype(dtype: str, device: str) -> str:
    """A suite's dtype on ``device``: ``auto`` by the project's one rule (``models.loading.auto_dtype``:
    fp16 on GPUs, fp64 on the CPU)."""
    if dtype != "auto":
        return dtype
    from .models.loading import auto_dtype

    return auto_dtype(device)


@dataclass(frozen=True)
class Variant:
    """A method as one row of the table runs it."""

    method: str
    cls: type[Method]
    options: dict[str, Any]  # resolved: defaults filled in
    act_clip_search: bool  # the engine's activation-clipping search on top of the method (label +clip)
    label: str
    calibration: dict[str, Any] = field(default_factory=dict)  # the row's overrides ({modality: text})

    @property
    def reference(self) -> bool:
        return bool(self.cls.reference)


def variant_label(spec: MethodSpec, cls: type[Method], options: dict[str, Any],
                  calibration: str | None = None) -> str:
    """``name``, ``name+clip``, ``name (preset)`` or ``name (k=v, …)`` from the non-default options,
    and ``calibration`` (e.g. ``text calib``) last in the parentheses when it is not the default.

    A suite may set ``label`` explicitly; otherwise two entries of one method with different
    options get different labels, so they never collide in a table.
    """
    if spec.label:
        return spec.label
    changed = {k: v for k, v in options.items() if cls.defaults.get(k) != v}
    parts: list[str] = []
    for preset, values in (cls.presets or {}).items():
        if values and all(k in changed and changed[k] == v for k, v in values.items()):
            parts.append(preset)
            changed = {k: v for k, v in changed.items() if k not in values}
            break
    parts += [f"{k}={_short(v)}" for k, v in sorted(changed.items())]
    parts += [calibration] if calibration else []
    base = spec.name + ("+clip" if spec.act_clip_search else "")
    return f"{base} ({', '.join(parts)})" if parts else base


def _short(value: Any) -> str:
    return json.dumps(value, default=str) if isinstance(value, (list, dict)) else str(value)


@dataclass
class Cell:
    model: ModelSpec
    variant: Variant
    qcfg: QuantConfig
    task: TaskSpec
    dtype: str
    device: str
    calibration: dict | None
    act_ranges: dict | None
    code: dict[str, str | None]
    state_key: str
    key: str
    identity: dict = field(repr=False, default_factory=dict)

    @property
    def method(self) -> str:
        return self.variant.method

    @property
    def scheme(self) -> str:
        return self.qcfg.scheme

    def describe(self) -> str:
        return f"{self.model.name} / {self.variant.label} / {self.scheme} / {self.task.name}"


@dataclass
class CellGroup:
    """The cells that share one quantization state: quantize once, evaluate every task."""

    cells: list[Cell]

    @property
    def head(self) -> Cell:
        return self.cells[0]

    @property
    def state_key(self) -> str:
        return self.head.state_key


def _data_version(task: str) -> str | None:
    from tasks.sources import data_version

    return data_version(task)


def _model_fingerprint(name: str) -> str:
    from .models.loading import model_fingerprint

    return model_fingerprint(name)


def uses_calibration(cls: type[Method], act_clip_search: bool, qcfg: QuantConfig) -> bool:
    """Whether a cell gets the calibration set: methods that need it, static activation ranges
    (any method), and the clipping search; never the float reference."""
    if cls.reference:
        return False
    return bool(cls.calibrates(qcfg) or (act_clip_search and qcfg.quantizes_acts))


def calibration_label(suite: Suite, overrides: dict | None = None) -> str | None:
    """What a row label says about the calibration set when it is not the default
    (``text calib`` for ``modality: text``, the suite's or the row's own)."""
    modality = {**suite.calibration, **(overrides or {})}.get("modality", CALIBRATION_MODALITIES[0])
    return None if modality == CALIBRATION_MODALITIES[0] else f"{modality} calib"


def calibration_spec(suite: Suite, variant: Variant, qcfg: QuantConfig) -> dict | None:
    """The suite's shared calibration set, for every cell that uses data (``uses_calibration``).
    ``modality`` is in the spec only when it is not the default (image-text), so the records and
    cell keys of runs from before the option are unchanged."""
    if not uses_calibration(variant.cls, variant.act_clip_search, qcfg):
        return None
    spec = {**DEFAULT_CALIBRATION, "seed": suite.seed, **suite.calibration, **variant.calibration}
    if spec.get("modality") == CALIBRATION_MODALITIES[0]:
        del spec["modality"]
    if not spec.get("task"):
        spec["task"] = suite.tasks[0].name
    version = _data_version(spec["task"])
    if version is not None:  # other calibration rows under another generator version
        spec["data_version"] = version
    return spec


def act_range_rule(suite: Suite | None, variant: Variant, qcfg: QuantConfig) -> dict | None:
    """How the engine fills the activation quantizers a method leaves undecided (None: nothing
    to fill — float, dynamic per-token without the clipping search, or a control). ``suite``
    None: the default stream (``qvlm-bench perf``)."""
    from .quant.ranges import rule_for

    if variant.reference or not variant.cls.quantizes or not qcfg.quantizes_acts:
        return None
    return rule_for(qcfg, act_clip_search=variant.act_clip_search,
                    stream=(suite.act_ranges if suite else {}).get("stream"))


def resolve_variants(suite: Suite) -> list[Variant]:
    return resolve_methods(suite.methods, suite)


def resolve_methods(specs: list[MethodSpec | str], suite: Suite | None = None) -> list[Variant]:
    """The rows ``specs`` (a suite's ``methods`` entries, or bare method names) make, each with its
    class, resolved options and label: the one ``Variant`` of accuracy suites and ``qvlm-bench perf``.
    ``suite`` (None: no suite, as ``qvlm-bench perf --methods``) decides the calibration label."""
    out: list[Variant] = []
    seen: dict[str, MethodSpec] = {}
    for spec in specs:
        if isinstance(spec, str):
            spec = MethodSpec(spec)
        cls = get_method(spec.name)
        options = cls(**(spec.options or {})).options
        if cls.reference and spec.act_clip_search:
            raise SuiteError(f"method {spec.name!r} is the float reference; `act_clip_search` does not apply to it")
        search = bool(spec.act_clip_search)
        calibrated = suite is not None and any(uses_calibration(cls, search, q) for q in suite.schemes)
        label = variant_label(spec, cls, options,
                              calibration_label(suite, spec.calibration) if calibrated else None)
        if label in seen:
            raise SuiteError(f"two entries of `methods` make the same row {label!r}; give one a "
                             f"different `label`")
        seen[label] = spec
        out.append(Variant(spec.name, cls, options, search, label, dict(spec.calibration or {})))
    return out


def state_identity(model: str, weights: str, dtype: str, device_kind: str, variant: Variant,
                   qcfg: QuantConfig, calibration: dict | None, act_ranges: dict | None, seed: int,
                   code: dict | None = None, deterministic: bool = False) -> dict:
    """What determines a quantization state (its digest is the ``state_key``): the same for an
    accuracy cell and a ``qvlm-bench perf`` row, so records of one state carry one key.

    ``deterministic`` (the suite's ``deterministic: true``) is in the identity only when true, so
    the keys of every suite without it are the keys they had before the option existed. When true
    it is in the state key too: a state quantized without it (Q-VLM's encoder training, GPTQ's
    Hessians on a GPU) is not the one the suite asks for, and a folder's records then all say they
    ran under it rather than mixing cells computed either way."""
    code = code or {"method": method_code_digest(variant.method), "engine": code_digest(STATE_CODE)}
    ident = {
        "model": model, "weights": weights, "dtype": dtype, "device": device_kind,
        "method": variant.method, "options": variant.options,
        "act_clip_search": variant.act_clip_search,
        "code": [code["method"], code["engine"]], "quant": qcfg.to_dict(),
        "calibration": calibration, "act_ranges": act_ranges, "seed": seed,
    }
    if variant.calibration:  # a row's own calibration overrides make it a row of its own,
        ident["calibration_overrides"] = variant.calibration  # even where it gets no data
    if deterministic:
        ident["deterministic"] = True
    return ident


def plan_cells(suite: Suite, device: str) -> list[Cell]:
    """Every cell of ``suite`` on ``device`` ("cpu", "cuda", "cuda:N"), identities resolved."""
    variants = resolve_variants(suite)
    state_code = code_digest(STATE_CODE)
    eval_code = code_digest(EVAL_CODE)
    weights = {m.name: _model_fingerprint(m.name) for m in suite.models}
    versions = {t.name: _data_version(t.name) for t in suite.tasks}
    device_kind = "cuda" if device.startswith("cuda") else device
    cells: list[Cell] = []
    for model in suite.models:
        dtype = suite_dtype(model.dtype or suite.dtype, device)
        for v in variants:
            schemes = [QuantConfig()] if v.reference else suite.schemes
            for qcfg in schemes:
                calib = calibration_spec(suite, v, qcfg)
                ranges = act_range_rule(suite, v, qcfg)
                code = {"method": method_code_digest(v.method), "engine": state_code, "eval": eval_code}
                state_id = state_identity(model.name, weights[model.name], dtype, device_kind, v, qcfg,
                                          calib, ranges, suite.seed, code=code,
                                          deterministic=suite.deterministic)
                state_key = digest(state_id)
                for task in suite.tasks:
                    identity = {
                        "state": state_key, "task": task.name, "data": task.data or suite.data_dir,
                        "task_options": task.options, "data_version": versions[task.name],
                        "limit": suite.limit, "eval_code": eval_code,
                    }
                    cells.append(Cell(model, v, qcfg, task, dtype, device, calib, ranges, code,
                                      state_key, digest(identity), {**state_id, **identity}))
    return cells


def group_cells(cells: list[Cell]) -> list[CellGroup]:
    """Cells grouped by quantization state, in plan order (a model's groups stay together)."""
    groups: dict[str, CellGroup] = {}
    for c in cells:
        groups.setdefault(c.state_key, CellGroup([])).cells.append(c)
    return list(groups.values())
