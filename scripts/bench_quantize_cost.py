"""Quantization wall time of GPTQ and AWQ on a LLaVA-1.5-7B-shaped model with random weights.

Random weights cost the same arithmetic as real ones, so the timing is representative; the
numbers go into docs/benchmarks/quantize_cost.md. Self-contained (no lm-eval, no datasets, no
download): the model is built from the llava-hf/llava-1.5-7b-hf architecture, the calibration set
is ``--n`` random sequences of LLaVA length (one 336px image = 576 tokens, plus text).

    PYTHONPATH=. python scripts/bench_quantize_cost.py --out /tmp/cost            # GPU, 7B
    PYTHONPATH=. python scripts/bench_quantize_cost.py --shape tiny --device cpu  # smoke test

Writes ``results.json`` and ``log.txt`` under ``--out`` (progress per layer, flushed as it goes,
so a run cut off by a time limit still says how far it got).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Shapes: the shipped llava-1.5-7b architecture (harness/perf/configs), and a tiny variant of it
# for smoke runs on a CPU (same classes and wiring, a few thousand times fewer parameters).
ARCH = "llava-1.5-7b"
SHAPES = {
    "7b": {},
    "tiny": {"text_config": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512),
             "vision_config": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, image_size=28, patch_size=14, projection_dim=32),
             "image_seq_length": 4},
}


def build_model(shape: str, layers: int | None, dtype: torch.dtype, device: str):
    """The model of ``shape`` with random weights (``layers``: truncate the language model)."""
    from harness.perf.arch import build_random_model

    text = {"num_hidden_layers": layers} if layers else {}
    lm = build_random_model(ARCH, dtype=dtype, device=device, overrides=SHAPES[shape], **text)
    return lm.model.requires_grad_(False), lm.model.config


def calibration(config, n: int, batch: int, seq: int, device: str, dtype: torch.dtype, seed: int = 0):
    """``n`` random sequences of ``seq`` tokens, one image's placeholder tokens in each."""
    from harness.calibration import CalibrationSet

    g = torch.Generator().manual_seed(seed)
    n_img = config.image_seq_length
    size = config.vision_config.image_size
    image_token = config.image_token_index
    n_text = seq - n_img - 1
    before = min(5, n_text)
    batches = []
    for start in range(0, n, batch):
        b = min(batch, n - start)
        ids = torch.randint(2, image_token, (b, seq), generator=g)
        ids[:, 0] = 1
        ids[:, 1 + before:1 + before + n_img] = image_token
        batches.append({
            "input_ids": ids.to(device),
            "attention_mask": torch.ones(b, seq, dtype=torch.long, device=device),
            "pixel_values": torch.randn(b, 3, size, size, generator=g).to(device=device, dtype=dtype),
        })
    return CalibrationSet(batches=batches, source={"kind": "random", "n": n, "seq": seq})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--layers", type=int, default=None, help="truncate the language model")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=64, help="calibration sequences")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=650)
    ap.add_argument("--jobs", default="gptq:w4a16,awq:w4a16",
                    help="comma-separated method:scheme[:parts+with+plus] runs, in order (any registered method)")
    ap.add_argument("--budget-s", type=float, default=float("inf"),
                    help="skip a job unless it should end (judging by the same method's last run) "
                         "within this many seconds of the start")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    args = ap.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        handlers=[logging.StreamHandler(sys.stdout),
                                  logging.FileHandler(out / "log.txt")])
    log = logging.getLogger("bench")
    t_start = time.perf_counter()

    import transformers

    from harness.models.loading import LoadedModel
    from harness.registry import get_method
    from harness.quant.config import parse_scheme

    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    t0 = time.perf_counter()
    model, config = build_model(args.shape, args.layers, dtype, args.device)
    calib = calibration(config, args.n, args.batch, args.seq, args.device, dtype)
    lm = LoadedModel(name=f"llava-1.5-{args.shape}-shaped-random", path="", model=model,
                     processor=None, dtype=dtype, device=args.device)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("built %s (%.2fB params, %d language layers) + %d x %d calibration tokens on %s in %.1fs",
             lm.name, n_params / 1e9, model.config.text_config.num_hidden_layers, args.n, args.seq,
             card, time.perf_counter() - t0)
    with torch.no_grad():  # warm-up: kernels, allocator
        model(**next(calib.inputs()), use_cache=False)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()

    results = {"card": card, "shape": args.shape, "language_layers": model.config.text_config.num_hidden_layers,
               "params": n_params, "n_calib": args.n, "seq": args.seq, "batch": args.batch,
               "dtype": str(dtype), "torch": torch.__version__, "transformers": transformers.__version__,
               "runs": []}
    for job in args.jobs.split(","):
        name, scheme, *rest = job.split(":")
        parts = rest[0].split("+") if rest else ["language"]
        expected = max((r["wall_s"] for r in results["runs"] if r.get("method") == name and "wall_s" in r),
                       default=0.0)
        if time.perf_counter() - t_start + expected > args.budget_s:
            log.info("budget spent: skipping %s", job)
            results["runs"].append({"method": name, "scheme": scheme, "parts": parts, "skipped": True})
            continue
        qcfg = parse_scheme(scheme, parts=parts)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        state = get_method(name)().quantize(lm, qcfg, calib)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        run = {"method": name, "scheme": scheme, "parts": parts, "wall_s": round(wall, 2),
               "quantize_s": round(state.meta.get("quantize_s", wall), 2), "part_s": state.meta.get("part_s"),
               # (not state.proof(): its distinct-codes count sorts every row on the CPU, ~30 s at 7B)
               "quantized_linears": sum(lq.codes is not None for lq in state.linears.values()),
               "peak_gpu_bytes": torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else None}
        results["runs"].append(run)
        log.info("RESULT %s", json.dumps(run))
        del state
        (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print("\n| method | scheme | parts | wall s | peak GPU GiB |")
    for r in results["runs"]:
        if r.get("skipped"):
            print(f"| {r['method']} | {r['scheme']} | {'+'.join(r['parts'])} | skipped | |")
        else:
            peak = r["peak_gpu_bytes"] / 2 ** 30 if r["peak_gpu_bytes"] else float("nan")
            print(f"| {r['method']} | {r['scheme']} | {'+'.join(r['parts'])} | {r['wall_s']:.1f} | {peak:.1f} |")
    print(f"card: {card}; torch {torch.__version__}; transformers {transformers.__version__}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
