"""Where tasks are defined: tasks/ and the extra lm-eval task folders a suite includes.

Two views of the same folders:
- ``task_files``/``available_tasks``: a plain YAML scan (no lm-eval import, which takes ~2 s),
  for validating suites and ``qvlm-bench list``;
- ``task_manager``: lm-eval's ``TaskManager``, which loads the tasks. Built once per tuple of
  include paths and reused: it indexes every YAML under them on construction (seconds for a
  large task tree; docs/design.md has the numbers), and the runner asks for it per cell, per task
  spec and per calibration.

Here, in the tasks package, so that the package stays free of the harness: the harness imports
this (``harness.cli``, ``harness.suite_config``, ``harness.evaluate``), never the other way round.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Iterable

import yaml

TASKS_DIR = Path(__file__).resolve().parent


class _TagTolerantLoader(yaml.SafeLoader):
    """Reads lm-eval YAML, treating ``!function`` and other tags as plain strings."""


_TagTolerantLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def task_files(include_paths: Iterable[str | Path] = ()) -> dict[str, Path]:
    """``{task name: yaml path}`` for this folder and extra include paths (the first wins)."""
    found: dict[str, Path] = {}
    for root in [TASKS_DIR, *map(Path, include_paths)]:
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*.yaml")):
            try:
                data = yaml.load(path.read_text(), Loader=_TagTolerantLoader)
            except yaml.YAMLError:
                continue
            if isinstance(data, dict) and isinstance(data.get("task"), str):
                found.setdefault(data["task"], path)
    return found


def available_tasks(include_paths: Iterable[str | Path] = ()) -> list[str]:
    return sorted(task_files(include_paths))


@functools.lru_cache(maxsize=8)
def _manager(paths: tuple[str, ...]):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths), include_defaults=False)


def task_manager(include_paths: Iterable[str | Path] = ()):
    """The lm-eval ``TaskManager`` for tasks/ plus ``include_paths`` (later folders win on equal
    task names, as in lm-eval), shared by every caller with the same folders. Task YAMLs are read
    when a task is loaded, so edits to a task are seen; a task file added to a folder after its
    first use in this process is not (``task_manager.cache_clear()``)."""
    paths = (str(TASKS_DIR), *(str(Path(p).expanduser().resolve()) for p in include_paths))
    return _manager(paths)


task_manager.cache_clear = _manager.cache_clear
