"""One leaderboard over several runs of the same suite (calibration seeds): mean and interval per cell.

With a few dozen calibration samples, which samples are drawn moves a quantized cell by more than
its evaluation standard error (the default suite's W4A4 rows moved by up to 4 points between two
seeds), so a method comparison for a paper should average over seeds. Each run folder keeps its own
records and leaderboard; this reads them and writes the same tables, page and plots for the set:
per cell the mean over runs with an interval that adds the seed-to-seed spread to the question
resampling noise (harness.stats.combine_runs), paired across rows by question and by run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from .leaderboard import Board, Run, build_board, write_board
from .records import read_records
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


SETTINGS = ("limit", "dtype", "calibration (but the seed)")


def _cells(run: Run) -> dict[tuple, dict[str, str]]:
    """Per cell (model, variant, scheme, task) of a run's latest successful accuracy records, the
    settings that must match for two runs to be seeds of one suite (the seed may differ)."""
    from .leaderboard import latest_ok

    df = latest_ok(run.records)
    recs = df[df["metric"] == "accuracy"].to_dict("records") if not df.empty else []

    def text(v) -> str:
        if v is None or (isinstance(v, float) and v != v):  # absent, or a NaN from a column others have
            return "null"
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        return v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)

    out = {}
    for r in recs:
        cal = r.get("calibration")
        cal = {k: v for k, v in cal.items() if k not in ("seed", "digest")} if isinstance(cal, dict) else None
        out[(r["model"], r["variant"], r["scheme"], r["task"])] = {
            "limit": text(r.get("limit")), "dtype": text(r.get("dtype")), SETTINGS[2]: text(cal)}
    return out


def check_comparable(runs: Sequence[Run]) -> list[str]:
    """Refuse (``ValueError`` saying exactly what differs) to tabulate records that are not one
    suite: one folder whose latest records were made with different ``limit`` s (rows over
    different question sets), or several folders where one cell has another limit, dtype or
    calibration (only the seed may differ between seeds of a run). Tasks or models present in
    some runs only are allowed (an unfinished run) and returned as notes for the table."""
    cells = [_cells(run) for run in runs]
    for run, cs in zip(runs, cells):
        limits = sorted({c["limit"] for c in cs.values()})
        if len(limits) > 1:
            raise ValueError(f"{run.folder}: its records were made with different `limit`s ({', '.join(limits)}; "
                             "null: all questions), so rows would compare different question sets; re-run "
                             "the suite with one limit into a fresh --output")
    if len(runs) < 2:
        return []
    diffs = []
    for key in SETTINGS:
        for k in range(1, len(runs)):
            cell = next((c for c in cells[0] if c in cells[k] and cells[0][c][key] != cells[k][c][key]), None)
            if cell is not None:
                diffs.append(f"{key}: {runs[0].label} {cells[0][cell][key]}; {runs[k].label} {cells[k][cell][key]} "
                             f"(e.g. cell {' / '.join(map(str, cell))})")
    if diffs:
        raise ValueError("these results folders are not runs of one suite (only the seed may differ), so "
                         "they cannot be combined: " + " | ".join(diffs)
                         + ". Tabulate each alone, or re-run one with the other's settings")
    notes = []
    for what, pos in (("tasks", 3), ("models", 0)):
        have = [{c[pos] for c in cs} for cs in cells]
        every = set.union(*have)
        missing = [f"{run.label} lacks {', '.join(sorted(every - h))}" for run, h in zip(runs, have) if every - h]
        if missing:
            notes.append(f"not every run has the same {what} ({'; '.join(missing)}): their cells are "
                         "averaged over the runs that have them")
    return notes


def _seed_notes(runs: list[Run]) -> list[str]:
    seen: dict[tuple, str] = {}
    notes = []
    for run in runs:
        seeds = tuple(sorted({r.get("seed") for r in run.records if r.get("status") == "ok"}, key=str))
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


def write_aggregate(results_dirs: Sequence[str | Path], output: str | Path, n_resamples: int = DEFAULT_RESAMPLES,
                    seed: int = 0, level: float = DEFAULT_LEVEL, plots: bool = True,
                    contrasts: Sequence[str] = ()) -> dict[str, Path]:
    """Write leaderboard.{md,csv,tex,html}, contrasts and the plots over several run folders into ``output``."""
    return write_board(aggregate(results_dirs, n_resamples, seed, level), Path(output), plots=plots,
                       contrasts=contrasts)
