"""Task names defined by lm-eval YAML files, found by reading the YAMLs (no lm-eval import, which
is slow, and no TaskManager, which indexes every file it is given).

Here, in the tasks package, so that the package stays free of the harness: the harness imports
this (``harness.tasks_index``), never the other way round.
"""

from __future__ import annotations

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
