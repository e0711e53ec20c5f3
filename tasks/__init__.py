"""lm-eval task definitions: the real tasks (YAML + utils here) and the bundled synthetic ones (synth/).

Why a package: the YAMLs reference their functions as `tasks.<module>.<fn>`, and the harness
imports the scorers (tasks.metrics) and data resolution (tasks.sources) directly.
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent


def list_tasks() -> list[str]:
    """Names of the tasks defined by YAMLs under tasks/ (subfolders included), sorted.

    One implementation serves the CLI and this package: a YAML scan that needs no lm-eval import.
    """
    from harness.tasks_index import available_tasks

    return available_tasks()
