"""Run one suite under several CPU kernel paths and compare the records cell by cell.

Float arithmetic on CPUs is not bit-reproducible across SIMD instruction sets and thread counts;
this shows what another machine would compute. Each variant runs ``qvlm-bench run`` in a fresh
process (``ATEN_CPU_CAPABILITY``, ``DNNL_MAX_CPU_ISA``, ``--threads``) into its own folder, then
the cells (matched by row: variant, scheme, task) are compared: accuracy and every per-question generation.

    python scripts/check_cpu_paths.py --out /tmp/paths -- --methods rtn,gptq --schemes w4a4
    python scripts/check_cpu_paths.py --out /tmp/paths --dtype fp32 -- ...   # what fp32 would do

Prints one row per cell (max |Δ accuracy| over variants, questions whose answer changed) and
writes ``paths.json`` beside the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness.samples import read_samples  # noqa: E402

VARIANTS = {
    "native-1t": ({}, 1),
    "native-2t": ({}, 2),
    "default-isa-1t": ({"ATEN_CPU_CAPABILITY": "default", "DNNL_MAX_CPU_ISA": "SSE41"}, 1),
    "avx2-2t": ({"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2"}, 2),
}


def run_variant(name: str, out: Path, extra: list[str], dtype: str | None) -> float:
    env_over, threads = VARIANTS[name]
    env = {**os.environ, **env_over}
    cmd = [sys.executable, "-m", "harness.cli", "run", "--output", str(out / name), "--threads",
           str(threads), "-q", *extra]
    if dtype:
        cmd += ["--dtype", dtype]
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=False, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def load(folder: Path) -> dict[str, dict]:
    recs = {}
    for line in (folder / "records.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("status") == "ok":
            gens = [s["generation"] for s in read_samples(folder / r["samples_file"])]
            label = f"{r.get('variant')} {r['scheme']} {r['task']}"
            # matched by row, not config_hash: the hash covers the code, which may be edited between runs
            recs[label] = {"label": label, "value": r["value"], "gens": gens}
    return recs


def compare(out: Path, names: list[str]) -> dict:
    runs = {n: load(out / n) for n in names}
    base = runs[names[0]]
    rows = []
    for key, ref in base.items():
        others = [runs[n].get(key) for n in names[1:]]
        if any(o is None for o in others):
            rows.append({"cell": ref["label"], "missing": True})
            continue
        dv = max(abs(o["value"] - ref["value"]) for o in others)
        changed = max(sum(a != b for a, b in zip(ref["gens"], o["gens"])) for o in others)
        rows.append({"cell": ref["label"], "max_abs_delta": round(dv, 4), "answers_changed": changed,
                     "n": len(ref["gens"])})
    return {"variants": names, "cells": rows,
            "identical_cells": sum(1 for r in rows if r.get("max_abs_delta") == 0 and r.get("answers_changed") == 0),
            "total_cells": len(rows)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the runs")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {', '.join(VARIANTS)}")
    p.add_argument("--dtype", help="override the suite dtype (e.g. fp32 to see what float32 does)")
    p.add_argument("--compare-only", action="store_true", help="only compare existing runs")
    p.add_argument("run_args", nargs=argparse.REMAINDER, help="after --: arguments for `qvlm-bench run`")
    args = p.parse_args()
    out = Path(args.out)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    extra = [a for a in args.run_args if a != "--"]
    times = {}
    if not args.compare_only:
        for n in names:
            times[n] = round(run_variant(n, out, extra, args.dtype), 1)
            print(f"{n}: {times[n]} s", flush=True)
    result = compare(out, names)
    result["seconds"] = times
    (out / "paths.json").write_text(json.dumps(result, indent=1))
    for r in result["cells"]:
        print(f"{r['cell']:<40} Δacc≤{r.get('max_abs_delta', '?')}  answers changed {r.get('answers_changed', '?')}/{r.get('n', '?')}")
    print(f"identical cells: {result['identical_cells']} of {result['total_cells']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
