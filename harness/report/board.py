"""The board: the numeric leaderboard with its intervals, built from ``records.jsonl`` — the data
model every writer (text, page, plots, contrasts) reads and none of them changes.

Rows are (model, variant, scheme) — the record's ``variant`` (fallback: ``method``); one column per
task, the average over tasks, ``Δ ref`` against the same model's reference row (the records with
``reference: true``; fallback: method ``fp16``) and ``vs best`` against the best other variant of
the same model and scheme. Every number carries a 95 % interval from a paired, stratified bootstrap
over the questions in the records' per-question sample files (harness.report.stats), resampling the
clusters a task declares (VQAv2's images) whole; with several runs
(calibration seeds) the seed-to-seed spread is added. A best value is bold only when it is
significantly above every other variant's; variants not significantly below the best are marked
tied. Latency and memory columns appear when perf records exist. Built from the records alone, so
it can be regenerated at any time.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .rows import ROW, latest_ok, record_field, row_identity, scheme_bits
from .scores import FALLBACK, load_scores, task_clusters
from .stats import DEFAULT_LEVEL, DEFAULT_RESAMPLES, QUESTION, PairedBootstrap, TaskScores, combine_runs

PERF_COLUMNS = ("decode ms/tok", "peak GiB", "kernel")
PERF_MARK = "†"  # on the perf columns' headers: the note saying which card and workload they are
AVG, DREF, VSBEST = "Avg", "Δ ref", "vs best"


@dataclass
class Run:
    """One results folder: its label, folder and records."""

    label: str
    folder: Path
    records: list[dict]

    @property
    def seeds(self) -> list:
        """The seeds of the run's successful records (one, unless the folder mixes runs)."""
        return sorted({r.get("seed") for r in self.records if r.get("status") == "ok"}, key=str)


@dataclass
class Board:
    """Everything the writers need: the numeric table with intervals, and what ran.

    ``table``: index (model, variant, scheme); per statistic column c (each task, Avg, Δ ref,
    vs best, and ``<task> vs best``): ``c``, ``c lo``, ``c hi``; ``c mark`` ("lead", "tie" or "")
    for tasks and Avg; ``<task> n`` (questions), ``runs``, ``intervals`` (how they were made),
    and the perf columns when perf records exist.
    """

    table: pd.DataFrame
    tasks: list[str]
    runs: list[Run]
    references: dict[str, tuple] = field(default_factory=dict)  # model -> row key
    reference_desc: dict[str, str] = field(default_factory=dict)  # model -> "fp16 (ran in fp32)"
    bits: dict[tuple, tuple[int, int]] = field(default_factory=dict)  # row key -> (w, a) bits
    notes: list[str] = field(default_factory=list)
    n_resamples: int = DEFAULT_RESAMPLES
    level: float = DEFAULT_LEVEL
    seed: int = 0
    # the resamples every interval came from: contrasts draw their intervals from the same ones
    bootstrap: PairedBootstrap | None = None
    # task -> (cluster unit the bootstrap resampled, clusters, questions)
    clusters: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    # the perf columns' header suffix: the card they ran on (one card) and the note mark
    perf_header: str = ""

    def perf_column_name(self, column: str) -> str:
        """A perf column's displayed header: it says where the numbers come from (``perf_note``)."""
        return f"{column}{self.perf_header}" if column in PERF_COLUMNS else column

    @property
    def rows(self) -> list[tuple]:
        """Row keys in the bootstrap's row order (the table keeps the order it was built in)."""
        return list(self.table.index)

    @property
    def records(self) -> list[dict]:
        return [r for run in self.runs for r in run.records]

    @property
    def stat_columns(self) -> list[str]:
        return [*self.tasks, AVG] + ([DREF] if DREF in self.table else []) + ([VSBEST] if VSBEST in self.table else [])


def _sort_key(row: tuple, bits: dict, refs: set) -> tuple:
    w, a = bits.get(row, (0, 0))
    return row[0], -w, -a, row[2], row not in refs, row[1]


SETTINGS = ("limit", "dtype", "calibration (but the seed)")


def _cells(run: Run) -> dict[tuple, dict[str, str]]:
    """Per cell (model, variant, scheme, task) of a run's latest successful accuracy records, the
    settings that must match for two runs to be seeds of one suite (the seed may differ)."""
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


def build_board(runs: Sequence[Run], n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                level: float = DEFAULT_LEVEL, perf_records: list[dict] | None = None) -> Board:
    """The numeric leaderboard with intervals over one run or several runs of the same suite."""
    notes: list[str] = check_comparable(runs)
    frames = []
    for k, run in enumerate(runs):
        df = latest_ok(run.records)
        if df.empty or not (df["metric"] == "accuracy").any():
            raise ValueError(f"{run.folder}: no successful accuracy records to tabulate")
        acc = df[df["metric"] == "accuracy"].copy()
        acc["_run"] = k
        frames.append(acc)
    acc = pd.concat(frames, ignore_index=True)
    tasks = sorted(acc["task"].unique())
    bits = {tuple(r[c] for c in ROW): scheme_bits(r.to_dict()) for _, r in acc.iterrows()}
    refs = {tuple(r[c] for c in ROW) for _, r in acc[acc["_ref"]].iterrows()}
    controls = {tuple(r[c] for c in ROW) for _, r in acc[acc["_control"]].iterrows()}
    references: dict[str, tuple] = {}
    for row in sorted(refs):
        if row[0] in references:
            raise ValueError(f"model {row[0]} has two reference rows, {references[row[0]]} and {row}: "
                             "mark one method as the reference")
        references[row[0]] = row
    rows = sorted({tuple(r[c] for c in ROW) for _, r in acc.iterrows()}, key=lambda r: _sort_key(r, bits, refs))
    ri = {row: i for i, row in enumerate(rows)}

    # per task: (runs, rows, questions) scores aligned by doc_id, NaN where not scored
    problems: dict[str, list[str]] = {}
    loaded: dict[str, dict[tuple[int, int], dict | tuple]] = {t: {} for t in tasks}
    cluster_ids: dict[str, dict[tuple[int, int], dict | None]] = {t: {} for t in tasks}
    units: dict[str, dict[tuple[int, int], str]] = {t: {} for t in tasks}
    for _, r in acc.iterrows():
        k, i = int(r["_run"]), ri[tuple(r[c] for c in ROW)]
        rec = r.to_dict()
        found = load_scores(runs[k].folder, rec, problems)
        if found is not None:
            loaded[rec["task"]][(k, i)], cluster_ids[rec["task"]][(k, i)] = found
            units[rec["task"]][(k, i)] = record_field(rec, "cluster_unit") or QUESTION
        else:
            loaded[rec["task"]][(k, i)] = (float(rec["value"]) / 100, float(record_field(rec, "stderr") or 0.0) / 100)
    for reason, where in problems.items():
        notes.append(f"{reason}, {FALLBACK}: {len(where)} cell(s): " + "; ".join(where[:5])
                     + ("; …" if len(where) > 5 else ""))
    task_scores, n_questions, n_clusters, clusters_of = {}, {}, {}, {}
    for t in tasks:
        ids = sorted({d for v in loaded[t].values() if isinstance(v, dict) for d in v}, key=lambda d: (str(type(d)), d))
        col = {d: j for j, d in enumerate(ids)}
        arr = np.full((len(runs), len(rows), len(ids)), np.nan)
        fallback = {}
        for (k, i), v in loaded[t].items():
            if isinstance(v, dict):
                arr[k, i, [col[d] for d in v]] = list(v.values())
            else:
                fallback[(k, i)] = v
        clusters, unit = task_clusters(t, ids, [(units[t][c], cluster_ids[t][c]) for c in cluster_ids[t]], notes)
        task_scores[t] = TaskScores(arr, fallback, clusters=clusters, unit=unit)
        n_questions[t] = {(k, i): (len(v) if isinstance(v, dict) else None) for (k, i), v in loaded[t].items()}
        # per row: the clusters among the questions it was scored on
        cl = np.arange(len(ids)) if clusters is None else clusters
        n_clusters[t] = [len(np.unique(cl[~np.isnan(arr[:, i]).all(0)])) for i in range(len(rows))]
        clusters_of[t] = (unit, task_scores[t].n_clusters, len(ids))
    boot = PairedBootstrap(task_scores, n_resamples=n_resamples, seed=seed)

    table = pd.DataFrame(index=pd.MultiIndex.from_tuples(rows, names=ROW))
    T, R = len(tasks), len(rows)

    multi = len(runs) > 1

    def put(name: str, weights: dict[str, np.ndarray], targets: list[int], bounds=(0.0, 1.0)) -> None:
        point, reps = boot.statistic(weights)
        iv = combine_runs(point, reps, level=level, bounds=bounds)
        cols = [("", iv.value), (" lo", iv.lo), (" hi", iv.hi)]
        if multi:  # the spread across runs, and the range of the per-run values
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN: a row absent from every run
                cols += [(" sd", iv.sd), (" min", np.nanmin(point, 0)), (" max", np.nanmax(point, 0))]
        for suffix, vals in cols:
            col = table.get(name + suffix, pd.Series(np.nan, index=table.index)).to_numpy(copy=True)
            col[targets] = 100 * vals
            table[name + suffix] = col

    eye = np.eye(R)
    for t in tasks:
        put(t, {t: eye}, list(range(R)))
    put(AVG, {t: eye / T for t in tasks}, list(range(R)))
    with_ref = [i for i, row in enumerate(rows) if row[0] in references]
    if with_ref:
        w = np.zeros((len(with_ref), R))
        for s, i in enumerate(with_ref):
            w[s, i] += 1
            w[s, ri[references[rows[i][0]]]] -= 1
        put(DREF, {t: w / T for t in tasks}, with_ref, bounds=(-1.0, 1.0))

    # leads: per (model, scheme), among the variants that are not the reference or a control
    # (a control, e.g. fp16+veo, isolates a lever; it does not compete for best)
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        if row not in refs and row not in controls:
            groups.setdefault((row[0], row[2]), []).append(i)
    for c in [*tasks, AVG]:
        weights_of = (lambda w: {t: w / T for t in tasks}) if c == AVG else (lambda w: {c: w})
        gap_col = VSBEST if c == AVG else f"{c} vs best"
        marks = [""] * R
        pairs = []  # (best, other)
        for members in groups.values():
            vals = table[c].to_numpy()[members]
            if len(members) < 2 or np.isnan(vals).all():
                continue
            order = [members[j] for j in np.argsort(-np.nan_to_num(vals, nan=-np.inf), kind="stable")]
            best = order[0]
            pairs += [(best, o) for o in order[1:] if not np.isnan(table[c].iat[o])]
        if not pairs:
            continue
        w = np.zeros((len(pairs), R))
        for s, (b, o) in enumerate(pairs):
            w[s, b], w[s, o] = 1, -1
        iv = combine_runs(*boot.statistic(weights_of(w)), level=level, bounds=(-1.0, 1.0))
        gap = {name: np.full(R, np.nan) for name in ("", " lo", " hi")}
        by_best: dict[int, list[int]] = {}
        for s, (b, o) in enumerate(pairs):
            by_best.setdefault(b, []).append(s)
            # a non-best row: its gap to the best (negated best − row)
            gap[""][o], gap[" lo"][o], gap[" hi"][o] = -100 * iv.value[s], -100 * iv.hi[s], -100 * iv.lo[s]
        for b, ss in by_best.items():
            runner = ss[0]  # the second-highest mean
            gap[""][b], gap[" lo"][b], gap[" hi"][b] = 100 * iv.value[runner], 100 * iv.lo[runner], 100 * iv.hi[runner]
            tied = [pairs[s][1] for s in ss if not iv.excludes_zero()[s]]
            if tied:
                for i in [b, *tied]:
                    marks[i] = "tie"
            else:
                marks[b] = "lead"
        for suffix, vals in gap.items():
            table[gap_col + suffix] = vals
        table[f"{c} mark"] = marks

    if not multi:  # the record's own standard error (lm-eval's), for readers comparing with other tools
        se = acc.set_index(ROW + ["task"])["stderr"] if "stderr" in acc else None
        for t in tasks:
            table[f"{t} stderr"] = [se.get((*row, t), np.nan) if se is not None else np.nan for row in rows]
    for t in tasks:
        table[f"{t} n"] = [max((n_questions[t].get((k, i)) or 0 for k in range(len(runs))), default=0) or np.nan
                           for i in range(R)]
        # what the interval resampled: the task's cluster unit and how many of them the row has
        table[f"{t} cluster unit"] = clusters_of[t][0]
        table[f"{t} clusters"] = [c or np.nan for c in n_clusters[t]]
    table["runs"] = [sum(any((k, i) in loaded[t] for t in tasks) for k in range(len(runs))) for i in range(R)]
    table["intervals"] = ["normal (no samples)" if any((k, i) in task_scores[t].fallback for t in tasks
                                                     for k in range(len(runs))) else "bootstrap"
                          for i in range(R)]

    perf = [r for run in runs for r in run.records if r.get("metric") == "perf"] + list(perf_records or [])
    table, hits = _join_perf(table, perf, acc)
    perf_header = ""
    if hits:
        perf_header, note = perf_note(hits)
        notes.append(note)

    ref_desc = {}
    for model, row in references.items():
        recs = acc[(acc["model"] == model) & (acc["variant"] == row[1]) & (acc["scheme"] == row[2])]
        # per record: the resolved dtype, or (records before it existed) the kernel
        dt = sorted({str(record_field(r, "dtype") or record_field(r, "kernel")) for r in recs.to_dict("records")
                     if record_field(r, "dtype") or record_field(r, "kernel")})
        # the engine's label may already say it ("fp64 (reference)")
        ran = ", ".join(d for d in dt if d not in row[1])
        ref_desc[model] = f"{row[1]}" + (f" (ran in {ran})" if ran else "")
    return Board(table=table, tasks=tasks, runs=list(runs), references=references, reference_desc=ref_desc,
                 bits={row: bits[row] for row in rows}, notes=notes, n_resamples=n_resamples,
                 level=level, seed=seed, bootstrap=boot, clusters=clusters_of, perf_header=perf_header)


def _join_perf(table: pd.DataFrame, perf_records: list[dict],
               acc: pd.DataFrame | None = None) -> tuple[pd.DataFrame, list[dict]]:
    """The batch-1 perf columns of each accuracy row from the perf record of the same identity
    (``row_identity``): each method's latency is its own row's, never another method's. Returns
    the table and the perf records joined (none: the table unchanged)."""
    usable = [r for r in perf_records
              if r.get("metric") == "perf" and r.get("status") == "ok" and r.get("batch_size") in (None, 1)
              and r.get("objective") in (None, "generate")]
    # one dtype for the whole column: a run re-times tinygemm variants in bf16 after its fp16 pass,
    # and a row joined from that pass beside fp16 rows would compare two dtypes' baselines. The
    # column takes the dtype most rows were timed in; a row only timed in another keeps that one.
    counts: dict = {}
    for r in usable:
        counts[r.get("dtype")] = counts.get(r.get("dtype"), 0) + 1
    main = max(counts, key=lambda d: (counts[d], str(d))) if counts else None
    perf = {}  # per identity: the newest successful batch-1 record, of the main dtype where one exists
    for r in usable:
        key = row_identity(r)
        old = perf.get(key)
        if old is None or r.get("dtype") == main or old.get("dtype") != main:
            perf[key] = r
    if not perf:
        return table, []
    acc_recs = {} if acc is None else {tuple(r[c] for c in ROW): r for r in acc.to_dict("records")}
    cols: dict[str, list] = {"decode ms/tok": [], "peak GiB": [], "kernel": []}
    hits = []
    for row in table.index:
        rec = acc_recs.get(tuple(row), {"model": row[0], "variant": row[1], "scheme": row[2]})
        rec = {k: record_field(rec, k) for k in rec}
        key = row_identity(rec)
        hit = perf.get(key)
        if hit is None and key[3] is not None:  # perf records from before quant_config: by label only
            hit = next((p for k, p in perf.items() if k[:3] == key[:3] and k[3] is None), None)
        if hit is not None:
            hits.append(hit)
        lat, mem = (hit or {}).get("latency") or {}, (hit or {}).get("memory") or {}
        cols["decode ms/tok"].append(lat.get("decode_ms_per_token") if hit else None)
        cols["peak GiB"].append((mem.get("peak_bytes") or 0) / 2**30 or None if hit else None)
        cols["kernel"].append(hit.get("kernel") if hit else None)
    if not any(v is not None for v in cols["decode ms/tok"] + cols["kernel"]):
        return table, []  # perf of rows without accuracy belongs to the perf tables
    out = table.copy()
    for c, vals in cols.items():
        out[c] = pd.Series(vals, index=table.index, dtype=float if c != "kernel" else object)
    return out, hits


def _card(rec: dict) -> str:
    card = str(rec.get("card") or rec.get("device") or "?")
    return card[len("NVIDIA "):] if card.startswith("NVIDIA ") else card


def perf_note(hits: list[dict]) -> tuple[str, str]:
    """(header suffix, note) for the perf columns: the card(s), dtype and workload the joined perf
    records ran (a tiny model's latency on one card must not pass for another model's or card's)."""
    cards = sorted({_card(r) for r in hits})
    dtypes = sorted({str(r.get("dtype")) for r in hits if r.get("dtype")})
    models = sorted({str(r.get("model")) for r in hits})
    loads = []
    for r in hits:
        wl = r.get("workload") or {}
        text = (f"{wl.get('prompt_tokens', '?')} prompt tokens ({wl.get('image_tokens', '?')} of them image), "
                f"{wl.get('new_tokens', '?')} new tokens" if wl else "workload not recorded")
        if text not in loads:
            loads.append(text)
    runs = sorted({str(r.get("run_id")) for r in hits if r.get("run_id")})
    commits = sorted({((r.get("git") or {}).get("commit") or "?")[:12] for r in hits})
    untimed = sum(1 for r in hits if not (r.get("latency") or {}).get("decode_ms_per_token"))
    header = f" ({cards[0]}){PERF_MARK}" if len(cards) == 1 else PERF_MARK
    note = (f"{PERF_MARK} decode ms/tok, peak GiB, kernel: `qvlm-bench perf` records of each row's own state "
            f"(same label, scheme, quantization settings, calibration set and range rule), batch 1, on "
            f"{', '.join(cards)} ({', '.join(dtypes)}); model {', '.join(models)} — these are that model's "
            f"latencies on that card, not a 7B model's; workload: {'; '.join(loads)}; perf run "
            f"{', '.join(runs) or '?'} at commit {', '.join(commits)}."
            + (f" {untimed} joined row(s) were not timed (kernel `simulated`: no real kernel for the scheme "
               "there; '–')." if untimed else ""))
    return header, note


@dataclass
class WhatRan:
    """What produced a board, read from its successful accuracy records (one reading; the text and
    the page each word it their own way)."""

    records: list[dict]  # the successful accuracy records
    devices: list[str]
    dtypes: list[str]  # per record: the resolved dtype, or (records before it existed) the kernel
    commits: set[tuple[str | None, bool]]  # (commit or None where not recorded, dirty tree)
    versions: dict[str, set[str]]  # package -> the versions the records name
    timestamps: list[str]  # sorted


def what_ran(board: Board) -> WhatRan:
    ok = [r for r in board.records if r.get("status") == "ok" and r.get("metric") == "accuracy"]
    versions: dict[str, set[str]] = {}
    for r in ok:
        for k, v in (r.get("versions") or {}).items():
            versions.setdefault(k, set()).add(str(v))
    return WhatRan(
        records=ok,
        devices=sorted({str(r.get("device")) for r in ok}),
        dtypes=sorted({str(r.get("dtype") or r.get("kernel")) for r in ok}),
        commits={((r.get("git") or {}).get("commit") or None, bool((r.get("git") or {}).get("dirty"))) for r in ok},
        versions=versions,
        timestamps=sorted(str(r["timestamp"]) for r in ok if r.get("timestamp")))
