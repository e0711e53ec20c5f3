"""Perf records (through the project's one records writer) and the perf table (ratios to the float baseline).

Records are written by the project's one writer (``harness.records.append_record``), their
per-layer detail in a sidecar (``harness.perf.detail``; the table reads none of it). A table row
compares a variant with the float baseline (``reference``) of the same ``run_id``, batch size and
dtype: speed-ups are ``baseline time / variant time`` (> 1 is faster), memory is
``variant / baseline``. A variant that ran in bf16 is compared with the bf16 baseline of its own
call. Rows whose kernel is ``simulated``, or that failed the gate, show no ratio. A row whose
layers could take layouts wider than their codes' storage (``--wide-layouts``) says ``wide`` in
its ``layouts for`` column.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..records import append_record, is_reference, new_record
from .detail import DETAIL_KEY, write_detail


def finite(o):
    """``o`` with every non-finite float replaced by None (records stay strict JSON)."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [finite(v) for v in o]
    return o


def write_perf_record(path: str | Path, **fields) -> dict:
    """One perf record through the project's one writer (``harness.records``): its per-layer detail
    first to a sidecar beside ``path`` (``detail.write_detail``), then the rest as one line naming
    it (``detail_file``). Returns the whole record, detail included (what ``detail.load_detail``
    gives back from the line)."""
    rec = new_record(**finite(fields))
    summary = write_detail(Path(path).parent, rec)
    append_record(path, summary)
    if DETAIL_KEY in summary:
        rec[DETAIL_KEY] = summary[DETAIL_KEY]
    return rec


def run_dtype(r: dict) -> str:
    """The dtype a perf record ran in; records before bf16 variants ran in fp16."""
    return r.get("dtype") or "fp16"


def load_records(path: str | Path) -> list[dict]:
    """The perf records of a records file (accuracy records in the same file are skipped)."""
    from ..records import read_records

    return [r for r in read_records(path) if r.get("metric") == "perf"]


def _ratio(base, val):
    if base is None or val is None or val == 0:
        return None
    return base / val


def layouts_for(r: dict) -> str:
    """What a row's weight layouts were chosen for (its objective), and ``wide`` where the row was
    allowed layouts wider than its codes' storage (``--wide-layouts``: it breaks the memory rule)."""
    objective = r.get("objective") or "generate"
    return f"{objective}, wide" if r.get("layouts") == "wide" else objective


def latest_per_variant(records: list[dict]) -> list[dict]:
    """The newest record per (card, model, batch, variant, scheme, dtype, objective); older runs stay in
    records.jsonl, and another card's rows are never replaced by this card's.

    A variant skipped for time (``error: not run: ...``) doesn't hide an older measurement of it.
    """
    newest: dict = {}
    for r in sorted(records, key=lambda r: r.get("timestamp", "")):
        key = (r.get("card"), r["model"], r.get("batch_size"), r.get("variant") or r["method"], r["scheme"],
               run_dtype(r), layouts_for(r))
        skipped = str(r.get("error") or "").startswith("not run")
        if skipped and key in newest:
            continue
        newest[key] = r
    return list(newest.values())


def leaderboard_frame(records: list[dict], latest_only: bool = True):
    """A pandas DataFrame: one row per (run, model, batch, method, scheme)."""
    import pandas as pd

    all_records = records
    if latest_only:
        records = latest_per_variant(records)
    base = {}
    for r in all_records:  # each row's ratios use the baseline of its own run and dtype
        if is_reference(r) and r["status"] == "ok" and r.get("latency"):
            base[(r["run_id"], r["model"], r.get("batch_size"), run_dtype(r))] = r
    rows = []
    for r in records:
        lat = r.get("latency") or {}
        mem = r.get("memory") or {}
        b = base.get((r["run_id"], r["model"], r.get("batch_size"), run_dtype(r)))
        blat = (b or {}).get("latency") or {}
        bmem = (b or {}).get("memory") or {}
        g = r.get("gate") or {}
        trained_exact = (g.get("trained") or {}).get("exact") or {}
        timed = bool(lat) and r["status"] == "ok" and r.get("kernel") != "simulated"
        prefill = lat.get("prefill_ms")
        rows.append({
            "model": r["model"], "card": r.get("card"), "batch": r.get("batch_size"),
            "run": r.get("run_id"),
            "method": r.get("variant") or r["method"], "scheme": r["scheme"], "dtype": run_dtype(r),
            "layouts for": layouts_for(r),
            "status": r["status"] if timed or r["status"] == "failed" else "simulated",
            "gate": ("pass" if g.get("passed") else "FAIL") if g else "—",
            "gate layer err": g.get("layerwise_max_rel_err"),
            "gate e2e err": g.get("e2e_rel_logit_err"),
            "gate tokens": ("same" if g.get("e2e_tokens_match") else "differ") if g else None,
            "trained err": trained_exact.get("rel_logit_err"),
            "trained tol": trained_exact.get("tol"),
            "vision ms": lat.get("vision_ms"),
            "TTFT ms": lat.get("ttft_ms"),
            "prefill ms": prefill,
            "prefill ×": _ratio(blat.get("prefill_ms"), prefill) if timed else None,
            "decode ms/tok": lat.get("decode_ms_per_token"),
            "decode IQR": (lat.get("iqr") or {}).get("decode_ms_per_token"),
            "decode ×": _ratio(blat.get("decode_ms_per_token"), lat.get("decode_ms_per_token")) if timed else None,
            "tok/s": lat.get("tokens_per_s"),
            "peak GiB": mem["peak_bytes"] / 2**30 if mem.get("peak_bytes") else None,
            "peak / base": (mem["peak_bytes"] / bmem["peak_bytes"]) if timed and mem.get("peak_bytes")
            and bmem.get("peak_bytes") else None,
            "LM weights GiB": mem["weight_bytes_language"] / 2**30 if mem.get("weight_bytes_language") else None,
            "kernel": r.get("kernel"),
            "error": r.get("error"),
        })
    df = pd.DataFrame(rows)
    if not df.empty:
        refs = {r.get("variant") or r["method"] for r in records if is_reference(r)}
        df["_o"] = df["method"].map(lambda m: 0 if m in refs else 1)
        df = df.sort_values(["model", "batch", "dtype", "_o", "method", "scheme", "layouts for"]).drop(columns="_o")
    return df


def write_perf_table(records_path: str | Path, out_path: str | Path, command: str | None = None) -> str:
    """Markdown table (results/perf/leaderboard.md) of the newest record per variant in ``records_path``."""
    import pandas as pd  # noqa: F401 - pandas + tabulate render the table

    records = load_records(records_path)
    df = leaderboard_frame(records)
    lines = ["# Perf leaderboard (generated by harness/perf; do not edit)", ""]
    if df.empty:
        lines.append("No perf records yet.")
    else:
        # one section per card, the card measured most recently first (older cards: earlier runs)
        last = {}
        for r in records:
            last[str(r.get("card"))] = max(last.get(str(r.get("card")), ""), str(r.get("timestamp", "")))
        cards = sorted(last, key=last.get, reverse=True)
        lines.append(f"Cards: {', '.join(cards)}. Ratios are against the float baseline of the same call, batch "
                     "and dtype: `×` = baseline time / variant time (> 1 faster); `peak / base` = memory "
                     "ratio. See docs/benchmarks/perf.md for what each column means and what is simulated.")
        if command:
            lines += ["", f"Produced by: `{command}`"]
        df = df.assign(_card=df["card"].astype(str))
        for ci, card in enumerate(cards):
            part_card = df[df["_card"] == card]
            if part_card.empty:
                continue
            lines += ["", f"# {card}" + ("" if ci == 0 else " (earlier runs, kept for reference)")]
            _summary(lines, part_card.drop(columns="_card"))
            for (model, batch), part in part_card.drop(columns="_card").groupby(["model", "batch"], sort=False):
                _section(lines, records, card, model, batch, part)
    text = "\n".join(lines) + "\n"
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(out_path) + ".tmp")
    tmp.write_text(text)
    tmp.replace(out_path)
    return text


def _summary_cell(r) -> str:
    """``decode × / prefill ×`` of a row; the baseline's own times; or why there is no ratio."""
    def num(v):
        return v is not None and v == v

    if r["status"] == "ok" and num(r["decode ×"]) and num(r["prefill ×"]):
        if r["decode ×"] == 1 and r["prefill ×"] == 1 and num(r["decode ms/tok"]):
            return f"{r['decode ms/tok']:.2f} ms/tok, {r['prefill ms']:.1f} ms"
        return f"{r['decode ×']:.2f} / {r['prefill ×']:.2f}"
    if r["status"] == "simulated":
        return "simulated"
    err = str(r.get("error") or "")
    if err.startswith("not run"):
        return "not run"
    return f"{'gate FAIL' if r['gate'] == 'FAIL' else 'failed'} (run {str(r['run'])[:6]})"


def _summary(lines: list, part) -> None:
    """One card's rows at a glance: per batch size ``decode × / prefill ×`` (the baselines' own times),
    peak memory against the baseline at batch 1; details and runs in the sections below."""
    batches = sorted(part["batch"].dropna().unique())
    rows: dict = {}
    for _, r in part.iterrows():
        key = (r["model"], r["method"], r["scheme"], r["dtype"], r["layouts for"])
        row = rows.setdefault(key, dict(zip(["model", "method", "scheme", "dtype", "layouts for"], key)))
        row[f"batch {r['batch']}"] = _summary_cell(r)
        peak = r["peak / base"]
        if r["batch"] == 1 and r["status"] == "ok" and peak is not None and peak == peak:
            row["peak / base (batch 1)"] = f"{peak:.2f}"
    import pandas as pd

    table = pd.DataFrame(list(rows.values()))
    order = ["model", "method", "scheme", "dtype", "layouts for"] + [f"batch {b}" for b in batches]
    if "peak / base (batch 1)" in table:
        order.append("peak / base (batch 1)")
    lines += ["", "## Summary: decode × / prefill × against the baseline of the same run (its own times on its "
              "row)", "", table[order].fillna("—").to_markdown(index=False, disable_numparse=True)]


def _section(lines: list, records: list, card: str, model, batch, part) -> None:
    """One model x batch section of the table: its runs (machine, commit, command), then the rows."""
    lines += ["", f"## {model}, batch {batch}", ""]
    for run in dict.fromkeys(part["run"]):  # each run's machine (ratios never cross runs)
        r0 = next(r for r in records if r["model"] == model and r.get("batch_size") == batch
                  and r.get("run_id") == run and str(r.get("card")) == card)
        bw = round(r0["copy_bandwidth_gbs"]) if r0.get("copy_bandwidth_gbs") else "—"
        git = r0.get("git") or {}
        sha = str(git.get("commit") or "")[:12] if isinstance(git, dict) else str(git)[:12]
        sha = "" if sha == "HEAD" else sha  # the run had no git history to read
        cmd = f", `{r0['command']}`" if r0.get("command") else ""
        dirty = " (dirty)" if sha and isinstance(git, dict) and git.get("dirty") else ""
        lines.append(f"- run `{run}`: {str(r0.get('timestamp', ''))[:16]}, commit {sha or 'not recorded'}{dirty}{cmd}, "
                     f"card {r0.get('card')}, "
                     f"driver {r0.get('driver')}, torch {r0.get('torch')}, copy bandwidth {bw} GB/s, "
                     f"workload {json.dumps(r0.get('workload', {}).get('prompt_tokens'))} prompt "
                     f"tokens + {r0.get('workload', {}).get('new_tokens')} new tokens")
    lines.append("")
    show = part.drop(columns=["model", "card", "batch"])
    lines.append(show.to_markdown(index=False, floatfmt=".3g"))
