"""Calibration pairs drawn from a task's own split, through the task's lm-eval definition.

Using the task's ``doc_to_text``/``doc_to_image``/``doc_to_target`` means the calibration
prompts are formatted exactly like the evaluation prompts, for real and synthetic tasks alike.
"""

from __future__ import annotations

from typing import Any, Sequence

SPLIT_DOCS = {"train": "training_docs", "validation": "validation_docs", "test": "test_docs"}


def _target_text(task, doc) -> str:
    target = task.doc_to_target(doc)
    if isinstance(target, list):
        target = target[0]
    if isinstance(target, int) and not isinstance(target, bool):
        choices = task.doc_to_choice(doc) if task.config.doc_to_choice is not None else None
        return choices[target] if choices else chr(ord("A") + target)
    return str(target)


def task_pairs(spec: str | dict, split: str, include_paths: Sequence[str] = ()) -> list[tuple[Any, str, str]]:
    """``(image, prompt, answer)`` for every doc of ``split`` of the task ``spec``."""
    from .evaluate import task_manager

    if split not in SPLIT_DOCS:
        raise ValueError(f"calibration split {split!r}; valid: {', '.join(SPLIT_DOCS)}")
    tasks = list(task_manager(include_paths).load([spec])["tasks"].values())
    if len(tasks) != 1:
        raise ValueError(f"calibration source {spec!r} must be a single task")
    task = tasks[0]
    has = getattr(task, f"has_{SPLIT_DOCS[split].replace('_docs', '')}_docs")()
    if not has:
        raise ValueError(f"task {task.config.task!r} has no {split} split for calibration; "
                         f"set calibration.split to one it has")
    pairs = []
    for doc in getattr(task, SPLIT_DOCS[split])():
        images = task.doc_to_image(doc)
        image = images[0] if isinstance(images, (list, tuple)) else images
        pairs.append((image.convert("RGB") if image is not None else None,
                      task.doc_to_text(doc), _target_text(task, doc)))
    return pairs
