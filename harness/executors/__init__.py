"""Executors: how the pending groups of a planned suite are run (``SuiteRunner(executor=...)``).

Every executor has ``execute(groups) -> Iterator[list[dict]]``, yielding each finished cell's
records; the runner alone appends them. ``harness.runner.SerialExecutor`` (the default) runs
groups one after another in this process; ``RayExecutor`` runs them on Ray workers. An executor
may carry ``device``: the device kind its workers compute on, which the planner then keys cells
by (a Ray driver may have no GPU while its workers do).
"""

from __future__ import annotations

EXECUTORS = ("serial", "ray")


def make_executor(name: str, suite, **options):
    """The executor called ``name`` for ``suite`` (None: the runner's default, serial)."""
    if name == "serial":
        unused = sorted(k for k, v in options.items() if v is not None)
        if unused:
            flags = ", ".join("--" + k.replace("_", "-") for k in unused)
            raise ValueError(f"{flags} only apply to --executor ray")
        return None
    if name == "ray":
        from .ray_executor import RayExecutor

        return RayExecutor(suite, **{k: v for k, v in options.items() if v is not None})
    raise ValueError(f"unknown executor {name!r}; valid: {', '.join(EXECUTORS)}")
