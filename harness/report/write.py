"""Write a board's files: leaderboard.{md,csv,tex,html}, contrasts.{md,csv} and the plots.

The writers sit above the board (``harness.leaderboard``: data model, statistics, Markdown/LaTeX
formatting) and beside each other (``contrasts``, ``page``, ``plots``); this module calls them all,
so nothing below it imports a writer and the reporting code has no import cycle.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Sequence

from .contrasts import contrast_pairs, write_contrasts
from .board import Board, Run, booktabs, build_board, formatted, notes_text
from .page import write_page
from .plots import write_plots
from ..records import read_records, temp_name
from .stats import DEFAULT_LEVEL, DEFAULT_RESAMPLES


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
    board.table.reset_index().to_csv(paths["csv"], index=False, float_format="%.4f")
    md = formatted(board, "md")
    paths["md"].write_text(md.to_markdown(index=False, tablefmt="github", disable_numparse=True)
                           + "\n\n" + notes_text(board))
    paths["tex"].write_text(booktabs(formatted(board, "tex")))
    figures = write_plots(board, output) if plots else {}
    write_page(board, paths["html"], figures)
    paths.update({f"plot {name}": p for name, p in figures.items()})
    paths.update(write_contrasts(board, output, pairs))
    return paths


def write_leaderboard(results_dir: str | Path, with_stderr: bool = False, n_resamples: int = DEFAULT_RESAMPLES,
                      seed: int = 0, level: float = DEFAULT_LEVEL,
                      perf_records: list[dict] | None = None, plots: bool = True,
                      contrasts: Sequence[str] = ()) -> dict[str, Path]:
    """Write leaderboard.{md,csv,tex,html} and plots next to records.jsonl; returns the paths.

    ``with_stderr`` is accepted for the CLI's ``--stderr`` and ignored: every number carries its
    interval now.
    """
    results_dir = Path(results_dir)
    records = read_records(results_dir / "records.jsonl")
    if not records:
        raise FileNotFoundError(f"no records in {results_dir / 'records.jsonl'}; run a suite first")
    board = build_board([Run(results_dir.name, results_dir, records)], n_resamples=n_resamples, seed=seed,
                        level=level, perf_records=perf_records)
    return write_board(board, results_dir, plots=plots, contrasts=contrasts)
