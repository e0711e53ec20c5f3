"""A suite over LLaVA-1.5-7B's architecture on one GPU (serial runner) and on every GPU of the
machine through Ray: wall time, per-group time, GPU utilisation, records compared cell by cell.

Each ``--run`` is one fresh ``qvlm-bench run`` process into ``OUT/NAME`` (``serial``: the plain
runner with only the first GPU visible; ``ray``: ``--executor ray``, one worker per GPU), with
``nvidia-smi`` sampling every GPU's utilisation and memory beside it. Runs may come from separate
invocations on the same machine (a device call has a time limit); ``--report`` compares whatever
runs ``OUT`` holds against ``serial`` and writes ``scale.json``. Numbers go into
docs/benchmarks/scale.md ("Several GPUs").

    PYTHONPATH=. python scripts/bench_ray_scale.py --tokenizer DIR --data-dir DIR --out DIR --run serial
    PYTHONPATH=. python scripts/bench_ray_scale.py --tokenizer DIR --data-dir DIR --out DIR --run ray --report
    PYTHONPATH=. python scripts/bench_ray_scale.py --shape tiny --device cpu --limit 4 --calib 4 \\
        --tokenizer TOKDIR --data-dir DIR --out /tmp/rs --run serial --run ray --report   # smoke test

The suite: fp16, rtn, gptq, awq and qvlm (its ``fast`` preset, so the rows read ``qvlm (fast)``)
× {w4a4, w6a6} × scienceqa_img from local rows (``--data-dir`` holds ``scienceqa_img/test.parquet``),
calibration drawn from the same rows. Random weights: time and agreement, not accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_ray_overhead import STAGES, run_cli, same_results  # noqa: E402

METHODS = ["fp16", "rtn", "gptq", "awq", "qvlm"]


class GpuSampler:
    """``nvidia-smi`` in the background, one line per GPU every ``period_ms``; absent without it."""

    def __init__(self, path: Path, period_ms: int = 500):
        self.path, self.proc = path, None
        exe = shutil.which("nvidia-smi")
        if exe:
            self.fh = path.open("w")
            self.proc = subprocess.Popen([exe, "--query-gpu=index,utilization.gpu,memory.used",
                                          "--format=csv,noheader,nounits", f"-lms={period_ms}"],
                                         stdout=self.fh, stderr=subprocess.DEVNULL)

    def stop(self) -> dict:
        """Per GPU: samples, mean utilisation %, share of samples above 0 %, peak memory MiB."""
        if self.proc is None:
            return {}
        self.proc.terminate()
        self.proc.wait()
        self.fh.close()
        per: dict[str, list[tuple[float, float]]] = {}
        for line in self.path.read_text().splitlines():
            parts = [p.strip() for p in line.split(",")]
            try:
                per.setdefault(parts[0], []).append((float(parts[1]), float(parts[2])))
            except (IndexError, ValueError):
                continue
        return {gpu: {"samples": len(v), "util_mean": round(sum(u for u, _ in v) / len(v), 1),
                      "busy_share": round(sum(u > 0 for u, _ in v) / len(v), 3),
                      "mem_peak_mib": max(m for _, m in v)} for gpu, v in per.items() if v}


def groups(recs: list[dict]) -> dict[str, dict]:
    """Per group (one quantization state): its label, the seconds spent opening it (load,
    calibrate, quantize, finalize, apply) and evaluating its cells, and when its cells finished."""
    out: dict[str, dict] = {}
    for r in recs:
        t = r.get("timings") or {}
        g = out.setdefault(r.get("state_key") or r["config_hash"], {
            "label": f"{r.get('variant') or r['method']} {r.get('scheme') or ''}".strip(),
            "open_s": round(sum(t.get(k) or 0 for k in STAGES if k != "eval_s"), 2), "eval_s": 0.0,
            "cells": 0, "device": r.get("device"), "last": r.get("timestamp")})
        g["eval_s"] = round(g["eval_s"] + (t.get("eval_s") or 0), 2)
        g["cells"] += 1
        g["last"] = max(g["last"] or "", r.get("timestamp") or "")
    return out


def write_suite(args, folder: Path, out: Path) -> Path:
    from methods.qvlm.method import FAST

    dev = "cuda" if args.device.startswith("cuda") else "cpu"
    suite = {"name": "ray-scale", "models": [str(folder)], "methods": args.methods.split(","),
             "schemes": args.schemes.split(","), "tasks": ["scienceqa_img"],
             "data_dir": str(Path(args.data_dir).resolve()), "limit": args.limit, "batch_size": args.batch,
             "calibration": {"task": "scienceqa_img", "split": "test", "n": args.calib, "batch_size": 8},
             "method_options": {"qvlm": dict(FAST)}, "device": dev,
             "dtype": "fp16" if dev == "cuda" else "fp32", "seed": 0}
    path = out / "suite.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


def run_one(name: str, suite_file: Path, out: Path, gpus: int) -> dict:
    """One run into ``out/name`` (a previous one there is replaced), its summary in ``name.json``."""
    shutil.rmtree(out / name, ignore_errors=True)
    env = {}
    if name == "serial":
        extra = []
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = "0"
    else:
        extra = ["--executor", "ray", "--workers", str(max(gpus, 2))]
        if not gpus:
            extra += ["--gpus-per-worker", "0"]
    sampler = GpuSampler(out / f"{name}.gpu.csv")
    try:
        res = run_cli(suite_file, out / name, extra, out / f"{name}.log", env=env)
    finally:
        gpu = sampler.stop()
    summary = {k: v for k, v in res.items() if k != "records"}
    summary.update(name=name, gpus_visible=1 if name == "serial" and gpus else gpus, gpu=gpu,
                   groups=groups(res["records"]))
    (out / f"{name}.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"{name}: rc {res['rc']}, {res['ok']}/{res['cells']} ok, {res['wall_s']} s, GPUs {gpu}", flush=True)
    return summary


def report(out: Path, meta: dict) -> dict:
    from harness.records import read_records

    found = {p.stem: p for p in out.glob("*.json") if p.stem != "scale"}
    runs = {n: json.loads(found[n].read_text()) for n in sorted(found, key=lambda n: (n != "serial", n))}
    base = runs.get("serial")
    rows = []
    for name, r in runs.items():
        row = {"name": name, "wall_s": r["wall_s"], "cells": r["cells"], "ok": r["ok"],
               "gpus": r["gpus_visible"], "gpu": r["gpu"], "cell_stage_s": r["cell_stage_s"]}
        if base and name != "serial":
            a = {"records": read_records(out / "serial" / "records.jsonl"), "out": str(out / "serial")}
            b = {"records": read_records(out / name / "records.jsonl"), "out": str(out / name)}
            diff = same_results(a, b)
            row.update(vs_serial=round(r["wall_s"] / base["wall_s"], 3), differing=diff,
                       identical=not diff and r["ok"] == base["ok"] == base["cells"])
        rows.append(row)
    summary = {**meta, "runs": rows, "groups": {n: r["groups"] for n, r in runs.items()}}
    (out / "scale.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"\n{meta.get('card') or meta.get('device')}; {meta.get('methods')} × {meta.get('schemes')} × "
          f"scienceqa_img (limit {meta.get('limit')}, calibration {meta.get('calib')})")
    print(f"{'run':<8} {'GPUs':>4} {'wall s':>8} {'× serial':>8} {'stages s':>9} {'cells ok':>8}  "
          f"GPU mean util % (busy share)      identical")
    for row in rows:
        util = ", ".join(f"{g}: {v['util_mean']:.0f} ({v['busy_share']:.0%})" for g, v in sorted(row["gpu"].items()))
        print(f"{row['name']:<8} {row['gpus']:>4} {row['wall_s']:>8.1f} {row.get('vs_serial', 1):>8.3f} "
              f"{row['cell_stage_s']:>9.1f} {row['ok']:>3}/{row['cells']:<4}  {util:<32} "
              f"{row.get('identical', '-')}{' ' + str(row['differing']) if row.get('differing') else ''}")
    labels = sorted({g["label"] for r in runs.values() for g in r["groups"].values()})
    print(f"\n{'group':<22}" + "".join(f" {n + ' open/eval s':>22}" for n in runs))
    for lab in labels:
        cells = []
        for r in runs.values():
            g = next((g for g in r["groups"].values() if g["label"] == lab), None)
            cells.append(f"{g['open_s']:.1f}/{g['eval_s']:.1f}" if g else "-")
        print(f"{lab:<22}" + "".join(f" {c:>22}" for c in cells))
    return summary


def main(argv=None) -> int:
    from harness.perf.random_folder import add_bench_folder_args

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_bench_folder_args(ap)
    ap.add_argument("--out", required=True)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--schemes", default="w4a4,w6a6")
    ap.add_argument("--limit", type=int, default=64)
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--run", action="append", choices=["serial", "ray"], default=[],
                    help="serial (one GPU) or ray (all GPUs); repeatable")
    ap.add_argument("--report", action="store_true", help="compare the runs OUT holds")
    args = ap.parse_args(argv)
    import torch

    from harness.perf.random_folder import bench_folder

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = args.device.startswith("cuda")
    gpus = torch.cuda.device_count() if cuda else 0
    meta = {"arch": args.arch, "shape": args.shape, "device": args.device, "gpus": gpus,
            "card": torch.cuda.get_device_name() if cuda else None, "cpus": os.cpu_count(),
            "methods": args.methods, "schemes": args.schemes, "limit": args.limit, "calib": args.calib,
            "batch": args.batch, "commit": os.environ.get("QVLM_GIT_COMMIT"),
            "torch": torch.__version__}
    if args.run:
        # Built once per machine and reused by later invocations: the cells' keys include the
        # weights' fingerprint, so a rebuilt folder would make two runs' records incomparable.
        folder = Path("/tmp") / f"random-{args.arch}-{args.shape}"
        if not (folder / "config.json").exists() or not any(folder.glob("*.safetensors")):
            folder, build_s = bench_folder(args.arch, args.shape, args.tokenizer,
                                           dtype="fp16" if cuda else "fp32", device=args.device)
            meta["build_folder_s"] = build_s
        print(f"model folder {folder}", flush=True)
        suite_file = write_suite(args, folder, out)
        for name in args.run:
            run_one(name, suite_file, out, gpus)
    if args.report:
        report(out, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
