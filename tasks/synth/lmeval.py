"""lm-eval glue for the synthetic tasks: the ``custom_dataset`` their YAMLs name.

The YAMLs include the real tasks' templates (prompt, scorer, generation settings), so a synthetic
task differs from its real twin only in where the rows come from.
"""

from __future__ import annotations

from typing import Any

from . import DEFAULT_SEED, TASKS, load_split, rows_to_records, split_parquet


def features(task: str):
    """HF ``datasets`` features of a task, the same as the real dataset's (image decodes to PIL)."""
    from datasets import Features, Image, List, Value

    s = Value("string")
    if task == "synth_scienceqa":
        return Features({"id": s, "image": Image(), "question": s, "choices": List(s), "answer": Value("int8"),
                         "hint": s, "task": s, "grade": s, "subject": s, "topic": s, "category": s,
                         "skill": s, "lecture": s, "solution": s})
    if task == "synth_vizwiz":
        return Features({"question_id": s, "image": Image(), "question": s, "answers": List(s), "category": s})
    if task == "synth_vqav2":
        return Features({"question_type": s, "multiple_choice_answer": s,
                         "answers": List({"answer": s, "answer_confidence": s, "answer_id": Value("int64")}),
                         "image_id": Value("int64"), "answer_type": s, "question_id": Value("int64"),
                         "question": s, "image": Image()})
    raise KeyError(f"unknown synthetic task {task!r}; valid: {', '.join(TASKS)}")


def load_docs(*, task_name: str, split: str = "test", seed: int = DEFAULT_SEED, n: int | None = None,
              data_files: str | list[str] | None = None, subset_size: int | None = None,
              subset_seed: int = 0, stratify_by: str | None = None, **_metadata: Any):
    """One split as a DatasetDict {split: Dataset}: generated (cached), or from ``data_files``.

    ``data_files`` (set by tasks.sources.task_spec when a suite points the task at local parquet)
    wins over generation; ``subset_size``/``stratify_by`` take a seeded subset as for real tasks.
    """
    import datasets

    if data_files:
        files = [data_files] if isinstance(data_files, str) else list(data_files)
        ds = datasets.load_dataset("parquet", data_files={split: files}, split=split)
    else:
        feats = features(task_name)
        path = split_parquet(task_name, split, n=n, seed=int(seed))
        ds = None
        if path is not None:
            # the cache's Arrow table as it is (images stay PNG bytes): decoding every image and
            # encoding it again took longer than evaluating a cell
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                table = pq.read_table(path).select(list(feats)).cast(feats.arrow_schema)
                ds = datasets.Dataset(table, info=datasets.DatasetInfo(features=feats))
            except (OSError, KeyError, pa.ArrowException):  # unreadable cache: load_split regenerates it
                ds = None
        if ds is None:
            rows = load_split(task_name, split, n=n, seed=int(seed))
            ds = datasets.Dataset.from_list(rows_to_records(rows), features=feats)
    if subset_size is not None and subset_size < len(ds):
        from tasks.sampling import stratified_indices

        labels = ds[stratify_by] if stratify_by else [0] * len(ds)
        ds = ds.select(stratified_indices(list(labels), int(subset_size), int(subset_seed)))
    return datasets.DatasetDict({split: ds})
