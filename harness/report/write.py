"""Write a board's files: leaderboard.{md,csv,tex,html}, contrasts.{md,csv} and the plots, all or
nothing (staged in a temporary folder, then renamed into place).

The top of ``harness.report``: the one module that calls every writer (``text``, ``page``,
``plots``, ``contrasts``), which all sit above the board (``board``: the data model and its
intervals) and beside each other, so the reporting code has no import cycle. The entry points
read results folders: ``write_leaderboard`` (one run) and ``write_aggregate`` (several seeds).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Sequence

from ..records import read_records, temp_name
from .aggregate import aggregate
from .board import Board, Run, build_board
from .contrasts import contrast_pairs, write_contrasts
from .page import write_page
from .plots import write_plots
from .stats import DEFAULT_LEVEL, DEFAULT_RESAMPLES
from .text import latex_table, markdown_table, write_csv


def write_board(board: Board, output: Path, plots: bool = True, contrasts: Sequence[str] = ()) -> dict[str, Path]:
    """Write leaderboard.{md,csv,tex,html}, contrasts.{md,csv} (the default levers plus
    ``contrasts``, "A:B") and (``plots``) the plots into ``output``; returns the paths."""
    pairs = contrast_pairs(board, contrasts)  # a bad --contrast fails before anything is written
    output.mkdir(parents=True, exist_ok=True)
    # every file is written in a staging folder, then renamed into place: a kill while tabulating
    # leaves the previous tables whole (never a 0-byte leaderboard.csv beside a missing page)
    staging = temp_name(output / "leaderboard")
    staging.mkdir()
    try:
        written = _write_board_files(board, staging, plots, pairs)
        final = {}
        for key, p in written.items():
            os.replace(p, output / p.name)
            final[key] = output / p.name
        if not pairs:  # nothing to contrast: an older pair of files is stale
            for name in ("contrasts.md", "contrasts.csv"):
                (output / name).unlink(missing_ok=True)
        return final
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_board_files(board: Board, output: Path, plots: bool, pairs) -> dict[str, Path]:
    paths = {ext: output / f"leaderboard.{ext}" for ext in ("md", "csv", "tex", "html")}
    write_csv(board, paths["csv"])
    paths["md"].write_text(markdown_table(board))
    paths["tex"].write_text(latex_table(board))
    figures = write_plots(board, output) if plots else {}
    write_page(board, paths["html"], figures)
    paths.update({f"plot {name}": p for name, p in figures.items()})
    paths.update(write_contrasts(board, output, pairs))
    return paths


def write_leaderboard(results_dir: str | Path, with_stderr: bool = False, n_resamples: int = DEFAULT_RESAMPLES,
                      seed: int = 0, level: float = DEFAULT_LEVEL,
                      perf_records: list[dict] | None = None, plots: bool = True,
                      contrasts: Sequence[str] = (), out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write leaderboard.{md,csv,tex,html} and plots next to records.jsonl (or into ``out_dir``);
    returns the paths.

    ``with_stderr`` is accepted for the CLI's ``--stderr`` and ignored: every number carries its
    interval now.
    """
    results_dir = Path(results_dir)
    records = read_records(results_dir / "records.jsonl")
    if not records:
        raise FileNotFoundError(f"no records in {results_dir / 'records.jsonl'}; run a suite first")
    board = build_board([Run(results_dir.name, results_dir, records)], n_resamples=n_resamples, seed=seed,
                        level=level, perf_records=perf_records)
    out = Path(out_dir) if out_dir else results_dir
    out.mkdir(parents=True, exist_ok=True)
    return write_board(board, out, plots=plots, contrasts=contrasts)


def write_aggregate(results_dirs: Sequence[str | Path], output: str | Path, n_resamples: int = DEFAULT_RESAMPLES,
                    seed: int = 0, level: float = DEFAULT_LEVEL, plots: bool = True,
                    contrasts: Sequence[str] = ()) -> dict[str, Path]:
    """Write leaderboard.{md,csv,tex,html}, contrasts and the plots over several run folders into ``output``."""
    return write_board(aggregate(results_dirs, n_resamples, seed, level), Path(output), plots=plots,
                       contrasts=contrasts)
