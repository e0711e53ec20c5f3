"""Task names a suite may use: the bundled tasks/ folder and the suite's include paths.

The YAML scan lives in ``tasks.index`` (the harness depends on the tasks package, not the reverse).
"""

from __future__ import annotations

from pathlib import Path

from tasks.index import TASKS_DIR, available_tasks, task_files

__all__ = ["available_tasks", "task_files", "tasks_dir"]


def tasks_dir() -> Path:
    return TASKS_DIR
