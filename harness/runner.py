"""Run a suite: plan its cells once, skip the recorded ones, execute the rest group by group.

One planner (``harness.cells``) decides cells, identities and groups; an executor runs the
pending groups (serially here, or on Ray: ``harness.executors``) through ``GroupWorker``; this
process alone appends the records, each the moment its cell finishes (nothing finished is lost,
and a re-run skips exactly the cells whose inputs are unchanged). A cell that raises is recorded
``failed`` with its error and the suite goes on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch

from .cells import Cell, CellGroup, group_cells, plan_cells
from .records import append_record, read_records
from .suite_config import Suite

log = logging.getLogger("qvlm_bench")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was requested but no CUDA GPU is visible; use --device cpu")
    return device


@dataclass
class RunSummary:
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    records: list[dict] = field(default_factory=list)

    def failures(self) -> list[dict]:
        return [r for r in self.records if r.get("status") != "ok"]


class SerialExecutor:
    """Runs groups one after another in this process (the default)."""

    name = "serial"

    def __init__(self, suite: Suite, device: str, show_progress: bool = True):
        from .worker import GroupWorker

        self.worker = GroupWorker(suite, device, show_progress=show_progress)

    def execute(self, groups: list[CellGroup]) -> Iterator[list[dict]]:
        for group in groups:
            yield from self.worker.run_group(group)


class SuiteRunner:
    def __init__(self, suite: Suite, *, show_progress: bool = True,
                 on_record: Callable[[dict], None] | None = None, executor=None):
        self.suite = suite
        self.out = suite.output_dir
        self.records_path = self.out / "records.jsonl"
        self.show_progress = show_progress
        self.on_record = on_record
        # an executor whose workers compute elsewhere (Ray) says on what; cells are keyed by it
        self.device = getattr(executor, "device", None) or resolve_device(suite.device)
        if suite.threads:
            torch.set_num_threads(suite.threads)
        self.executor = executor or SerialExecutor(suite, self.device, show_progress)
        self._cells: list[Cell] | None = None

    def cells(self) -> list[Cell]:
        if self._cells is None:
            self._cells = plan_cells(self.suite, self.device)
        return self._cells

    def done_keys(self) -> set[str]:
        return {r["config_hash"] for r in read_records(self.records_path) if r.get("status") == "ok"}

    def pending(self) -> tuple[list[CellGroup], int]:
        """The groups still to run, and how many cells are already recorded."""
        done = self.done_keys()
        cells = self.cells()
        todo = [c for c in cells if c.key not in done]
        return group_cells(todo), len(cells) - len(todo)

    def run(self) -> RunSummary:
        """Run the pending cells as the results folder's only driver (``harness.resultsdir``: checked
        writable, locked, leftovers of killed runs cleaned) before anything is loaded."""
        from .resultsdir import open_results_dir

        with open_results_dir(self.out):
            return self._run()

    def _run(self) -> RunSummary:
        from tqdm.auto import tqdm

        summary = RunSummary()
        groups, summary.skipped = self.pending()
        if not groups:
            log.info("all %d cells already recorded in %s", summary.skipped, self.records_path)
            return summary
        total = sum(len(g.cells) for g in groups)
        bar = tqdm(total=total, desc=f"suite {self.suite.name}", unit="cell", disable=not self.show_progress)
        try:
            for records in self.executor.execute(groups):
                for rec in records:
                    self._emit(summary, rec)
                if records:
                    r = records[-1]
                    bar.set_postfix_str(f"{r.get('variant')} {r.get('scheme')} {r.get('task')}")
                bar.update(1)
        finally:
            bar.close()
        return summary

    def _emit(self, summary: RunSummary, rec: dict) -> None:
        append_record(self.records_path, rec)
        summary.records.append(rec)
        if rec["status"] == "ok":
            summary.ok += 1
        else:
            summary.failed += 1
        if self.on_record:
            self.on_record(rec)


def run_suite(suite: Suite, **kwargs) -> RunSummary:
    return SuiteRunner(suite, **kwargs).run()


def failure_lines(records: Iterable[dict]) -> list[str]:
    """One line per failed cell: what it was and its error's first line."""
    out = []
    for r in records:
        if r.get("status") == "ok":
            continue
        err = str(r.get("error") or "").strip().splitlines()
        out.append(f"{r.get('model')} / {r.get('variant') or r.get('method')} / {r.get('scheme')} / "
                   f"{r.get('task')}: {err[0] if err else 'failed'}")
    return out
