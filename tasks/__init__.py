"""lm-eval task definitions: the real tasks (YAML + utils here) and the bundled synthetic ones (synth/).

Why a package: the YAMLs reference their functions as `tasks.<module>.<fn>`, and the harness
imports the scorers (tasks.metrics) and data resolution (tasks.sources) directly.
"""

from __future__ import annotations

from .index import TASKS_DIR, available_tasks

__all__ = ["TASKS_DIR", "list_tasks"]


def list_tasks() -> list[str]:
    """Names of the tasks defined by YAMLs under tasks/ (subfolders included), sorted.

    One implementation (``tasks.index``) serves the CLI and this package: a YAML scan that needs
    no lm-eval import.
    """
    return available_tasks()
