"""The real suite's code path at 7B/13B on one GPU: where a cell's time and memory go.

Builds a model folder with random weights for ``--arch`` (``harness/perf/random_folder.py``):
LLaVA-1.5-7B/13B (Llama-2 tokenizer, 336 px CLIP processor, the project's chat template) or
Qwen2.5-VL-7B (a Qwen2-schema tokenizer built offline, a Qwen2-VL image processor with
lmms-eval's 256-2048 visual-token bounds, Qwen2-VL's chat template). Runs a suite over it through
the normal runner — the ``--methods`` (default fp16, rtn, gptq, awq, qvlm at their defaults) at
w4a4 on scienceqa_img from local rows — and prints a per-stage table from the records (load,
calibrate, quantize, finalize incl. proof, apply, eval, record; cell wall time, the overhead
outside quantize + eval and what no stage accounts for; peak GPU memory). Then, unless
``--skip-throughput``, it times the lm-eval bridge against plain Hugging Face ``generate`` on the
same questions and batches.

    PYTHONPATH=. python scripts/bench_suite_7b.py --arch llava-1.5-7b --tokenizer DIR \\
        --data-dir DIR --out $OUT                                  # GPU (docs/benchmarks/suite_7b.md)
    PYTHONPATH=. python scripts/bench_suite_7b.py --arch qwen2.5-vl-7b --data-dir DIR --out $OUT
    PYTHONPATH=. python scripts/bench_suite_7b.py --shape tiny --device cpu --limit 4 --calib 4 \\
        --tokenizer TOKDIR --data-dir DIR --out /tmp/b   # smoke test (also with --arch qwen2.5-vl-7b)

``--tokenizer`` (LLaVA only) is a folder with the Llama-2 SentencePiece ``tokenizer.model`` (the
tokenizer of LLaVA-1.5's Vicuna; MIT-licensed copy in llama2.c). ``--data-dir`` holds
``scienceqa_img/test.parquet`` (the HF schema); calibration draws from the same rows (``--calib``
of them). Random weights generate to the token limit: the slow end of evaluation throughput.
Writes ``suite_7b.json`` (rewritten after every cell, so a run cut off by a time limit keeps the
cells it finished), ``stages.md`` and the suite's records under ``--out``. Each cell's cached
quantization state is deleted once its record is written (``--keep-states`` keeps them): a 7B
state is several GB, and eight of them beside a 16 GB folder fill a 64 GB disk; writing it is
still timed, inside the cell's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STAGES = ("load_s", "calibrate_s", "quantize_s", "finalize_s", "apply_s", "eval_s", "record_s")


def default_dtype(arch: str, device: str) -> str:
    """fp32 on the CPU; on a GPU the dtype the family's real suite runs in: bf16 for Qwen2.5-VL
    (harness/suites/qwen2.5-vl.yaml: its release dtype), fp16 for LLaVA."""
    from harness.perf.random_folder import arch_model_type

    if not device.startswith("cuda"):
        return "fp32"
    return "bf16" if arch_model_type(arch) == "qwen2_5_vl" else "fp16"


def write_atomic(path: Path, text: str) -> None:
    """``path`` holds the old text or the new, never a part (a time limit may stop the run anywhere)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def cell_row(r: dict, wall: float) -> dict:
    """One cell's row of the per-stage table from its record and the wall time since the last."""
    tm = r.get("timings") or {}
    row = {"variant": r.get("variant"), "scheme": r.get("scheme"), "status": r.get("status"),
           "wall_s": round(wall, 2), **{k: tm.get(k) for k in STAGES},
           "peak_gib": r.get("peak_gib"), "error": (r.get("error") or "")[:200] or None}
    row["overhead_s"] = round(wall - (tm.get("quantize_s") or 0) - (tm.get("eval_s") or 0), 2)
    # the state's cache write, the suite's planning before the first cell, ...: in no stage
    row["unstaged_s"] = round(wall - sum(tm.get(k) or 0 for k in STAGES), 2)
    return row


def stage_table(rows: list[dict]) -> str:
    """The per-stage table (markdown): seconds per stage, wall, overhead, peak GiB."""
    cols = ["wall_s", *STAGES, "overhead_s", "unstaged_s"]
    head = "| variant | " + " | ".join(c[:-2] for c in cols) + " | peak GiB quantize / eval | status |"
    lines = [head, "|" + "---|" * (len(cols) + 3)]
    for r in rows:
        pk = r.get("peak_gib") or {}
        cells = [f"{r[c]:.2f}" if isinstance(r.get(c), (int, float)) else "–" for c in cols]
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error')}"
        lines.append(f"| {r['variant']} | " + " | ".join(cells)
                     + f" | {pk.get('quantize', '–')} / {pk.get('eval', '–')} | {status} |")
    return "\n".join(lines)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def eval_throughput(model_dir: str, data_dir: str, limit: int, batch: int, device: str, dtype: str) -> dict:
    """Questions per second: the lm-eval bridge vs plain ``generate`` on the same prompts and batches."""
    import torch

    from harness.evaluate import DEFAULT_MAX_NEW_TOKENS, evaluate_tasks
    from harness.models.loading import load_model
    from harness.prompting import chat_prompt
    from harness.task_data import task_pairs
    from tasks.sources import task_spec

    lm = load_model(model_dir, dtype=dtype, device=device)
    pairs = task_pairs("scienceqa_img", "test", data_dir)[:limit]  # lm-eval's `limit`: the first rows
    proc = lm.processor
    proc.tokenizer.padding_side = "left"
    max_new = int(task_spec_gen_tokens("scienceqa_img") or DEFAULT_MAX_NEW_TOKENS)

    def plain() -> float:
        _sync(device)
        t0 = time.perf_counter()
        for i in range(0, len(pairs), batch):
            chunk = pairs[i:i + batch]
            enc = proc(images=[im for im, _, _ in chunk], text=[chat_prompt(proc, t) for _, t, _ in chunk],
                       return_tensors="pt", padding=True).to(device)
            enc["pixel_values"] = enc["pixel_values"].to(lm.dtype)
            with torch.inference_mode():
                lm.model.generate(**enc, max_new_tokens=max_new, do_sample=False, num_beams=1,
                                  pad_token_id=proc.tokenizer.pad_token_id)
        _sync(device)
        return time.perf_counter() - t0

    def bridge() -> float:
        _sync(device)
        t0 = time.perf_counter()
        evaluate_tasks(lm, [task_spec("scienceqa_img", data_dir)], limit=limit, batch_size=batch,
                       show_progress=False)
        _sync(device)
        return time.perf_counter() - t0

    plain()  # warm-up: CUDA context, kernels, processor caches
    out = {"questions": len(pairs), "batch_size": batch, "max_new_tokens": max_new}
    times = {"plain": [], "bridge": []}
    for _ in range(2):  # interleaved, so drift hits both
        times["bridge"].append(bridge())
        times["plain"].append(plain())
    out.update({k: round(min(v), 3) for k, v in times.items()})
    out["plain_q_per_s"] = round(len(pairs) / out["plain"], 2)
    out["bridge_q_per_s"] = round(len(pairs) / out["bridge"], 2)
    out["bridge_vs_plain"] = round(out["plain"] / out["bridge"], 3)
    del lm
    return out


def task_spec_gen_tokens(task: str) -> int | None:
    from tasks.sources import task_config

    return (task_config(task).get("generation_kwargs") or {}).get("max_gen_toks")


def main(argv=None) -> int:
    from harness.perf.random_folder import add_bench_folder_args

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_bench_folder_args(ap)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default=None,
                    help="default: fp32 on cpu; on cuda bf16 for Qwen2.5-VL, fp16 for LLaVA (default_dtype)")
    ap.add_argument("--methods", default="fp16,rtn,gptq,awq,qvlm")
    ap.add_argument("--schemes", default="w4a4")
    ap.add_argument("--limit", type=int, default=32)
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--method-options", default="{}", help="JSON {method: {option: value}}")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--keep-states", action="store_true",
                    help="keep each cell's cached quantization state (default: deleted after its record)")
    args = ap.parse_args(argv)
    import torch

    from harness.suite_config import parse_suite
    from harness.perf.random_folder import bench_folder
    from harness.runner import run_suite

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = args.dtype or default_dtype(args.arch, args.device)
    result: dict = {"arch": args.arch, "shape": args.shape, "device": args.device, "dtype": dtype,
                    "methods": args.methods.split(","), "limit": args.limit, "calib": args.calib,
                    "batch": args.batch}
    if args.device.startswith("cuda"):
        result["card"] = torch.cuda.get_device_name()
    result["commit"] = os.environ.get("QVLM_GIT_COMMIT")
    folder, result["build_folder_s"] = bench_folder(args.arch, args.shape, args.tokenizer, dtype=dtype,
                                                    device=args.device)
    result["folder"] = str(folder)
    print(f"model folder {folder} in {result['build_folder_s']} s", flush=True)
    suite = parse_suite({
        "name": "suite-7b", "models": [str(folder)], "methods": args.methods.split(","),
        "schemes": args.schemes.split(","), "tasks": ["scienceqa_img"], "data_dir": args.data_dir,
        "limit": args.limit, "batch_size": args.batch, "device": args.device, "dtype": dtype,
        "calibration": {"task": "scienceqa_img", "split": "test", "n": args.calib, "batch_size": 8},
        "method_options": json.loads(args.method_options), "output": str(out / "suite"),
    })
    rows: list[dict] = []
    result["cells"] = rows
    t_run = prev = time.perf_counter()

    def on_record(r: dict) -> None:
        nonlocal prev
        t = time.perf_counter()
        rows.append(cell_row(r, t - prev))
        prev = t
        row = rows[-1]
        print(f"cell {row['variant']} {row['status']}: wall {row['wall_s']} s, quantize {row['quantize_s']}, "
              f"eval {row['eval_s']}, peak {row['peak_gib']}" + (f", {row['error']}" if row["error"] else ""),
              flush=True)
        if not args.keep_states and r.get("state_key"):
            shutil.rmtree(out / "suite" / "cache" / "states" / r["state_key"], ignore_errors=True)
        result["suite_wall_s"] = round(t - t_run, 2)
        write_atomic(out / "suite_7b.json", json.dumps(result, indent=1, default=str))  # kept if cut off
        write_atomic(out / "stages.md", stage_table(rows) + "\n")

    summary = run_suite(suite, show_progress=False, on_record=on_record)
    result["suite_wall_s"] = round(time.perf_counter() - t_run, 2)
    result["ok"], result["failed"] = summary.ok, summary.failed
    if not args.skip_throughput:
        import gc

        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        result["throughput"] = eval_throughput(str(folder), args.data_dir, args.limit, args.batch,
                                               args.device, dtype)
    (out / "suite_7b.json").write_text(json.dumps(result, indent=1, default=str))
    table = stage_table(rows)
    (out / "stages.md").write_text(table + "\n")
    print(f"\n{args.arch} ({args.shape}) on {result.get('card', args.device)}, {dtype}; folder "
          f"{result['build_folder_s']} s, suite {result['suite_wall_s']} s, {result['ok']} ok / "
          f"{result['failed']} failed; seconds per stage, peak GPU GiB\n{table}")
    if "throughput" in result:
        tp = result["throughput"]
        print(f"eval throughput ({tp['questions']} q, batch {tp['batch_size']}): plain generate "
              f"{tp['plain_q_per_s']} q/s, lm-eval bridge {tp['bridge_q_per_s']} q/s ({tp['bridge_vs_plain']}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
