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

SHAPES = {
    # llava-hf/llava-1.5-7b-hf: Vicuna-7B decoder + CLIP ViT-L/14-336 + 2-layer GELU projector
    "7b": dict(text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                         max_position_embeddings=4096, rms_norm_eps=1e-5),
               vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                           num_attention_heads=16, image_size=336, patch_size=14,
                           projection_dim=768),
               image_tokens=576),
    "tiny": dict(text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, vocab_size=32064,
                           max_position_embeddings=512),
                 vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, image_size=28, patch_size=14,
                             projection_dim=32),
                 image_tokens=4),
}
IMAGE_TOKEN = 32000


def build_model(shape: str, layers: int | None, dtype: torch.dtype, device: str):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    spec = SHAPES[shape]
    text = dict(spec["text"])
    if layers:
        text["num_hidden_layers"] = layers
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**spec["vision"], hidden_act="quick_gelu"),
        text_config=LlamaConfig(**text, pad_token_id=32001, tie_word_embeddings=False),
        image_token_index=IMAGE_TOKEN, image_seq_length=spec["image_tokens"],
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", pad_token_id=32001)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(prev)
    return model.eval().requires_grad_(False), spec


def calibration(spec, n: int, batch: int, seq: int, device: str, dtype: torch.dtype, seed: int = 0):
    from harness.calibration import CalibrationSet

    g = torch.Generator().manual_seed(seed)
    n_img = spec["image_tokens"]
    size = spec["vision"]["image_size"]
    n_text = seq - n_img - 1
    before = min(5, n_text)
    batches = []
    for start in range(0, n, batch):
        b = min(batch, n - start)
        ids = torch.randint(2, IMAGE_TOKEN, (b, seq), generator=g)
        ids[:, 0] = 1
        ids[:, 1 + before:1 + before + n_img] = IMAGE_TOKEN
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
                    help="comma-separated method:scheme[:parts+with+plus] runs, in order")
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

    from baselines.awq import AWQ
    from baselines.gptq import GPTQ
    from harness.models.loading import LoadedModel
    from harness.quant.config import parse_scheme

    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    t0 = time.perf_counter()
    model, spec = build_model(args.shape, args.layers, dtype, args.device)
    calib = calibration(spec, args.n, args.batch, args.seq, args.device, dtype)
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
    methods = {"gptq": GPTQ, "awq": AWQ}
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
        state = methods[name]().quantize(lm, qcfg, calib)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        run = {"method": name, "scheme": scheme, "parts": parts, "wall_s": round(wall, 2),
               "quantize_s": round(state.meta["quantize_s"], 2), "part_s": state.meta.get("part_s"),
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
