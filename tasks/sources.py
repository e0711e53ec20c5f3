"""Where a task's rows come from: the Hugging Face Hub by default, or a local copy in the same schema.

Why: no machine here reaches the Hub, so every task must also run from a local parquet copy
through the very same loading code, and a missing dataset must say how to fix it instead of
failing deep inside `datasets`.

- ``load_docs`` is the tasks' ``custom_dataset`` (lm-eval calls it with the YAML's
  ``dataset_kwargs`` plus the task metadata, which it ignores).
- ``task_spec`` turns (task name, data location, options) into what lm-eval's TaskManager loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from .index import TASKS_DIR, task_manager

#: Options ``task_spec`` forwards to ``load_docs`` through the task's dataset_kwargs.
SPEC_OPTIONS = ("split", "subset_size", "subset_seed", "stratify_by", "cache_dir")


class DatasetUnavailableError(RuntimeError):
    """A task's dataset can be neither fetched from the Hub nor found locally."""


def _hint(task: str | None, split: str) -> str:
    where = f"DIR/{task}/{split}.parquet" if task else f"DIR/<task>/{split}.parquet"
    return (
        "Point the task at a local copy in the same schema: --data-dir DIR "
        f"(holding {where}) or `data:` for the task in the suite file "
        f"(a folder holding {split}.parquet, or a .parquet file)."
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def load_docs(
    *,
    path: str,
    split: str,
    name: str | None = None,
    data_files: str | list[str] | None = None,
    subset_size: int | None = None,
    subset_seed: int = 0,
    stratify_by: str | None = None,
    task_name: str | None = None,
    cache_dir: str | None = None,
    **_metadata: Any,
):
    """Load one split as a DatasetDict {split: Dataset}, optionally a seeded (stratified) subset.

    path/name/split: the Hub dataset id, config and split (the default source).
    data_files: local parquet file(s) in the same schema; when given the Hub is not contacted.
    subset_size: None = the full split; else a seeded sample of that many rows, stratified by
    the column `stratify_by` when given (e.g. VQAv2's answer_type), drawn from that column alone
    before any image is read (``tasks.subset``: only the chosen rows' row groups are fetched).
    """
    import datasets

    from . import subset

    try:
        ds = None
        files = None
        if data_files:
            files = [data_files] if isinstance(data_files, str) else list(data_files)
        if subset_size is not None:  # read the chosen rows' images only, not the whole split
            if files:
                table, _ = subset.parquet_subset(files, int(subset_size), int(subset_seed), stratify_by)
                ds = None if table is None else datasets.Dataset(datasets.table.InMemoryTable(table))
            else:
                ds = subset.hub_subset(path, name, split, int(subset_size), int(subset_seed),
                                       stratify_by, cache_dir)
            if ds is not None:
                return datasets.DatasetDict({split: ds})
        if files:
            ds = datasets.load_dataset(
                "parquet", data_files={split: files}, split=split, cache_dir=cache_dir
            )
        else:
            ds = datasets.load_dataset(path, name, split=split, cache_dir=cache_dir)
    except subset.SubsetColumnError:
        raise
    except Exception as err:  # any failure to obtain the rows becomes one clear error
        source = f"local files {data_files}" if data_files else "the Hugging Face Hub"
        msg = (
            f"Dataset {path!r} (config {name!r}, split {split!r})"
            f"{f' for task {task_name!r}' if task_name else ''} could not be loaded from "
            f"{source} ({_first_line(err)}). {_hint(task_name, split)}"
        )
        raise DatasetUnavailableError(msg) from None
    return datasets.DatasetDict({split: ds})


def resolve_local(data: str | Path, task: str, split: str, config: str | None = None) -> list[str]:
    """Parquet file(s) for `task`/`split` under `data` (a file, DIR/<task>/, or DIR itself).

    Inside a folder, tries <split>.parquet, then Hub-style shards <split>-*.parquet, also under
    <config>/ and data/ (the layouts of a downloaded Hub dataset repo).
    """
    root = Path(data).expanduser()
    if root.is_file():
        return [str(root)]
    patterns = [f"{split}.parquet", f"{split}-*.parquet"]
    if config:
        patterns += [f"{config}/{split}.parquet", f"{config}/{split}-*.parquet"]
    patterns += [f"data/{split}-*.parquet"]
    folders = [root / task, root] if (root / task).is_dir() else [root]
    for folder in folders:
        for pattern in patterns:
            found = sorted(folder.glob(pattern))
            if found:
                return [str(p) for p in found]
    tried = ", ".join(str(f / p) for f in folders for p in patterns)
    raise DatasetUnavailableError(
        f"No local copy of task {task!r} (split {split!r}) under {str(root)!r}; looked for: "
        f"{tried}. {_hint(task, split)}"
    )


def data_version(name: str) -> str | None:
    """What a task's rows depend on beyond its name and data location, for cache keys: the
    generator version of a synthetic task (its rows change when the generator does). None for the
    real tasks, whose rows are the dataset's."""
    if name.startswith("synth_"):
        from tasks import synth

        return f"synth-v{synth.SYNTH_VERSION}"
    return None


def task_config(name: str, include_paths: Iterable[str | Path] = ()) -> dict[str, Any]:
    """The full config of task `name` from its YAML (includes merged, functions resolved), found
    under tasks/ or the extra lm-eval task folders ``include_paths``: the YAML that the same
    folders' ``task_manager`` will load."""
    from lm_eval.tasks._yaml_loader import load_yaml

    include_paths = [str(p) for p in include_paths]
    entry = task_manager(include_paths).task_index.get(name)
    if entry is None or entry.yaml_path is None:
        where = ", ".join([str(TASKS_DIR), *include_paths])
        raise KeyError(f"No task {name!r} defined under {where}; a task from another folder needs "
                       "that folder in the suite's include_paths")
    return load_yaml(entry.yaml_path, resolve_func=True)


def task_spec(name: str, data: str | None = None, *, include_paths: Iterable[str | Path] = (),
              **options: Any) -> str | dict:
    """What to hand to TaskManager.load / load_task_or_group / get_task_dict for task `name`.

    Returns the plain name when the YAML's own source applies (no data, no options); otherwise
    the task's full YAML config as a dict (lm-eval 0.4.13 builds a dict spec on its own, without
    the YAML) with its source overridden:
    - ``data``: a .parquet file, a folder holding <split>.parquet, or a folder DIR/<name>/ ->
      rows come from those files through ``load_docs`` (same code as the Hub path).
      For a task that brings its own rows (e.g. the synthetic tasks) a folder without a copy
      for it is ignored; for a Hub task it raises DatasetUnavailableError.
    - options (for tasks loaded by ``load_docs``): SPEC_OPTIONS, e.g. ``subset_size=None`` for
      vqav2_val's full split, ``split="train"`` to evaluate (or calibrate on) another split.
      For a task with another ``custom_dataset``, options go to it as keyword arguments.
    - ``include_paths``: the suite's extra task folders, where tasks not under tasks/ are found.
    """
    if data is None and not options:
        return name
    cfg = task_config(name, include_paths)
    kwargs = dict(cfg.get("dataset_kwargs") or {})
    ours = cfg.get("custom_dataset") is load_docs
    files = None
    if data is not None:
        split = options.get("split") or kwargs.get("split") or _eval_split(cfg)
        try:
            files = resolve_local(data, name, split, kwargs.get("name"))
        except DatasetUnavailableError:
            if ours and not kwargs.get("data_files"):
                raise
        if files is not None and not ours:  # same schema, our loader: rows from the files
            cfg["custom_dataset"] = load_docs
            kwargs = {"path": str(data), "split": split, "task_name": name}
            ours = True
        elif files is None and not options:
            return name  # the task's own rows; the data folder holds nothing for it
    if ours:
        unknown = sorted(set(options) - set(SPEC_OPTIONS))
        if unknown:
            raise ValueError(
                f"Unknown option(s) {unknown} for task {name!r}; known: {list(SPEC_OPTIONS)}"
            )
    kwargs.update(options)
    if files is not None:
        kwargs["data_files"] = files
    if ours or "split" in options:  # the one split loaded is the one evaluated
        cfg.pop("validation_split", None)
        cfg.pop("training_split", None)
        cfg["test_split"] = kwargs["split"]
    cfg["dataset_kwargs"] = kwargs
    return cfg


def _eval_split(cfg: dict[str, Any]) -> str:
    return cfg.get("test_split") or cfg.get("validation_split") or "test"
