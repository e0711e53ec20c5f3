"""leaderboard.html: one self-contained page to share — what ran, the table with its intervals and
marks, the plots inline (base64 SVG), and the notes. No scripts, no network."""

from __future__ import annotations

import html
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd

from .board import AVG, DREF, PERF_COLUMNS, VSBEST, Board, what_ran
from .describe import calibration_text, caption, number_text
from .rows import unresolved_failures, variant_of

# what may stay literal in a data: URL inside a single-quoted attribute (not ', %, #, &, newlines)
_SVG_SAFE = " !\"$()*+,-./:;<=>?@[]^_`{|}~"

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: #1d2330; margin: 2em auto; max-width: 1320px; padding: 0 1.5em; }
h1 { font-size: 1.6em; margin: 0 0 .2em; } h2 { font-size: 1.2em; margin: 1.6em 0 .5em; border-bottom: 1px solid #d5d9e0; padding-bottom: .2em; }
.sub { color: #5a6272; margin: 0 0 1em; }
dl.ran { display: grid; grid-template-columns: max-content 1fr; gap: .25em 1.2em; margin: 0; }
dl.ran dt { font-weight: 600; color: #3a4252; } dl.ran dd { margin: 0; }
table.lb { border-collapse: collapse; font-variant-numeric: tabular-nums; margin: .5em 0; }
table.lb caption { caption-side: bottom; text-align: left; color: #4a5262; font-size: .9em; padding-top: .6em; max-width: 1200px; }
table.lb caption p { margin: .2em 0; }
table.lb th, table.lb td { border: 1px solid #cfd5de; padding: .3em .6em; }
table.lb thead th { background: #eef1f6; text-align: center; vertical-align: bottom; }
table.lb td.num { text-align: right; white-space: nowrap; }
table.lb td.txt { white-space: nowrap; }
table.lb .ci { display: block; font-size: .78em; color: #6b7384; }
table.lb tr.group td { border-top: 2px solid #8b93a3; }
table.lb tr.ref td { background: #f6f6f6; color: #444; }
table.lb td.lead { font-weight: 700; background: #dff3e3; }
table.lb td.tie { font-style: italic; background: #eef2fb; }
table.lb td.avg { border-left: 2px solid #8b93a3; }
.legend span { display: inline-block; padding: 0 .5em; margin: 0 .4em 0 1.2em; border: 1px solid #cfd5de; }
.legend span:first-child { margin-left: 0; }
.legend .lead { font-weight: 700; background: #dff3e3; } .legend .tie { font-style: italic; background: #eef2fb; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; border: 1px solid #e3e6eb; }
figcaption { color: #4a5262; font-size: .9em; margin-top: .3em; }
ul.notes { color: #4a5262; font-size: .9em; }
footer { margin-top: 2em; color: #7a8292; font-size: .85em; }
"""

PLOT_CAPTIONS = {
    "accuracy_by_scheme": "Accuracy of each variant per scheme (columns: Avg, then each task). Error bars: the "
                          "table's intervals; dashed line and grey band: the reference row and its interval.",
    "accuracy_vs_cost": "Avg accuracy against peak memory and decode latency (batch 1, from the perf records). "
                        "Circled points and the step line: the Pareto front — no other point has lower cost and "
                        "higher accuracy (point values; the intervals are drawn).",
}


def _e(v) -> str:
    return html.escape(str(v))


def _ran_items(board: Board) -> list[tuple[str, str]]:
    ran = what_ran(board)
    t = board.table
    models = list(dict.fromkeys(i[0] for i in t.index))
    items = [("Models", ", ".join(models))]
    if board.references:
        items.append(("Reference", "; ".join(f"{m}: {d}" for m, d in board.reference_desc.items())))
    items.append(("Variants", ", ".join(dict.fromkeys(i[1] for i in t.index))))
    items.append(("Schemes", ", ".join(s.upper() for s in dict.fromkeys(
        i[2] for i in sorted(t.index, key=lambda i: board.bits.get(i, (0, 0)), reverse=True)))))
    ns = []
    for task in board.tasks:
        n = t[f"{task} n"].dropna()
        ns.append(f"{task} ({int(n.max())} questions)" if len(n) else task)
    items.append(("Tasks", ", ".join(ns)))
    cal = calibration_text(ran.records)
    if cal:
        items.append(("Calibration", cal))
    items.append(("Device", ", ".join(ran.devices)))
    items.append(("dtype / kernel", ", ".join(ran.dtypes)))
    if ran.versions:
        items.append(("Software", ", ".join(f"{k} {'/'.join(sorted(v))}" for k, v in ran.versions.items())))
    commits = sorted({(c or "not recorded")[:12] + (" (dirty tree)" if dirty else "") for c, dirty in ran.commits})
    items.append(("Commit", ", ".join(commits)))
    stamps = ran.timestamps
    if stamps:
        items.append(("Ran", stamps[0][:16].replace("T", " ") + (f" to {stamps[-1][:16].replace('T', ' ')}"
                                                                  if stamps[-1][:16] != stamps[0][:16] else "")))
    if len(board.runs) > 1:
        items.append(("Runs", "; ".join(f"{run.label} (seed {', '.join(map(str, run.seeds))})" for run in board.runs)))
    items.append(("Intervals", f"{100 * board.level:g} %, {board.n_resamples} bootstrap resamples, seed {board.seed}"))
    return items


def _cell(board: Board, idx: tuple, col: str) -> str:
    t = board.table
    classes = ["num"] + (["avg"] if col == AVG else [])
    mark = t.at[idx, f"{col} mark"] if f"{col} mark" in t else ""
    if mark:
        classes.append(mark)
    v = t.at[idx, col] if col in t else np.nan
    if col == DREF and idx == board.references.get(idx[0]):
        return f'<td class="{" ".join(classes)}">ref</td>'
    if pd.isna(v):
        return f'<td class="{" ".join(classes)}">–</td>'
    signed = col in (DREF, VSBEST)
    fmt = (lambda x: number_text(x, True).replace("-", "−")) if signed else (lambda x: number_text(x, False))
    lo, hi = t.at[idx, f"{col} lo"], t.at[idx, f"{col} hi"]
    ci = f'<span class="ci">[{fmt(lo)}, {fmt(hi)}]</span>' if pd.notna(lo) else ""
    return f'<td class="{" ".join(classes)}">{fmt(v)}{ci}</td>'


def table_html(board: Board) -> str:
    t = board.table
    cols = board.stat_columns
    perf = [c for c in PERF_COLUMNS if c in t]
    multi_runs = (t["runs"] < len(board.runs)).any()
    head = ["Model", "Variant", "Scheme", *cols, *map(board.perf_column_name, perf)] + (["runs"] if multi_runs else [])
    out = ['<table class="lb">', "<caption>" + "".join(f"<p>{_e(line)}</p>" for line in caption(board)) + "</caption>",
           "<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr></thead>", "<tbody>"]
    last = None
    for idx in t.index:
        group = (idx[0], idx[2])
        cls = []
        if last is not None and group != last:
            cls.append("group")
        if idx == board.references.get(idx[0]):
            cls.append("ref")
        last = group
        cells = [f'<td class="txt">{_e(v)}</td>' for v in (idx[0], idx[1], idx[2].upper())]
        cells += [_cell(board, idx, c) for c in cols]
        for c in perf:
            v = t.at[idx, c]
            cells.append(f'<td class="num">{"–" if pd.isna(v) else (_e(v) if c == "kernel" else f"{v:.2f}")}</td>')
        if multi_runs:
            cells.append(f'<td class="num">{int(t.at[idx, "runs"])}</td>')
        out.append(f'<tr class="{" ".join(cls)}">' + "".join(cells) + "</tr>")
    out += ["</tbody>", "</table>"]
    return "\n".join(out)


def page_html(board: Board, plots: dict[str, Path]) -> str:
    suites = sorted({str(r.get("suite")) for r in what_ran(board).records if r.get("suite")})
    title = f"qvlm-bench leaderboard: {', '.join(suites) or 'results'}" + (
        f" (mean of {len(board.runs)} runs)" if len(board.runs) > 1 else "")
    models = list(dict.fromkeys(i[0] for i in board.table.index))
    sub = (f"Post-training quantization of {', '.join(models)}: {len(board.table)} rows, "
           f"{len(board.tasks)} tasks. Every number has a {100 * board.level:g} % interval; "
           "differences are paired over the same questions.")
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{_e(title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>",
             f"<h1>{_e(title)}</h1>", f'<p class="sub">{_e(sub)}</p>',
             "<h2>What ran</h2>", '<dl class="ran">']
    parts += [f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in _ran_items(board)]
    parts += ["</dl>", "<h2>Results</h2>",
              '<p class="legend"><span class="lead">bold</span>significant lead'
              '<span class="tie">italic</span>tied for best (no significant lead)'
              "<span>[lo, hi]</span>interval</p>",
              table_html(board)]
    svgs = [(name, path) for name, path in plots.items() if name.endswith(".svg")]
    if svgs:
        parts.append("<h2>Plots</h2>")
        for name, path in svgs:
            stem = name[:-4]
            # percent-encoded, not base64: a third smaller, still one self-contained file
            data = quote(Path(path).read_text(encoding="utf-8"), safe=_SVG_SAFE)
            parts.append(f'<figure><img alt="{_e(stem)}" src=\'data:image/svg+xml;charset=utf-8,{data}\'>'
                         f"<figcaption>{_e(PLOT_CAPTIONS.get(stem, stem))} Also saved as {_e(stem)}.png and "
                         f"{_e(stem)}.svg.</figcaption></figure>")
    failed = unresolved_failures(board.records)
    notes = [f"failed: {variant_of(r)} / {r.get('scheme')} / {r.get('task')}: {str(r.get('error'))[:160]}"
             for r in failed] + board.notes
    if notes:
        parts += ["<h2>Notes</h2>", '<ul class="notes">'] + [f"<li>{_e(n)}</li>" for n in notes] + ["</ul>"]
    parts += ["<footer>Generated by <code>qvlm-bench table</code> from records.jsonl and the per-question "
              "sample files; the CSV beside this page has every interval bound.</footer>", "</body>", "</html>"]
    return "\n".join(parts) + "\n"


def write_page(board: Board, path: str | Path, plots: dict[str, Path]) -> Path:
    path = Path(path)
    path.write_text(page_html(board, plots))
    return path
