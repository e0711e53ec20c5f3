"""One leaderboard over several runs of the same suite (calibration seeds): mean ± spread per cell.

With a few dozen calibration samples, which samples are drawn moves a quantized cell by more than
its evaluation standard error (the default suite's W4A4 rows moved by up to 4 points between two
seeds), so a method comparison for a paper should average over seeds and show the spread. Each
run folder keeps its own records and leaderboard; this reads them and writes
``leaderboard.{md,csv}`` for the set: per cell the mean over runs, ± the sample standard
deviation across runs, and the range of the average.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd

from .leaderboard import REFERENCE_METHOD, build_table, score_columns
from .records import read_records


def run_tables(results_dirs: Sequence[str | Path]) -> dict[str, pd.DataFrame]:
    """The numeric accuracy table of each run folder, keyed by folder; ``attrs["seeds"]``: its seeds."""
    tables = {}
    for d in results_dirs:
        d = Path(d)
        records = read_records(d / "records.jsonl")
        if not records:
            raise FileNotFoundError(f"no records in {d / 'records.jsonl'}; run the suite there first")
        table = build_table(records)
        cols = score_columns(table)
        if table.empty or not cols:
            raise ValueError(f"{d}: no successful accuracy records to tabulate")
        key = str(d)
        if key in tables:
            raise ValueError(f"results folder {d} given twice")
        tables[key] = table[cols].copy()
        tables[key].attrs["seeds"] = sorted({r.get("seed") for r in records if r.get("status") == "ok"})
    return tables


def aggregate(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Mean, sample standard deviation and run count per cell over the runs' tables.

    Columns: ``<col> mean``, ``<col> sd`` and ``<col> runs`` for every task, Avg and Δ fp16; a
    cell missing from some runs is averaged over the runs that have it (its ``runs`` says how many).
    """
    if len(tables) < 2:
        raise ValueError(f"aggregating needs at least two runs, got {len(tables)}")
    stacked = pd.concat(tables, names=["run"])
    by_cell = stacked.groupby(level=["model", "method", "scheme"], sort=False)
    mean, sd, count = by_cell.mean(), by_cell.std(ddof=1), by_cell.count()
    out = pd.DataFrame(index=mean.index)
    for col in mean.columns:
        out[f"{col} mean"] = mean[col]
        out[f"{col} sd"] = sd[col]
        out[f"{col} runs"] = count[col]
    if "Avg" in mean.columns:
        out["Avg min"] = by_cell["Avg"].min()
        out["Avg max"] = by_cell["Avg"].max()
    return out.sort_index(level=["model", "scheme", "method"], sort_remaining=False)


def _display(agg: pd.DataFrame, n_runs: int) -> pd.DataFrame:
    cols = [c[:-len(" mean")] for c in agg.columns if c.endswith(" mean")]
    out = pd.DataFrame(index=agg.index)
    for col in cols:
        cells = []
        for idx in agg.index:
            m, s, k = agg.at[idx, f"{col} mean"], agg.at[idx, f"{col} sd"], agg.at[idx, f"{col} runs"]
            if pd.isna(m):
                cells.append("–")
                continue
            text = f"{m:+.1f}" if col == "Δ fp16" else f"{m:.1f}"
            if pd.notna(s) and idx[1] != REFERENCE_METHOD:
                text += f" ± {s:.1f}"
            if k < n_runs:
                text += f" ({k} runs)"
            cells.append(text)
        out[col] = cells
    if "Avg min" in agg:
        out["Avg range"] = [f"{lo:.1f}–{hi:.1f}" for lo, hi in zip(agg["Avg min"], agg["Avg max"])]
    return out.reset_index().rename(columns={"model": "Model", "method": "Method", "scheme": "Scheme"})


def write_aggregate(results_dirs: Sequence[str | Path], output: str | Path) -> dict[str, Path]:
    """Write ``leaderboard.{md,csv}`` over several run folders into ``output``; returns the paths."""
    tables = run_tables(results_dirs)
    agg = aggregate(tables)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    paths = {"md": output / "leaderboard.md", "csv": output / "leaderboard.csv"}
    agg.reset_index().to_csv(paths["csv"], index=False, float_format="%.4f")
    notes = (f"Mean over {len(tables)} runs ± sample standard deviation across runs (fp16 rows: no "
             f"calibration, shown without spread); Avg range: lowest and highest run average. Runs: "
             + "; ".join(f"{Path(d).name} (seed {t.attrs['seeds']})" for d, t in tables.items()) + ".\n")
    table = _display(agg, len(tables))
    paths["md"].write_text(table.to_markdown(index=False, tablefmt="github", disable_numparse=True)
                           + "\n\n" + notes)
    return paths
