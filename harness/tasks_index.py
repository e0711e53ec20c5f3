"""Task names defined by lm-eval YAML files, found without importing lm-eval (which is slow).

Used to validate suites and for ``qvlm-bench list``; lm-eval itself loads the tasks to run them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import yaml


class _TagTolerantLoader(yaml.SafeLoader):
    """Reads lm-eval YAML, treating ``!function`` and other tags as plain strings."""


_TagTolerantLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def tasks_dir() -> Path:
    import tasks

    return Path(tasks.__file__).resolve().parent


def task_files(include_paths: Iterable[str | Path] = ()) -> dict[str, Path]:
    """``{task name: yaml path}`` for the bundled tasks/ folder and extra include paths."""
    found: dict[str, Path] = {}
    for root in [tasks_dir(), *map(Path, include_paths)]:
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
