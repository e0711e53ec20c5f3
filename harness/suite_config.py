"""Suite files: which models, methods, schemes and tasks to cross, validated up front.

A suite is YAML (or a dict). Validation happens before anything is loaded, and every error names
the offending key and lists the valid choices, so a typo costs seconds, not a failed night run.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .quant.config import OVERRIDE_KEYS, QuantConfig, SchemeError, parse_scheme

log = logging.getLogger("qvlm_bench")

SUITES_DIR = Path(__file__).resolve().parent / "suites"
SAFE_NAME = re.compile(r"[A-Za-z0-9_.+-]+")  # one path component: results/<name> stays under results/

SUITE_KEYS = {
    "name": "suite name; results go to results/<name>/ unless `output` is set",
    "models": "list of model names (bundled), local folders or Hub ids; or {name, dtype}",
    "methods": "list of method names or {name, options, label, act_clip_search, calibration}; `all` for every "
               "registered method",
    "method_options": "{method name: {option: value}} applied wherever that method runs (works with `all`)",
    "schemes": "list of scheme strings (w4a4, w6a6, ...) or {scheme, overrides}",
    "quant": "quantization overrides applied to every scheme (e.g. w_group_size, parts)",
    "tasks": "list of task names or {name, data, options}",
    "limit": "evaluate at most this many examples per task (null: all)",
    "seed": "random seed for calibration sampling and methods",
    "batch_size": "evaluation batch size",
    "calibration": "{task, split, n, batch_size, seed, modality}: calibration pairs shared by all methods "
                   "(modality: image-text, the default, or text: the same questions without their images)",
    "device": "auto, cpu, cuda or cuda:N",
    "dtype": "auto (fp16 on GPUs, fp64 on the CPU), fp16, bf16, fp32 or fp64",
    "threads": "CPU threads for torch (default: torch's own, one per core)",
    "act_ranges": "{stream: weights | quantized}: the stream static activation ranges come from (docs/design.md)",
    "data_dir": "folder with local copies of task datasets (<data_dir>/<task>/<split>.parquet)",
    "include_paths": "extra folders of lm-eval task YAMLs",
    "output": "results folder (default results/<name>)",
    "shards": "split every task's questions into N shards evaluated by several workers (--executor ray; "
              "a task's own `shards` wins; results equal the unsharded run's)",
    "deterministic": "true: identical results run to run on a GPU (deterministic algorithms, cuBLAS workspace, "
                     "cuDNN; harness/determinism.py), at a cost in speed; default false",
}
CALIBRATION_KEYS = ("task", "split", "n", "batch_size", "seed", "modality")
# What the calibration questions carry: their images (the default) or their text alone.
CALIBRATION_MODALITIES = ("image-text", "text")
TASK_KEYS = ("name", "data", "options", "shards")
METHOD_KEYS = ("name", "options", "label", "act_clip_search", "calibration")
# Keys of a `methods` entry that were renamed: old -> new. The old name is still accepted, with a
# deprecation message naming the new one.
RENAMED_METHOD_KEYS = {"clip": "act_clip_search"}
ACT_RANGE_KEYS = ("stream",)
DTYPES = ("auto", "fp16", "bf16", "fp32", "fp64")
MODEL_KEYS = ("name", "dtype")
SCHEME_KEYS = ("scheme", "overrides")


class SuiteError(ValueError):
    """A suite file is malformed; the message names the key and the fix."""


@dataclass
class MethodSpec:
    """A method as a suite runs it: its options, an optional row label, and the engine's
    activation-clipping search (``act_clip_search``: per activation tensor, the clipping percentile
    with the least output error, ``harness.quant.ranges``), a lever any method can get (row label
    ``+clip``; docs/design.md)."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    label: str | None = None
    act_clip_search: bool = False
    calibration: dict[str, Any] = field(default_factory=dict)  # per-row override: {modality: text}


@dataclass
class TaskSpec:
    name: str
    data: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    shards: int | None = None  # how the Ray executor splits it; never part of a cell's key


@dataclass
class ModelSpec:
    name: str
    dtype: str | None = None


@dataclass
class Suite:
    name: str
    models: list[ModelSpec]
    methods: list[MethodSpec]
    schemes: list[QuantConfig]
    tasks: list[TaskSpec]
    limit: int | None = None
    seed: int = 0
    batch_size: int = 16
    calibration: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None
    act_ranges: dict[str, Any] = field(default_factory=dict)
    data_dir: str | None = None
    include_paths: list[str] = field(default_factory=list)
    output: str | None = None
    shards: int | None = None  # default shard count of every task (Ray executor)
    deterministic: bool = False  # harness.determinism: in the cell identity (and records) only when true

    @property
    def output_dir(self) -> Path:
        return Path(self.output) if self.output else Path("results") / self.name


def _list(value, key: str) -> list:
    if value is None:
        raise SuiteError(f"suite key `{key}` is required ({SUITE_KEYS[key]})")
    if isinstance(value, (str, dict)):
        return [value]
    if not isinstance(value, list):
        raise SuiteError(f"suite key `{key}` must be a list ({SUITE_KEYS[key]}), got {type(value).__name__}")
    return value


def _entry(item, key: str, main: str, allowed: tuple[str, ...]) -> dict:
    if isinstance(item, str):
        return {main: item}
    if isinstance(item, dict):
        bad = [k for k in item if k not in allowed]
        if bad:
            raise SuiteError(f"unknown key(s) {bad} in an entry of `{key}`; valid: {list(allowed)}")
        if main not in item:
            raise SuiteError(f"an entry of `{key}` lacks `{main}`: {item}")
        return item
    raise SuiteError(f"entries of `{key}` are strings or mappings, got {item!r}")


def _renamed(item):
    """A ``methods`` entry with renamed keys under their new names (``clip`` -> ``act_clip_search``),
    each old key reported as deprecated (a ``DeprecationWarning``, and once per process on the console)."""
    if not isinstance(item, dict):
        return item
    for old, new in RENAMED_METHOD_KEYS.items():
        if old not in item:
            continue
        if new in item:
            raise SuiteError(f"an entry of `methods` sets both `{old}` and `{new}`; `{old}` is the old name "
                             f"of `{new}`: keep `{new}` only")
        msg = (f"the `methods` key `{old}` is deprecated: write `{new}: {str(item[old]).lower()}` "
               f"(the engine's per-tensor search of the activation clipping percentile); `{old}` is still read")
        warnings.warn(msg, DeprecationWarning, stacklevel=3)
        if old not in _WARNED:
            _WARNED.add(old)
            log.warning(msg)
        item = {(new if k == old else k): v for k, v in item.items()}
    return item


_WARNED: set[str] = set()


def method_spec(item) -> MethodSpec:
    """One entry of a suite's ``methods`` (a name, or a mapping of ``METHOD_KEYS``; the old names in
    ``RENAMED_METHOD_KEYS`` still read) as a ``MethodSpec``."""
    if isinstance(item, MethodSpec):
        return item
    return MethodSpec(**_entry(_renamed(item), "methods", "name", METHOD_KEYS))


def parse_suite(data: dict, *, validate_names: bool = True) -> Suite:
    """Validate a suite mapping and resolve it (method and task names checked when asked)."""
    if not isinstance(data, dict):
        raise SuiteError("a suite file must be a YAML mapping of keys: " + ", ".join(SUITE_KEYS))
    unknown = [k for k in data if k not in SUITE_KEYS]
    if unknown:
        raise SuiteError(f"unknown suite key(s) {unknown}; valid keys: {', '.join(SUITE_KEYS)}")
    name = data.get("name")
    name = "suite" if name is None else str(name) if isinstance(name, int) and not isinstance(name, bool) else name
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name) or name in (".", ".."):
        raise SuiteError(f"`name` is {name!r}; it names the results folder results/<name>, so it must be one "
                         "plain folder name: letters, digits, `-`, `_`, `+` and `.`, not `.` or `..` (to write "
                         "elsewhere, set `output`)")

    models = [ModelSpec(**_entry(m, "models", "name", MODEL_KEYS)) for m in _list(data.get("models"), "models")]

    raw_methods = data.get("methods")
    if raw_methods == "all":
        from .registry import available_methods

        raw_methods = list(available_methods())
    methods = [method_spec(m) for m in _list(raw_methods, "methods")]
    shared = data.get("method_options") or {}
    if not isinstance(shared, dict) or not all(isinstance(v, dict) for v in shared.values()):
        raise SuiteError("`method_options` must map method names to mappings of options")
    unused = sorted(set(shared) - {m.name for m in methods})
    if unused and validate_names:  # options for a method this run skips are fine; typos are not
        from .registry import available_methods

        unknown = [n for n in unused if n not in available_methods()]
        if unknown:
            raise SuiteError(f"unknown method(s) {unknown} in `method_options`; valid methods: "
                             f"{', '.join(available_methods())}")
    for m in methods:
        m.options = {**shared.get(m.name, {}), **(m.options or {})}

    quant = data.get("quant") or {}
    if not isinstance(quant, dict):
        raise SuiteError("`quant` must be a mapping of overrides; valid: " + ", ".join(OVERRIDE_KEYS))
    schemes = []
    for s in _list(data.get("schemes", ["w4a4", "w6a6"]), "schemes"):
        entry = _entry(s, "schemes", "scheme", SCHEME_KEYS)
        try:
            schemes.append(parse_scheme(entry["scheme"], **{**quant, **(entry.get("overrides") or {})}))
        except SchemeError as exc:
            raise SuiteError(f"in `schemes`: {exc}") from None

    tasks = [TaskSpec(**_entry(t, "tasks", "name", TASK_KEYS)) for t in _list(data.get("tasks"), "tasks")]
    _unique_nonempty("models", [m.name for m in models], "`qvlm-bench list models`")
    _unique_nonempty("methods", [m.name for m in methods], "`qvlm-bench list methods`", allow_repeats=True)
    _unique_nonempty("schemes", [q.scheme for q in schemes], "`qvlm-bench list schemes`",
                     keys=[repr(sorted(q.to_dict().items())) for q in schemes])
    _unique_nonempty("tasks", [t.name for t in tasks], "`qvlm-bench list tasks`")

    calibration = data.get("calibration") or {}
    if not isinstance(calibration, dict):
        raise SuiteError(f"`calibration` must be a mapping with keys {list(CALIBRATION_KEYS)}")
    bad = [k for k in calibration if k not in CALIBRATION_KEYS]
    if bad:
        raise SuiteError(f"unknown key(s) {bad} in `calibration`; valid: {list(CALIBRATION_KEYS)}")
    for m in methods:  # a row may calibrate on another modality than the suite: {modality: text}
        if not isinstance(m.calibration, dict) or set(m.calibration) - {"modality"}:
            raise SuiteError(f"`calibration` of method {m.name!r} may only set `modality` "
                             f"({', '.join(CALIBRATION_MODALITIES)}), got {m.calibration!r}")
    modalities = {calibration.get("modality", CALIBRATION_MODALITIES[0])}
    modalities |= {m.calibration["modality"] for m in methods if "modality" in m.calibration}
    for modality in sorted(modalities):
        if modality not in CALIBRATION_MODALITIES:
            raise SuiteError(f"`calibration.modality` is {modality!r}; valid: {', '.join(CALIBRATION_MODALITIES)} "
                             "(text: the same questions without their images)")
    imageless = sorted({p for q in schemes for p in q.parts if p in ("vision", "projector")})
    if "text" in modalities and imageless:
        raise SuiteError(f"`calibration.modality: text` has no images, so nothing reaches the {imageless} "
                         "linears the schemes quantize (`parts`); calibrate with image-text or quantize "
                         "the language model only")

    for m in methods:
        if not isinstance(m.act_clip_search, bool):
            raise SuiteError(f"`act_clip_search` of method {m.name!r} must be true or false, "
                             f"got {m.act_clip_search!r}")
        if m.label is not None and (not isinstance(m.label, str) or not m.label.strip()):
            raise SuiteError(f"`label` of method {m.name!r} must be a non-empty string, got {m.label!r}")

    act_ranges = data.get("act_ranges") or {}
    if not isinstance(act_ranges, dict) or any(k not in ACT_RANGE_KEYS for k in act_ranges):
        raise SuiteError(f"`act_ranges` must be a mapping with keys {list(ACT_RANGE_KEYS)}, got {act_ranges!r}")
    from .quant.ranges import STREAMS

    if act_ranges.get("stream", STREAMS[0]) not in STREAMS:
        raise SuiteError(f"`act_ranges.stream` is {act_ranges['stream']!r}; valid: {', '.join(STREAMS)}")

    shard_keys = [("`shards`", data.get("shards"))] + [(f"`shards` of task {t.name!r}", t.shards) for t in tasks]
    for where, v in shard_keys:
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise SuiteError(f"{where} must be a positive integer (1: not sharded), got {v!r}")
    for key, typ in (("limit", int), ("seed", int), ("batch_size", int), ("threads", int)):
        v = data.get(key)
        if v is not None and (not isinstance(v, typ) or isinstance(v, bool) or v < 0):
            raise SuiteError(f"`{key}` must be a non-negative integer, got {v!r}")
    if data.get("batch_size") == 0:
        raise SuiteError("`batch_size` is 0; it must be at least 1 (questions per evaluation batch; "
                         "remove the key for the default 16)")
    if data.get("limit") == 0:
        raise SuiteError("`limit` is 0, which would evaluate no question; give at least 1, or null (or "
                         "no `limit`) for every question")
    deterministic = False if data.get("deterministic") is None else data["deterministic"]
    if not isinstance(deterministic, bool):
        raise SuiteError(f"`deterministic` must be true or false, got {deterministic!r}")
    device = str(data.get("device") or "auto")
    if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
        raise SuiteError(f"`device` is {device!r}; valid: auto, cpu, cuda, cuda:N")
    dtype = str(data.get("dtype") or "auto")
    if dtype not in DTYPES:
        raise SuiteError(f"`dtype` is {dtype!r}; valid: {', '.join(DTYPES)}")
    for mdl in models:
        if mdl.dtype is not None and mdl.dtype not in DTYPES:
            raise SuiteError(f"`dtype` of model {mdl.name!r} is {mdl.dtype!r}; valid: {', '.join(DTYPES)}")
        _check_local_model(mdl.name)

    suite = Suite(name=name, models=models, methods=methods, schemes=schemes, tasks=tasks,
                  limit=data.get("limit"), seed=int(data.get("seed") or 0),
                  batch_size=int(data.get("batch_size") or 16), calibration=dict(calibration),
                  device=device, dtype=dtype,
                  threads=int(data["threads"]) if data.get("threads") else None,
                  act_ranges=dict(act_ranges),
                  data_dir=data.get("data_dir"),
                  include_paths=[str(p) for p in data.get("include_paths") or []],
                  output=data.get("output"), shards=data.get("shards"), deterministic=deterministic)
    if validate_names:
        validate_names_exist(suite)
    return suite


def _unique_nonempty(key: str, names: list[str], listing: str, *, allow_repeats: bool = False,
                     keys: list[str] | None = None) -> None:
    """``key`` lists at least one entry, and (unless ``allow_repeats``) none twice: a repeated task
    would be evaluated twice and shown once; an empty list would run nothing and exit 0."""
    if not names:
        raise SuiteError(f"`{key}` is empty, so the suite would run nothing; list at least one ({listing})")
    if allow_repeats:  # methods: one method with different options is two rows (labels checked later)
        return
    keys = keys or names
    dup = next((names[i] for i, k in enumerate(keys) if k in keys[:i]), None)
    if dup is not None:
        raise SuiteError(f"{dup!r} is listed twice in `{key}`; list each once")


def _check_local_model(name: str) -> None:
    """A model written as a path (``/…``, ``./…``, ``../…``, ``~…``) must exist, and so must a
    bundled model still to be trained (``PENDING_BUNDLED``); Hub ids (``org/name``) and bundled
    names are resolved when the model loads."""
    from .models.loading import pending_model_error

    pending = pending_model_error(name)
    if pending:
        raise SuiteError(pending)
    if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().is_dir():
        raise SuiteError(f"model {name!r} is a local path that does not exist (or is not a folder); "
                         "give a folder in Hugging Face format, a bundled model name "
                         "(`qvlm-bench list models`) or a Hub id such as llava-hf/llava-1.5-7b-hf")


def validate_names_exist(suite: Suite) -> None:
    from .registry import UnknownMethodError, get_method

    for m in suite.methods:
        try:
            cls = get_method(m.name)
        except UnknownMethodError as exc:
            raise SuiteError(f"in `methods`: {exc}") from None
        try:
            cls(**(m.options or {}))
        except ValueError as exc:
            raise SuiteError(f"in `methods` ({m.name}): {exc}") from None
    from tasks.index import available_tasks

    known = available_tasks(suite.include_paths)
    for t in suite.tasks:
        if t.name not in known:
            raise SuiteError(f"unknown task {t.name!r} in `tasks`; valid tasks: {', '.join(sorted(known))}")
    cal_task = suite.calibration.get("task")
    if cal_task and cal_task not in known:
        raise SuiteError(f"unknown task {cal_task!r} in `calibration.task`; valid: {', '.join(sorted(known))}")


def read_suite_data(path_or_name: str | Path | None = None) -> tuple[dict, Path]:
    """The raw mapping of a suite file, or of a bundled suite by name (``default``)."""
    if path_or_name is None:
        path_or_name = "default"
    path = Path(path_or_name)
    if not path.exists():
        bundled = SUITES_DIR / f"{path_or_name}.yaml"
        if not bundled.exists():
            names = sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))
            raise SuiteError(f"suite {str(path_or_name)!r} is neither a file nor a bundled suite; "
                             f"bundled: {', '.join(names)}")
        path = bundled
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SuiteError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise SuiteError(f"{path}: a suite file must be a YAML mapping of keys: " + ", ".join(SUITE_KEYS))
    return data, path


def load_suite(path_or_name: str | Path | None = None, *, overrides: dict | None = None,
               validate_names: bool = True) -> Suite:
    """Load and validate a suite; ``overrides`` (e.g. from the command line) replace its keys."""
    data, path = read_suite_data(path_or_name)
    try:
        return parse_suite({**data, **(overrides or {})}, validate_names=validate_names)
    except SuiteError as exc:
        raise SuiteError(f"{path}: {exc}") from None
