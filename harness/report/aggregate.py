"""One leaderboard over several runs of the same suite (calibration seeds): mean and interval per cell.

With a few dozen calibration samples, which samples are drawn moves a quantized cell by more than
its evaluation standard error (the default suite's W4A4 rows moved by up to 4 points between two
seeds), so a method comparison for a paper should average over seeds. Each run folder keeps its own
records and leaderboard; this reads them into one board for the set (``write.write_aggregate``
writes its tables, page and plots): per cell the mean over runs with an interval that adds the
seed-to-seed spread to the question resampling noise (harness.report.stats.combine_runs), paired
across rows by question and by run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..records import read_records
from .board import Board, Run, build_board
from .stats import DEFAULT_LEVEL, DEFAULT_RESAMPLES


def read_runs(results_dirs: Sequence[str | Path]) -> list[Run]:
    """The runs of several results folders, labelled by folder name (the path where names repeat)."""
    if len(results_dirs) < 2:
        raise ValueError(f"aggregating needs at least two runs, got {len(results_dirs)}")
    folders = [Path(d) for d in results_dirs]
    resolved = [f.resolve() for f in folders]
    dup = next((f for i, f in enumerate(folders) if resolved[i] in resolved[:i]), None)
    if dup is not None:
        raise ValueError(f"results folder {dup} given twice")
    names = [f.name for f in folders]
    runs = []
    for folder, name in zip(folders, names):
        records = read_records(folder / "records.jsonl")
        if not records:
            raise FileNotFoundError(f"no records in {folder / 'records.jsonl'}; run the suite there first")
        runs.append(Run(name if names.count(name) == 1 else str(folder), folder, records))
    return runs


def _seed_notes(runs: list[Run]) -> list[str]:
    seen: dict[tuple, str] = {}
    notes = []
    for run in runs:
        seeds = tuple(run.seeds)
        if seeds in seen:
            notes.append(f"runs {seen[seeds]} and {run.label} have the same seed(s) {list(seeds)}: their "
                         "spread is not calibration noise, and the intervals will be too narrow")
        seen.setdefault(seeds, run.label)
    return notes


def aggregate(results_dirs: Sequence[str | Path], n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
              level: float = DEFAULT_LEVEL) -> Board:
    """The board over several runs: mean per cell, intervals combining seeds and questions."""
    runs = read_runs(results_dirs)
    board = build_board(runs, n_resamples=n_resamples, seed=seed, level=level)
    board.notes[:0] = _seed_notes(runs)
    return board

