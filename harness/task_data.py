"""Calibration pairs drawn from a task's own split, through the task's lm-eval definition.

Using the task's ``doc_to_text``/``doc_to_image``/``doc_to_target`` means the calibration
prompts are formatted exactly like the evaluation prompts, for real and synthetic tasks alike.
"""

from __future__ import annotations

from typing import Any, Sequence

def _split_docs(task, split: str):
    """The docs of ``split``, whichever role (train/validation/test) the task gives it."""
    cfg = task.config
    for role, attr in (("training_split", "training_docs"), ("validation_split", "validation_docs"),
                       ("test_split", "test_docs")):
        if getattr(cfg, role, None) == split:
            return getattr(task, attr)()
    have = [getattr(cfg, r) for r in ("training_split", "validation_split", "test_split") if getattr(cfg, r, None)]
    raise ValueError(f"task {cfg.task!r} has no {split!r} split for calibration (it has: {', '.join(have)}); "
                     f"set calibration.split to one of those")


def _target_text(task, doc) -> str:
    target = task.doc_to_target(doc)
    if isinstance(target, list):
        target = target[0]
    if isinstance(target, int) and not isinstance(target, bool):
        choices = task.doc_to_choice(doc) if task.config.doc_to_choice is not None else None
        return choices[target] if choices else chr(ord("A") + target)
    return str(target)


def _load_task(spec, include_paths):
    from .evaluate import task_manager

    tasks = list(task_manager(include_paths).load([spec])["tasks"].values())
    if len(tasks) != 1:
        raise ValueError(f"calibration source {spec!r} must be a single task")
    return tasks[0]


def task_pairs(name: str, split: str, data: str | None = None, options: dict | None = None,
               include_paths: Sequence[str] = (), n: int | None = None,
               seed: int = 0) -> list[tuple[Any, str, str]]:
    """``(image, prompt, answer)`` for ``n`` seeded random docs (all when None) of ``split``.

    A task that declares ``split`` (e.g. ``training_split: train``) is used as it is; one that
    loads a single split through ``tasks.sources`` is re-pointed at ``split``.
    """
    from tasks.sources import task_spec  # part of this project: an error in it must surface

    options = dict(options or {})
    spec = task_spec(name, data, include_paths=include_paths, **options)
    task = _load_task(spec, include_paths)
    try:
        docs = _split_docs(task, split)
    except ValueError:
        spec = task_spec(name, data, include_paths=include_paths, **{**options, "split": split})
        task = _load_task(spec, include_paths)
        docs = _split_docs(task, split)
    if n is not None:
        from .calibration import sample_indices

        # index the sampled docs only: list(docs) would decode every image of the split
        docs = [docs[i] for i in sample_indices(len(docs), n, seed)]
    else:
        docs = list(docs)
    pairs = []
    for doc in docs:
        images = task.doc_to_image(doc)
        image = images[0] if isinstance(images, (list, tuple)) else images
        pairs.append((image.convert("RGB") if image is not None else None,
                      task.doc_to_text(doc), _target_text(task, doc)))
    return pairs
