"""lm-eval task definitions: the real tasks (YAML + utils here) and the bundled synthetic ones (synth/).

Why a package: the YAMLs reference their functions as `tasks.<module>.<fn>`, and the harness
imports the scorers (tasks.metrics) and data resolution (tasks.sources) directly.
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent


def list_tasks() -> list[str]:
    """Names of the tasks defined by YAMLs under tasks/ (subfolders included), sorted."""
    from lm_eval.tasks import TaskManager

    return sorted(TaskManager(include_path=str(TASKS_DIR), include_defaults=False).all_subtasks)
