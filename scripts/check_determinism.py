"""Do two runs of one suite give identical records, with and without ``deterministic: true``?
(issue 29.7; docs/reliability.md, "Determinism on a GPU")

Runs a small suite — the bundled model, the fp16 reference and Q-VLM (its `fast` preset, as in
the default suite) at W4A4 on the three synthetic tasks — four times, each a fresh
``qvlm-bench run`` process into its own results folder, interleaved: deterministic false, true,
false, true. Then compares the two runs of each setting cell by cell: per-question answers (the
samples files, joined by doc_id), the record's accuracy and counts, and the method's recorded
numbers (``method_meta``: Q-VLM's dependency scores, partition, percentiles, block errors, VEO's
Jacobian weights; timings and memory left out). Prints a table (identical, or how many differ)
and each run's wall time: the option's cost.

    PYTHONPATH=. python3 scripts/check_determinism.py --out DIR [--device cuda] [--limit 64]
    PYTHONPATH=. python3 scripts/check_determinism.py --out DIR --dry     # CPU, 4 questions

The runs' environment has no CUBLAS_WORKSPACE_CONFIG: the deterministic runs must set it
themselves (harness/determinism.py), as a user's would. scripts/device_determinism.sh is the one
device call that runs this on a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (label, deterministic): interleaved, so a drift of the machine (clocks, a warm page cache) does
# not fall on one setting only
RUNS = (("false-1", False), ("true-1", True), ("false-2", False), ("true-2", True))
PAIRS = (("false-1", "false-2"), ("true-1", "true-2"))
# method_meta keys that are timings or memory, not results: never compared
VOLATILE = ("seconds", "memory", "free_gib", "peak_gib_quantize", "step_peak_gib_per_sequence")


def suite_dict(out: Path, deterministic: bool, device: str, limit: int, dry: bool) -> dict:
    tasks = ["synth_scienceqa"] if dry else ["synth_scienceqa", "synth_vizwiz", "synth_vqav2"]
    return {
        "name": out.name, "output": str(out), "models": ["qvlm-tiny-llava"],
        "methods": ["fp16", "qvlm"], "schemes": ["w4a4"], "tasks": tasks,
        "calibration": {"task": "synth_scienceqa", "split": "train", "n": 8 if dry else 32, "batch_size": 8},
        "quant": {"a_granularity": "per_tensor"},
        # the `fast` preset; dry: the plumbing at the least CPU time (no VEO, fewer CDM samples)
        "method_options": {"qvlm": {"search_batches": 2, "veo_epochs": 1, "veo_report": False, "veo_jacobian_batches": 1}
                           if not dry else {"search_batches": 1, "veo_epochs": 0, "cdm_samples": 4096}},
        "limit": limit, "batch_size": 32, "seed": 0, "device": device, "deterministic": deterministic,
    }


def run_once(work: Path, label: str, deterministic: bool, args) -> dict:
    """One fresh ``qvlm-bench run`` process; its wall time and exit status."""
    import yaml

    out = work / label
    out.mkdir(parents=True, exist_ok=True)
    path = work / f"{label}.yaml"
    path.write_text(yaml.safe_dump(suite_dict(out, deterministic, args.device, args.limit, args.dry)))
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    log = work / f"{label}.log"
    t0 = time.perf_counter()
    try:
        with open(log, "w") as fh:
            rc = subprocess.run([sys.executable, "-m", "harness.cli", "run", str(path), "-q"], cwd=REPO, env=env,
                                stdout=fh, stderr=subprocess.STDOUT, timeout=args.run_timeout).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    wall = time.perf_counter() - t0
    print(f"{label}: deterministic={str(deterministic).lower()} rc={rc} {wall:.1f} s", flush=True)
    return {"label": label, "deterministic": deterministic, "rc": rc, "wall_s": round(wall, 2), "folder": str(out)}


# ---- reading and comparing runs -------------------------------------------------------------------

def load_run(folder: str | Path) -> dict[tuple, dict]:
    """``{(variant, scheme, task): {"record": …, "samples": {doc_id: row}}}`` of a results folder
    (the last record of a cell wins; samples read only for ok records)."""
    from harness.records import read_records
    from harness.samples import read_samples

    folder = Path(folder)
    cells: dict[tuple, dict] = {}
    for r in read_records(folder / "records.jsonl"):
        samples = {}
        if r.get("status") == "ok" and r.get("samples_file"):
            samples = {row["doc_id"]: row for row in read_samples(folder / r["samples_file"])}
        cells[(r.get("variant"), r.get("scheme"), r.get("task"))] = {"record": r, "samples": samples}
    return cells


def leaves(obj, prefix: str = "") -> dict[str, object]:
    """Numbers and strings of a nested record field by path, timings and memory left out."""
    out: dict[str, object] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in VOLATILE or str(k).endswith("_s"):
                continue
            out.update(leaves(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(leaves(v, f"{prefix}[{i}]"))
    else:
        out[prefix] = obj
    return out


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def compare_cells(a: dict, b: dict) -> dict:
    """One cell in two runs (``load_run`` values): what differs."""
    ra, rb = a["record"], b["record"]
    row = {"status": (ra.get("status"), rb.get("status")), "value": (ra.get("value"), rb.get("value"))}
    if ra.get("status") != "ok" or rb.get("status") != "ok":
        row["error"] = next((r.get("error") for r in (ra, rb) if r.get("status") != "ok"), None)
        row["identical"] = False
        return row
    docs = sorted(set(a["samples"]) | set(b["samples"]))
    row["n"] = len(docs)
    row["answers_differ"] = sum(1 for d in docs if (a["samples"].get(d) or {}).get("generation")
                                != (b["samples"].get(d) or {}).get("generation"))
    row["scores_differ"] = sum(1 for d in docs if (a["samples"].get(d) or {}).get("score")
                               != (b["samples"].get(d) or {}).get("score"))
    row["record_differ"] = [k for k in ("value", "stderr", "n", "n_empty", "n_unparsed") if ra.get(k) != rb.get(k)]
    ma, mb = leaves(ra.get("method_meta") or {}), leaves(rb.get("method_meta") or {})
    diff = sorted(k for k in set(ma) | set(mb) if ma.get(k) != mb.get(k))
    row["meta_differ"] = len(diff)
    row["meta_examples"] = diff[:5]
    deps = [(x, y) for k in diff if k.startswith("dependencies[")
            for x, y in [(_num(ma.get(k)), _num(mb.get(k)))] if x is not None and y is not None]
    row["dependencies_max_abs"] = max((abs(x - y) for x, y in deps), default=0.0)
    row["identical"] = not (row["answers_differ"] or row["scores_differ"] or row["record_differ"] or diff)
    return row


def compare_runs(a: dict[tuple, dict], b: dict[tuple, dict]) -> dict[tuple, dict]:
    """Every cell of either run: ``compare_cells``, or ``{"missing": side}``."""
    out = {}
    for cell in sorted(set(a) | set(b), key=str):
        if cell not in a or cell not in b:
            out[cell] = {"missing": "first" if cell not in a else "second", "identical": False}
        else:
            out[cell] = compare_cells(a[cell], b[cell])
    return out


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.2f}" if isinstance(v, float) and not math.isnan(v) else str(v)


def table(results: dict[tuple[str, str], dict[tuple, dict]], runs: list[dict]) -> str:
    """The report: per pair and cell, identical or what differs; then each run's wall time."""
    lines = ["| runs | cell | accuracy | answers differing | record fields differing | method_meta values "
             "differing | dependency scores max abs Δ | verdict |", "|---|---|---|---|---|---|---|---|"]
    for (x, y), cells in results.items():
        for cell, row in cells.items():
            name = " / ".join(str(c) for c in cell)
            if "missing" in row:
                lines.append(f"| {x} vs {y} | {name} | – | – | – | – | – | missing in the {row['missing']} run |")
                continue
            acc = " / ".join(_fmt(v) for v in row["value"])
            if "error" in row:
                lines.append(f"| {x} vs {y} | {name} | {acc} | – | – | – | – | failed: {row['error']} |")
                continue
            verdict = "identical" if row["identical"] else "differ"
            meta = str(row["meta_differ"]) + (f" (e.g. {', '.join(row['meta_examples'][:2])})"
                                              if row["meta_differ"] else "")
            lines.append(f"| {x} vs {y} | {name} | {acc} | {row['answers_differ']} of {row['n']} | "
                         f"{', '.join(row['record_differ']) or 0} | {meta} | {row['dependencies_max_abs']:.3g} | "
                         f"{verdict} |")
    lines += ["", "| run | deterministic | exit | wall s (process) | quantize s | eval s |", "|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['label']} | {str(r['deterministic']).lower()} | {r['rc']} | {r['wall_s']:.1f} | "
                     f"{_fmt(r.get('quantize_s'))} | {_fmt(r.get('eval_s'))} |")
    for label, subset in (("", runs), (", the first run left out (it fills the machine's caches)", runs[1:])):
        by = {}
        for r in subset:
            by.setdefault(r["deterministic"], []).append(r["wall_s"])
        if by.get(True) and by.get(False):
            t, f = sum(by[True]) / len(by[True]), sum(by[False]) / len(by[False])
            lines.append(f"{'' if label else chr(10)}cost{label}: deterministic runs {t:.1f} s vs {f:.1f} s "
                         f"on average ({t / f:.2f}x, whole processes)")
    return "\n".join(lines)


def run_totals(folder: str | Path) -> dict:
    """Seconds the records report: quantization (once per state) and evaluation (per cell)."""
    from harness.records import read_records

    recs = [r for r in read_records(Path(folder) / "records.jsonl") if r.get("status") == "ok"]
    states = {r.get("state_key"): r.get("quantize_s") or 0.0 for r in recs}
    return {"quantize_s": round(sum(states.values()), 2), "eval_s": round(sum(r.get("eval_s") or 0.0 for r in recs), 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the report (determinism.md, determinism.json)")
    p.add_argument("--work", help="folder for the four results folders (default: OUT/runs)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--limit", type=int, default=64, help="questions per task")
    p.add_argument("--run-timeout", dest="run_timeout", type=float, default=150.0, help="seconds per run")
    p.add_argument("--dry", action="store_true", help="CPU, one task, 4 questions: the plumbing only")
    args = p.parse_args(argv)
    if args.dry:
        args.device, args.limit = "cpu", min(args.limit, 4)
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "runs"
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    for label, det in RUNS:
        r = run_once(work, label, det, args)
        r.update(run_totals(r["folder"]))
        runs.append(r)
    loaded = {r["label"]: load_run(r["folder"]) for r in runs}
    results = {(x, y): compare_runs(loaded[x], loaded[y]) for x, y in PAIRS}
    results[("false-1", "true-1")] = compare_runs(loaded["false-1"], loaded["true-1"])  # what the option changes
    text = table(results, runs)
    print(text)
    (out / "determinism.md").write_text(text + "\n")
    summary = {"runs": runs, "device": args.device, "limit": args.limit,
               "pairs": {f"{x} vs {y}": {" / ".join(map(str, c)): row for c, row in cells.items()}
                         for (x, y), cells in results.items()}}
    (out / "determinism.json").write_text(json.dumps(summary, indent=1, default=str))
    same = {f"{x} vs {y}": all(row["identical"] for row in results[(x, y)].values()) for x, y in PAIRS}
    print("identical: " + ", ".join(f"{k}: {v}" for k, v in same.items()))
    failed = [r["label"] for r in runs if r["rc"] not in (0,)]
    if failed:
        print(f"runs that did not exit 0: {failed} (their logs: {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
