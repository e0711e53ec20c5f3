"""The words and numbers every writer shares: a number and its interval as text, what the
bootstrap resampled, the caption (what the columns, intervals and marks mean) and the calibration
set in one line."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from .board import DREF, VSBEST, Board
from .stats import QUESTION


def number_text(v: float, signed: bool) -> str:
    v = round(float(v), 1) + 0.0  # no "-0.0"
    return f"{v:+.1f}" if signed else f"{v:.1f}"


def cell_text(table: pd.DataFrame, idx: tuple, col: str, intervals: bool = True,
              signed: bool | None = None) -> str:
    """'80.0 [73.3, 86.0]' (signed for Δ columns, or as ``signed`` says), '–' when absent."""
    v = table.at[idx, col] if col in table else np.nan
    if pd.isna(v):
        return "–"
    if signed is None:
        signed = col in (DREF, VSBEST) or col.endswith(" vs best")
    text = number_text(v, signed)
    lo, hi = table.at[idx, f"{col} lo"], table.at[idx, f"{col} hi"]
    if intervals and pd.notna(lo):
        text += f" [{number_text(lo, signed)}, {number_text(hi, signed)}]"
    return text


def resampling_text(board: Board) -> str:
    """What the bootstrap resampled per task: 'synth_scienceqa: questions; synth_vqav2: images
    (150 questions in 60 images)'."""
    parts = []
    for t in board.tasks:
        unit, c, n = board.clusters.get(t, (QUESTION, None, None))
        parts.append(f"{t}: questions" if unit == QUESTION else f"{t}: {unit}s ({n} questions in {c} {unit}s)")
    return "; ".join(parts)


def caption(board: Board) -> list[str]:
    """What the columns, intervals and marks mean (one sentence per item)."""
    pct = f"{100 * board.level:g} %"
    multi = len(board.runs) > 1
    units = resampling_text(board)
    lines = [
        "Accuracy in percent from the simulated (fake-quant) model; rows are (model, variant, scheme)."
        + (f" Each number is the mean over {len(board.runs)} runs (calibration seeds)." if multi else ""),
        (f"[lo, hi]: {pct} interval — mean over runs ± t · se, where se² adds the seed-to-seed variance "
         "(divided by the number of runs) and the variance from resampling each task's clusters with "
         f"their questions together (paired bootstrap, {board.n_resamples} resamples); "
         "Welch–Satterthwaite degrees of freedom."
         if multi else
         f"[lo, hi]: {pct} percentile interval from a bootstrap over each task's clusters, their "
         f"questions kept together ({board.n_resamples} resamples, the same resamples for every row, so "
         "differences are paired by question; tasks resampled separately for Avg)."),
        f"Cluster unit resampled — {units}.",
        "Avg: mean of the task columns.",
    ]
    if board.references:
        refs = "; ".join(f"{m}: {d}" for m, d in board.reference_desc.items()) if len(board.references) > 1 \
            else next(iter(board.reference_desc.values()))
        lines.append(f"Δ ref: Avg minus the same model's reference row — {refs}; paired interval.")
    if VSBEST in board.table:
        lines.append("vs best: Avg minus the best other variant of the same model and scheme (for the best "
                     "row: its lead over the runner-up), paired interval.")
        lines.append(f"Bold: the highest mean of its model and scheme, and the paired {pct} interval of its "
                     "gap to every other variant excludes 0 (a significant lead). Italic: tied for best — the "
                     "highest mean, or a mean whose gap to it is not significant (no bold in that column "
                     "then). The reference row and controls (variants that quantize nothing) are not ranked.")
    return lines


def calibration_text(records: list[dict]) -> str:
    """'32 train questions of synth_scienceqa (synth-v4), seeds 0, 1' — one entry per spec but the seed."""
    specs: dict[str, set] = {}
    for r in records:
        c = {k: v for k, v in (r.get("calibration") or {}).items() if k not in ("batch_size", "digest")}
        if c:
            seed = c.pop("seed", None)
            specs.setdefault(json.dumps(c, sort_keys=True), set()).add(seed)
    out = []
    for spec, seeds in specs.items():
        c = json.loads(spec)
        text = f"{c.get('n', '?')} {c.get('split', '?')} questions of {c.get('task', '?')}"
        if c.get("data_version"):
            text += f" ({c['data_version']})"
        seeds = sorted((s for s in seeds if s is not None), key=str)
        if seeds:
            text += (", seed " if len(seeds) == 1 else ", seeds ") + ", ".join(map(str, seeds))
        out.append(text)
    return "; ".join(sorted(out))

