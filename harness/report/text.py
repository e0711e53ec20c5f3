"""The leaderboard as text: Markdown (the table and its notes), CSV (every number and both interval
bounds) and LaTeX (booktabs)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .board import AVG, DREF, Board, what_ran
from .describe import calibration_text, caption, cell_text, number_text
from .rows import unresolved_failures, variant_of


def markdown_table(board: Board) -> str:
    """leaderboard.md: the table (bold: a lead, italic: a tie) and the notes under it."""
    md = formatted(board, "md")
    return md.to_markdown(index=False, tablefmt="github", disable_numparse=True) + "\n\n" + notes_text(board)


def latex_table(board: Board) -> str:
    """leaderboard.tex: the table as booktabs (bold: a lead, italic: a tie)."""
    return booktabs(formatted(board, "tex"))


def write_csv(board: Board, path: Path) -> None:
    """leaderboard.csv: the board's table with every column (values, bounds, marks, counts)."""
    board.table.reset_index().to_csv(path, index=False, float_format="%.4f")


def formatted(board: Board, style: str) -> pd.DataFrame:
    """Display strings: style "md" (**lead**, *tie*), "tex" or "html" (class names added by the page)."""
    table = board.table
    wrap = {"md": {"lead": ("**", "**"), "tie": ("*", "*")},
            "tex": {"lead": ("\\textbf{", "}"), "tie": ("\\textit{", "}")},
            "html": {"lead": ("<b>", "</b>"), "tie": ("<i>", "</i>")}}[style]
    out = pd.DataFrame(index=table.index)
    for col in board.stat_columns:
        cells = []
        for idx in table.index:
            if col == DREF and idx == board.references.get(idx[0]):
                cells.append("ref")
                continue
            text = cell_text(table, idx, col)
            mark = table.at[idx, f"{col} mark"] if f"{col} mark" in table else ""
            if mark:
                text = f"{wrap[mark][0]}{text}{wrap[mark][1]}"
            cells.append(text)
        out[col] = cells
    if "decode ms/tok" in table:
        out["decode ms/tok"] = table["decode ms/tok"].map(lambda v: "–" if pd.isna(v) else f"{v:.2f}")
        out["peak GiB"] = table["peak GiB"].map(lambda v: "–" if pd.isna(v) else f"{v:.2f}")
        out["kernel"] = table["kernel"].fillna("–")
        out = out.rename(columns=board.perf_column_name)  # the headers say which card (perf_note)
    if f"{AVG} min" in table:
        out[f"{AVG} range"] = [f"{number_text(lo, False)}–{number_text(hi, False)}" if pd.notna(lo) else "–"
                               for lo, hi in zip(table[f"{AVG} min"], table[f"{AVG} max"])]
    if (table["runs"] < len(board.runs)).any():
        out["runs"] = table["runs"].astype(int).astype(str)
    return out.reset_index().rename(columns={"model": "Model", "variant": "Variant", "scheme": "Scheme"})


def _ran_lines(board: Board) -> list[str]:
    ran = what_ran(board)
    commits = sorted({(c or "?")[:12] + (" (dirty)" if dirty else "") for c, dirty in ran.commits})
    lines = [f"{len(ran.records)} accuracy records; device: {', '.join(ran.devices)}; dtypes/kernels: "
             f"{', '.join(ran.dtypes)}; commit: {', '.join(commits)}."]
    cal = calibration_text(ran.records)
    if cal:
        lines.append(f"Calibration: {cal}.")
    return lines


def notes_text(board: Board) -> str:
    failed = unresolved_failures(board.records)
    lines = caption(board) + _ran_lines(board)
    if len(board.runs) > 1:
        lines.append("Runs: " + "; ".join(f"{run.label} (seed {run.seeds})" for run in board.runs) + ".")
    if failed:
        lines.append(f"{len(failed)} failed record(s): " + "; ".join(
            f"{variant_of(r)}/{r.get('scheme')}/{r.get('task')}: {str(r.get('error'))[:80]}" for r in failed[:5]))
    lines += board.notes
    return "\n".join(lines) + "\n"


def booktabs(df: pd.DataFrame) -> str:
    from tabulate import tabulate

    def esc(v: str) -> str:
        return (str(v).replace("±", "$\\pm$").replace("–", "--").replace("_", "\\_")
                .replace("Δ", "$\\Delta$"))

    body = df.map(esc)
    headers = [esc(c) for c in df.columns]
    return tabulate(body.values.tolist(), headers=headers, tablefmt="latex_booktabs",
                    disable_numparse=True).replace("\\textbackslash{}", "\\").replace("\\{", "{") \
        .replace("\\}", "}").replace("\\$", "$").replace("\\_", "_").replace("\\textasciicircum{}", "^") + "\n"

