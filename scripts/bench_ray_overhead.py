"""What the Ray executor costs over the serial runner on one GPU: the same small suite on a
LLaVA-1.5-7B-shaped model folder (random weights), run serially and through Ray with one worker.

Each run is a fresh ``qvlm-bench run`` process (both pay interpreter start, imports and the model
load; Ray adds its local instance, the worker process with its own imports, and a round trip per
cell), into its own results folder. The two runs' records are compared cell by cell (value and
the per-sample file, generations included). Prints a table; writes ``ray_overhead.json`` and the
runs' records under ``--out``. Numbers go into docs/benchmarks/scale.md.

    PYTHONPATH=. python scripts/bench_ray_overhead.py --tokenizer DIR --data-dir DIR --out $OUT   # GPU, 7B
    PYTHONPATH=. python scripts/bench_ray_overhead.py --shape tiny --device cpu --limit 8 \\
        --tokenizer ../shared/data/llama2_tokenizer --data-dir ../shared/data/scienceqa_img_sample \\
        --out /tmp/ro                                                                  # smoke test

``--data-dir`` holds ScienceQA rows (``test.parquet`` in the HF schema, or
``scienceqa_img/test.parquet``). Needs Ray (``pip install 'qvlm-bench[distributed]'``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STAGES = ("load_s", "calibrate_s", "quantize_s", "finalize_s", "apply_s", "eval_s")

def run_cli(suite_file: Path, out: Path, extra: list[str], log: Path, env: dict | None = None) -> dict:
    """One ``qvlm-bench run`` in a fresh process (``env`` added to this one's); its wall time and records."""
    env = {**os.environ, **(env or {}),
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "harness.cli", "run", str(suite_file), "--output", str(out), "-q", *extra]
    t0 = time.perf_counter()
    with log.open("w") as fh:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    from harness.records import read_records

    recs = read_records(out / "records.jsonl")
    return {"cmd": " ".join(cmd[1:]), "rc": rc, "wall_s": round(wall, 2), "cells": len(recs),
            "ok": sum(r["status"] == "ok" for r in recs), "records": recs, "out": str(out),
            "cell_stage_s": round(stage_seconds(recs), 2)}


def stage_seconds(recs: list[dict]) -> float:
    """Seconds spent inside the cells' stages: each group's load/quantize/apply once (its records
    all carry them), every cell's evaluation."""
    groups: dict[str, dict] = {}
    total = 0.0
    for r in recs:
        t = r.get("timings") or {}
        total += t.get("eval_s") or 0
        groups.setdefault(r.get("state_key"), t)
    return total + sum(t.get(k) or 0 for t in groups.values() for k in STAGES if k != "eval_s")


def same_results(a: dict, b: dict) -> list[str]:
    """Cells whose value or per-sample file differ between two runs."""
    ra = {r["config_hash"]: r for r in a["records"] if r["status"] == "ok"}
    rb = {r["config_hash"]: r for r in b["records"] if r["status"] == "ok"}
    diff = sorted(set(ra) ^ set(rb))
    for key in set(ra) & set(rb):
        x, y = ra[key], rb[key]
        same_file = (Path(a["out"]) / x["samples_file"]).read_bytes() == (Path(b["out"]) / y["samples_file"]).read_bytes()
        if x["value"] != y["value"] or not same_file:
            diff.append(key)
    return diff


def main(argv=None) -> int:
    from harness.perf.random_folder import add_bench_folder_args

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_bench_folder_args(ap)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--methods", default="fp16,rtn")
    ap.add_argument("--schemes", default="w4a4,w8a8")
    ap.add_argument("--limit", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=1, help="serial/ray pairs, interleaved")
    args = ap.parse_args(argv)
    try:
        import ray  # noqa: F401
    except ImportError:
        print("Ray is not installed here: pip install the ray wheel first", file=sys.stderr)
        return 2
    import torch

    from harness.perf.random_folder import bench_folder

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = "fp16" if args.device.startswith("cuda") else "fp32"
    folder, build_s = bench_folder(args.arch, args.shape, args.tokenizer, dtype=dtype, device=args.device)
    suite_file = out / "suite.yaml"
    suite_file.write_text(yaml.safe_dump({
        "name": "ray-overhead", "models": [str(folder)], "methods": args.methods.split(","),
        "schemes": args.schemes.split(","), "tasks": ["scienceqa_img"], "data_dir": str(Path(args.data_dir).resolve()),
        "limit": args.limit, "batch_size": args.batch, "device": "cuda" if args.device.startswith("cuda") else "cpu",
        "dtype": dtype, "calibration": {"task": "scienceqa_img", "split": "test", "n": 8, "batch_size": 8},
    }))
    runs = []
    for rep in range(args.reps):
        for name, extra in (("serial", []), ("ray", ["--executor", "ray", "--workers", "1"])):
            tag = f"{name}{rep}"
            res = run_cli(suite_file, out / tag, extra, out / f"{tag}.log")
            res["name"], res["rep"] = name, rep
            runs.append(res)
            print(f"{tag}: rc {res['rc']}, {res['ok']}/{res['cells']} ok, {res['wall_s']} s", flush=True)
    summary = {"arch": args.arch, "shape": args.shape, "device": args.device, "dtype": dtype,
               "card": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
               "cpus": os.cpu_count(), "build_folder_s": build_s, "limit": args.limit,
               "methods": args.methods, "schemes": args.schemes, "commit": os.environ.get("QVLM_GIT_COMMIT"),
               "runs": [{k: v for k, v in r.items() if k != "records"} for r in runs], "pairs": []}
    for rep in range(args.reps):
        s, r = (next(x for x in runs if x["name"] == n and x["rep"] == rep) for n in ("serial", "ray"))
        diff = same_results(s, r)
        summary["pairs"].append({"rep": rep, "serial_s": s["wall_s"], "ray_s": r["wall_s"],
                                 "overhead_s": round(r["wall_s"] - s["wall_s"], 2),
                                 "ratio": round(r["wall_s"] / s["wall_s"], 3),
                                 "serial_stage_s": s["cell_stage_s"], "ray_stage_s": r["cell_stage_s"],
                                 "identical": not diff and s["ok"] == r["ok"] == s["cells"], "differing": diff})
    (out / "ray_overhead.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"\n{args.arch} ({args.shape}) on {summary['card'] or args.device}, {dtype}; "
          f"{args.methods} × {args.schemes} × scienceqa_img (limit {args.limit}); folder built in {build_s} s")
    print(f"{'rep':>3} {'serial s':>9} {'ray s':>8} {'overhead s':>11} {'ratio':>6} "
          f"{'stages serial/ray s':>20}  records identical")
    for p in summary["pairs"]:
        print(f"{p['rep']:>3} {p['serial_s']:>9.1f} {p['ray_s']:>8.1f} {p['overhead_s']:>11.1f} {p['ratio']:>6.2f} "
              f"{p['serial_stage_s']:>9.1f}/{p['ray_stage_s']:<9.1f}  {p['identical']}"
              + (f" (differ: {p['differing']})" if p["differing"] else ""))
    return 0 if all(r["rc"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
