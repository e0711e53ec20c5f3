"""Paired differences between two named variants — a lever against its control — with intervals.

The leaderboard ranks variants; a contrast answers "what does this lever add": A − B for every
(model, scheme) that has both rows, per task and on Avg, from the same paired resamples (and, over
several runs, the same seed-aware intervals) as the leaderboard's own gaps. The engine's clipping
lever (``X+clip`` against ``X``) is contrasted by default; others come from the command line
(``qvlm-bench table DIR --contrast qvlm-cdm:qvlm-layerwise``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from .board import AVG, Board
from .describe import cell_text, resampling_text
from .stats import combine_runs


def variants_of(board: Board) -> list[str]:
    return sorted({row[1] for row in board.rows})


def parse_contrast(text: str, known: Sequence[str]) -> tuple[str, str]:
    """``"A:B"`` into (A, B), both variant labels of the table (a label may itself hold a colon)."""
    cuts = [i for i, ch in enumerate(text) if ch == ":"]
    for i in cuts:
        a, b = text[:i].strip(), text[i + 1:].strip()
        if a in known and b in known:
            if a == b:
                raise ValueError(f"--contrast {text!r}: a variant against itself is always 0")
            return a, b
    hint = f"known variants: {', '.join(known)}"
    if not cuts:
        raise ValueError(f"--contrast {text!r}: write it as A:B (A − B), e.g. --contrast rtn+clip:rtn; {hint}")
    raise ValueError(f"--contrast {text!r}: both sides must be variants of this table; {hint}")


# The levers the engine adds to any method, as (record field, value with the lever, without it):
# a default contrast pairs two rows whose records differ in exactly one of these and nothing else.
LEVERS = (("clip", True, False), ("modality", "image-text", "text"))


def _row_fields(rec: dict) -> dict:
    """What a record says its row is: the method and its options, and each lever's setting."""
    return {"method": rec.get("method"),
            "options": json.dumps(rec.get("method_options") or {}, sort_keys=True, default=str),
            "clip": bool(rec.get("clip")),
            "modality": (rec.get("calibration") or {}).get("modality", "image-text")}


def default_contrasts(board: Board) -> list[tuple[str, str]]:
    """Each lever present in the table against its control, paired by the rows' record fields
    (never by parsing labels): ``X+clip − X``, ``X − X (text calib)`` (image-text − text)."""
    fields: dict[str, dict] = {}
    for rec in board.records:
        if rec.get("status") == "ok" and rec.get("metric") == "accuracy" and rec.get("variant"):
            fields.setdefault(rec["variant"], _row_fields(rec))
    pairs = []
    for a, fa in sorted(fields.items()):
        for b, fb in sorted(fields.items()):
            diff = [k for k in fa if fa[k] != fb[k]]
            if len(diff) == 1 and any(diff[0] == key and fa[key] == on and fb[key] == off
                                      for key, on, off in LEVERS):
                pairs.append((a, b))
    return pairs


def contrast_table(board: Board, pairs: Iterable[tuple[str, str]]) -> pd.DataFrame:
    """Index (model, scheme, contrast "A − B"); per task and Avg: value, lo, hi in points, and
    ``<col> sig`` (the interval excludes 0). Pairs absent from a (model, scheme) are skipped."""
    boot, rows = board.bootstrap, board.rows
    if boot is None:
        raise ValueError("this board has no resamples to draw contrasts from (build it with build_board)")
    index = {row: i for i, row in enumerate(rows)}
    found = []  # (model, scheme, a, b, ia, ib)
    for a, b in pairs:
        for model, scheme in sorted({(r[0], r[2]) for r in rows}):
            ia, ib = index.get((model, a, scheme)), index.get((model, b, scheme))
            if ia is not None and ib is not None:
                found.append((model, scheme, a, b, ia, ib))
    cols = [*board.tasks, AVG]
    out = pd.DataFrame(index=pd.MultiIndex.from_tuples([(m, s, f"{a} − {b}") for m, s, a, b, *_ in found],
                                                       names=["model", "scheme", "contrast"]))
    if not found:
        return out
    w = np.zeros((len(found), len(rows)))
    for k, (*_, ia, ib) in enumerate(found):
        w[k, ia], w[k, ib] = 1.0, -1.0
    T = len(board.tasks)
    for col in cols:
        weights = {t: w / T for t in board.tasks} if col == AVG else {col: w}
        iv = combine_runs(*boot.statistic(weights), level=board.level, bounds=(-1.0, 1.0))
        out[col], out[f"{col} lo"], out[f"{col} hi"] = 100 * iv.value, 100 * iv.lo, 100 * iv.hi
        out[f"{col} sig"] = iv.excludes_zero()
    return out


def contrasts_markdown(board: Board, table: pd.DataFrame) -> str:
    """The contrasts as a markdown table (bold: the interval excludes 0) and a caption."""
    cols = [*board.tasks, AVG]
    lines = ["| Model | Scheme | Contrast | " + " | ".join(cols) + " |",
             "|" + "---|" * (3 + len(cols))]
    for idx, r in table.iterrows():
        cells = [cell_text(table, idx, c, signed=True) for c in cols]
        cells = [f"**{t}**" if t != "–" and r[f"{c} sig"] else t for c, t in zip(cols, cells)]
        lines.append("| " + " | ".join(idx) + " | " + " | ".join(cells) + " |")
    pct = f"{100 * board.level:g} %"
    runs = len(board.runs)
    lines += ["", f"A − B in accuracy points on the same questions{' and seeds' if runs > 1 else ''}, "
              f"with the leaderboard's paired {pct} interval"
              + (f" (mean over {runs} runs; seed-to-seed and cluster-resampling variance)" if runs > 1 else
                 " (bootstrap over each task's clusters, paired by question)")
              + f". Cluster unit resampled — {resampling_text(board)}."
              + " Bold: the interval excludes 0 — the lever changes accuracy at this level."]
    return "\n".join(lines) + "\n"


def contrast_pairs(board: Board, extra: Sequence[str] = ()) -> list[tuple[str, str]]:
    """The default levers plus ``extra`` ("A:B", checked against the table's variants)."""
    known = variants_of(board)
    return list(dict.fromkeys(default_contrasts(board) + [parse_contrast(t, known) for t in extra]))


def write_contrasts(board: Board, output: Path, pairs: Sequence[tuple[str, str]]) -> dict[str, Path]:
    """contrasts.{md,csv} in ``output``; an older pair of files is removed when there is nothing
    to contrast."""
    stale = [output / "contrasts.md", output / "contrasts.csv"]
    if not pairs:
        for p in stale:
            p.unlink(missing_ok=True)
        return {}
    table = contrast_table(board, pairs)
    stale[0].write_text(contrasts_markdown(board, table))
    table.reset_index().to_csv(stale[1], index=False, float_format="%.4f")
    return {"contrasts md": stale[0], "contrasts csv": stale[1]}
