"""Leaderboard tables from ``records.jsonl``: Markdown, CSV, LaTeX (booktabs) and HTML.

Rows are model × method × scheme, one column per task plus the average and Δ against the same
model's fp16 row; latency and memory columns appear when perf records exist, labelled with the
kernel that produced them. The best value per (model, scheme) is bold. Built with pandas and
tabulate from the records alone, so it can be regenerated at any time.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .records import read_records

REFERENCE_METHOD = "fp16"


def latest_ok(records: list[dict]) -> pd.DataFrame:
    """One row per (model, method, scheme, task): the most recent successful record."""
    # latency/memory columns show the batch-1 workload; other batch sizes stay in the perf tables
    rows = [r for r in records if r.get("status") == "ok"
            and not (r.get("metric") == "perf" and r.get("batch_size") not in (None, 1))]
    if not rows:
        return pd.DataFrame()
    df = pd.DataFrame(rows)
    df["_order"] = range(len(df))
    df["task"] = df["task"].fillna("")
    return df.sort_values("_order").groupby(["model", "method", "scheme", "task"], as_index=False).last()


def unresolved_failures(records: list[dict]) -> list[dict]:
    """Failed records whose cell has not succeeded since (a retried cell shows its result only)."""
    last: dict[tuple, dict] = {}
    for r in records:
        if r.get("status") in ("ok", "failed"):
            last[(r.get("model"), r.get("method"), r.get("scheme"), r.get("task") or "",
                  r.get("batch_size") if r.get("metric") == "perf" else None)] = r
    return [r for r in last.values() if r.get("status") == "failed"]


def build_table(records: list[dict]) -> pd.DataFrame:
    """The numeric leaderboard (no formatting): index model/method/scheme, task columns, Avg, Δ."""
    df = latest_ok(records)
    if df.empty:
        return pd.DataFrame()
    acc = df[df["metric"] == "accuracy"]
    table = acc.pivot_table(index=["model", "method", "scheme"], columns="task", values="value",
                            aggfunc="last")
    tasks = list(table.columns)
    if tasks:
        table["Avg"] = table[tasks].mean(axis=1, skipna=False)
        ref = table.xs(REFERENCE_METHOD, level="method", drop_level=False) if REFERENCE_METHOD in \
            table.index.get_level_values("method") else None
        if ref is not None:
            ref_avg = ref["Avg"].groupby(level="model").first()
            table["Δ fp16"] = table["Avg"] - table.index.get_level_values("model").map(ref_avg).to_numpy()
    for col in ("n", "stderr"):
        wide = acc.pivot_table(index=["model", "method", "scheme"], columns="task", values=col, aggfunc="last")
        for task in wide.columns:
            table[f"{task} {col}"] = wide[task]
    perf = df[df["metric"] == "perf"]
    if not perf.empty:
        p = perf.set_index(["model", "method", "scheme"])
        lat = p["latency"].apply(lambda d: (d or {}).get("decode_ms_per_token"))
        mem = p["memory"].apply(lambda d: ((d or {}).get("peak_bytes") or 0) / 2**30 or None)
        table = table.join(pd.DataFrame({"decode ms/tok": lat, "peak GiB": mem, "kernel": p["kernel"]}),
                           how="outer")
    return table.sort_index(level=["model", "scheme", "method"], sort_remaining=False)


PERF_COLUMNS = ("decode ms/tok", "peak GiB", "kernel")


def score_columns(table: pd.DataFrame) -> list[str]:
    """The accuracy columns of a ``build_table`` result: tasks, Avg, Δ fp16 (not n/stderr/perf)."""
    return [c for c in table.columns if not str(c).endswith((" n", " stderr")) and c not in PERF_COLUMNS]


def _formatted(table: pd.DataFrame, bold: tuple[str, str], with_stderr: bool) -> pd.DataFrame:
    """Strings for display: one decimal, best per (model, scheme) wrapped in ``bold``."""
    tasks = score_columns(table)
    out = pd.DataFrame(index=table.index)
    for col in tasks:
        vals = table[col]
        best = vals.groupby(level=["model", "scheme"]).transform("max")
        cells = []
        for idx, v in vals.items():
            if pd.isna(v):
                cells.append("–")
                continue
            text = f"{v:+.1f}" if col == "Δ fp16" else f"{v:.1f}"
            se = table.get(f"{col} stderr")
            if with_stderr and se is not None and pd.notna(se.get(idx)):
                text += f" ± {se[idx]:.1f}"
            is_ref = idx[1] == REFERENCE_METHOD
            if col != "Δ fp16" and not is_ref and v == best[idx] and (vals.groupby(level=["model", "scheme"]).count()[(idx[0], idx[2])] > 1):
                text = f"{bold[0]}{text}{bold[1]}"
            cells.append(text)
        out[col] = cells
    if "decode ms/tok" in table:
        out["decode ms/tok"] = table["decode ms/tok"].map(lambda v: "–" if pd.isna(v) else f"{v:.2f}")
        out["peak GiB"] = table["peak GiB"].map(lambda v: "–" if pd.isna(v) else f"{v:.2f}")
        out["kernel"] = table["kernel"].fillna("–")
    return out.reset_index().rename(columns={"model": "Model", "method": "Method", "scheme": "Scheme"})


def write_leaderboard(results_dir: str | Path, with_stderr: bool = False) -> dict[str, Path]:
    """Write leaderboard.{md,csv,tex,html} next to records.jsonl; returns the paths."""
    results_dir = Path(results_dir)
    records = read_records(results_dir / "records.jsonl")
    if not records:
        raise FileNotFoundError(f"no records in {results_dir / 'records.jsonl'}; run a suite first")
    table = build_table(records)
    if table.empty:
        raise ValueError(f"{results_dir}: no successful records to tabulate")
    paths = {ext: results_dir / f"leaderboard.{ext}" for ext in ("md", "csv", "tex", "html")}
    table.reset_index().to_csv(paths["csv"], index=False, float_format="%.4f")
    md = _formatted(table, ("**", "**"), with_stderr)
    notes = _notes(records, unresolved_failures(records))
    paths["md"].write_text(md.to_markdown(index=False, tablefmt="github", disable_numparse=True) + "\n\n" + notes)
    tex = _formatted(table, ("\\textbf{", "}"), with_stderr)
    paths["tex"].write_text(_booktabs(tex))
    html = _formatted(table, ("<b>", "</b>"), with_stderr)
    paths["html"].write_text(html.to_html(index=False, escape=False, border=0))
    return paths


def _booktabs(df: pd.DataFrame) -> str:
    from tabulate import tabulate

    esc = df.map(lambda v: str(v).replace("±", "$\\pm$").replace("–", "--").replace("_", "\\_")
                 .replace("Δ", "$\\Delta$") if not str(v).startswith("\\textbf") else
                 str(v).replace("±", "$\\pm$").replace("_", "\\_"))
    esc.columns = [str(c).replace("_", "\\_").replace("Δ", "$\\Delta$") for c in df.columns]
    return tabulate(esc.values.tolist(), headers=list(esc.columns), tablefmt="latex_booktabs",
                    disable_numparse=True).replace("\\textbackslash{}", "\\").replace("\\{", "{") \
        .replace("\\}", "}").replace("\\$", "$").replace("\\_", "_").replace("\\textasciicircum{}", "^") + "\n"


def _notes(records: list[dict], failed: list[dict]) -> str:
    ok = [r for r in records if r.get("status") == "ok"]
    devices = sorted({str(r.get("device")) for r in ok})
    kernels = sorted({str(r.get("kernel")) for r in ok})
    lines = [f"Accuracy in percent ({len(ok)} records; device: {', '.join(devices)}; "
             f"kernels: {', '.join(kernels)}). Accuracy always comes from the simulated (fake-quant) model; "
             "bold: best quantized method per model and scheme; Δ fp16: average minus the fp16 row."]
    if failed:
        lines.append(f"{len(failed)} failed record(s): " + "; ".join(
            f"{r.get('method')}/{r.get('scheme')}/{r.get('task')}: {str(r.get('error'))[:80]}" for r in failed[:5]))
    return "\n".join(lines) + "\n"
