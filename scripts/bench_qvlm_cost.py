"""Search cost of Q-VLM on a LLaVA-1.5-7B-shaped model with random weights (one GPU).

Measured in one process (numbers go into docs/benchmarks/qvlm_cost.md):

1. CDM over all decoder layers: one float pass with the entropy estimator, and the partition.
2. The percentile search through the real sequential loop (``sequential_search`` on the shared
   ``run_blockwise``) over the first ``--search-layers`` decoder layers, as blocks of 3, 2 and 1
   layers (block-wise, CDM variants) and as single layers (layer-wise variants), for each
   ``--coordinates`` setting. Per-block seconds are extrapolated to the mined 32-layer partition.
3. VEO on the CLIP-L-shaped tower: the micro-batch choice (``--veo-micro-batch auto``: measured
   from a one-sequence step and the free memory), the Jacobian-weight pass, ``--veo-steps``
   optimizer steps and one evaluation, each timed per batch and extrapolated to 10 epochs x 8
   batches, with the peak GPU memory. ``--gpu-gib 80`` first fills the card down to 80 GiB of
   free memory (a ballast tensor), so an H200 answers for an 80 GB card; the peak reported then
   includes the ballast, i.e. it is what an 80 GB card would see.

Stages run in that order and each is skipped when ``--budget-s`` would be exceeded. Random
weights cost the same arithmetic as trained ones. Self-contained (no lm-eval, no datasets).

    PYTHONPATH=. python scripts/bench_qvlm_cost.py --out $OUT                    # GPU, 7B
    PYTHONPATH=. python scripts/bench_qvlm_cost.py --shape 13b --stages veo --gpu-gib 80 --out $OUT
    PYTHONPATH=. python scripts/bench_qvlm_cost.py --shape tiny --device cpu     # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_quantize_cost import build_model, calibration  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=["7b", "13b", "tiny"], default="7b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=650)
    ap.add_argument("--answer-tokens", type=int, default=8, help="labelled tokens per sequence")
    ap.add_argument("--scheme", default="w4a4")
    ap.add_argument("--search-layers", type=int, default=6)
    ap.add_argument("--coordinates", default="group,layer")
    ap.add_argument("--veo-steps", type=int, default=3)
    ap.add_argument("--veo-micro-batch", default="auto", help='"auto", "none" or a number')
    ap.add_argument("--gpu-gib", type=float, default=None,
                    help="leave only this much GPU memory free before building (simulate a card)")
    ap.add_argument("--budget-s", type=float, default=float("inf"))
    ap.add_argument("--stages", default="cdm,search,veo",
                    help="comma-separated subset of cdm,search,veo,methods")
    ap.add_argument("--methods", nargs="*", default=[],
                    help='end-to-end runs of registered methods, each NAME or NAME:{json options}')
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "qvlm_log.txt", "a")
    t_start = time.perf_counter()

    def log(*a):
        line = f"[{time.perf_counter() - t_start:7.1f}s] " + " ".join(str(x) for x in a)
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    cuda = args.device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def left():
        return args.budget_s - (time.perf_counter() - t_start)

    import transformers

    from harness.models.loading import LoadedModel
    from harness.quant.blockwise import PartInputs, part_inputs
    from harness.quant.build import target_linears
    from harness.quant.config import parse_scheme
    from methods.qvlm.dependency import mine_dependencies, partition, resolve_h0
    from methods.qvlm.encoder import VEO, VEOConfig, _chunks
    from methods.qvlm.method import DEFAULTS
    from methods.qvlm.search import sequential_search

    dtype = torch.float16 if cuda else torch.float32
    card = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    ballast = None
    if cuda and args.gpu_gib:
        free, total = torch.cuda.mem_get_info()
        extra = free - int(args.gpu_gib * 2 ** 30)
        if extra > 0:
            ballast = torch.empty(extra, dtype=torch.uint8, device=args.device)
        log(f"ballast {0 if ballast is None else extra / 2 ** 30:.1f} GiB: "
            f"{torch.cuda.mem_get_info()[0] / 2 ** 30:.1f} GiB free of {total / 2 ** 30:.1f}")
    t0 = time.perf_counter()
    if args.shape == "13b":
        from harness.perf.arch import build_random_model

        built = build_random_model("llava-1.5-13b", dtype=dtype, device=args.device)
        model, config = built.model.requires_grad_(False), built.model.config
    else:
        model, config = build_model(args.shape, None, dtype, args.device)
    calib = calibration(config, args.n, args.batch, args.seq, args.device, dtype)
    for b in calib.batches:  # the last tokens of each sequence are the "answer"
        labels = torch.full_like(b["input_ids"], -100)
        labels[:, -args.answer_tokens:] = b["input_ids"][:, -args.answer_tokens:]
        b["labels"] = labels
    lm = LoadedModel(name=f"llava-1.5-{args.shape}-shaped-random", path="", model=model,
                     processor=None, dtype=dtype, device=args.device)
    n_layers = model.config.text_config.num_hidden_layers
    log(f"built {lm.name}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params, "
        f"{n_layers} layers, {args.n}x{args.seq} tokens, {card}, in {time.perf_counter() - t0:.1f}s")
    with torch.no_grad():
        model(**next(calib.inputs()), use_cache=False)
    sync()
    qcfg = parse_scheme(args.scheme)
    res = {"card": card, "shape": args.shape, "scheme": args.scheme, "language_layers": n_layers,
           "n_calib": args.n, "seq": args.seq, "batch": args.batch, "dtype": str(dtype),
           "torch": torch.__version__, "transformers": transformers.__version__,
           "defaults": {k: v for k, v in DEFAULTS.items()}}

    def save():
        (out / "qvlm_results.json").write_text(json.dumps(res, indent=1))

    stages = set(args.stages.split(","))

    # 0. end-to-end runs of the registered methods (Method.quantize, the path a suite takes)
    if "methods" in stages:
        from harness.registry import get_method

        res["methods"] = []
        for spec_ in args.methods:
            name, _, opts = spec_.partition(":")
            opts = json.loads(opts) if opts else {}
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            state = get_method(name)(**opts).quantize(lm, qcfg, calib)
            sync()
            run = {"method": name, "options": opts, "wall_s": round(time.perf_counter() - t0, 1),
                   "search_cost_s": state.meta["search_cost_s"], "summary": state.meta["summary"],
                   "veo": {k: state.meta["veo"][k] for k in ("before", "after", "steps")}
                   if "veo" in state.meta else None,
                   "quantized_linears": len(state.linears),
                   "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 1) if cuda else None}
            res["methods"].append(run)
            log("METHOD", json.dumps(run))
            save()
            del state

    # 1. CDM
    if stages & {"cdm", "search"}:
        t0 = time.perf_counter()
        inputs = part_inputs(model, "language", calib.inputs())
        masks = [m if m is not None else torch.ones(c.hidden.shape[:2], dtype=torch.bool, device=c.hidden.device)
                 for m, c in zip(inputs.masks, inputs.calls)]
        sync()
        capture_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        deps = mine_dependencies(inputs.layers, inputs.calls, masks, qcfg.a_bits, qcfg.a_sym,
                                 DEFAULTS["cdm_tau"], DEFAULTS["cdm_samples"], 0)
        h0 = resolve_h0(deps, "median")
        blocks = partition(deps, h0, 3)
        sync()
        res["cdm"] = {"capture_s": round(capture_s, 2), "cdm_s": round(time.perf_counter() - t0, 2),
                      "h0": h0, "partition": blocks, "dependencies": [round(d, 4) for d in deps]}
        log("CDM", json.dumps(res["cdm"]))
        save()

        # 2. search on the first layers through the real loop
        k = min(args.search_layers, n_layers)
        sub = PartInputs(path=inputs.path, layers=torch.nn.ModuleList(list(inputs.layers)[:k]),
                         calls=inputs.calls, masks=inputs.masks)
        targets = {n: m for n, m in target_linears(model, qcfg).items()
                   if any(n.startswith(f"{inputs.path}.{i}.") for i in range(k))}
        joint_blocks, i = [], 0
        for size in (3, 2, 1):
            if i + size <= k:
                joint_blocks.append(list(range(i, i + size)))
                i += size
        joint_blocks += [[j] for j in range(i, k)]
        res["search"] = []
        per_layer_s = None
        for coords in (args.coordinates.split(",") if "search" in stages else []):
            for joint, blks in ((True, joint_blocks), (False, [[j] for j in range(k)])):
                est = per_layer_s * k * (3 if joint else 1) if per_layer_s else 0
                if left() < est + 60:
                    log(f"skip search coordinates={coords} joint={joint}: budget")
                    continue
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                _, summaries, _ = sequential_search(model, sub, targets, qcfg, blks, joint=joint,
                                                    coordinates=coords)
                sync()
                wall = time.perf_counter() - t0
                by_size: dict[int, list[float]] = {}
                for s in summaries:
                    by_size.setdefault(len(s["layers"]), []).append(s["seconds"])
                mean = {sz: sum(v) / len(v) for sz, v in by_size.items()}
                extra = (wall - sum(s["seconds"] for s in summaries)) / max(len(summaries), 1)
                if joint and all(len(b) in mean for b in blocks):
                    full = sum(mean[len(b)] + extra for b in blocks)
                elif not joint:
                    full = n_layers * (mean[1] + extra)
                    per_layer_s = mean[1] + extra
                else:
                    full = None
                run = {"coordinates": coords, "variant": "block-wise (CDM)" if joint else "layer-wise",
                       "blocks": blks, "wall_s": round(wall, 2),
                       "per_block": [{"layers": s["layers"], "seconds": s["seconds"],
                                      "evaluations": s["evaluations"]} for s in summaries],
                       "mean_s_by_block_size": {str(a): round(b, 2) for a, b in mean.items()},
                       "propagation_s_per_block": round(extra, 2),
                       "extrapolated_full_s": None if full is None else round(full, 1),
                       "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 1) if cuda else None}
                res["search"].append(run)
                log("SEARCH", json.dumps(run))
                save()

    # 3. VEO
    if "veo" not in stages:
        pass
    elif left() < 90:
        log("skip VEO: budget")
    else:
        micro = args.veo_micro_batch
        micro = "auto" if micro == "auto" else None if micro == "none" else int(micro)
        cfg = VEOConfig(micro_batch=micro)
        veo = VEO(model, qcfg, calib.batches[:1], cfg)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with veo.prepared():
            t0 = time.perf_counter()
            if micro == "auto":
                k = max(len(veo.layers) - 1, 1)
                veo.micro = veo.auto_micro_batch(torch.full((k,), 1.0 / k))
            else:
                veo.micro = micro
            sync()
            auto_s = time.perf_counter() - t0
            log("VEO micro-batch", json.dumps(veo.memory), f"{auto_s:.1f}s")
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            weights, jac = veo.jacobian_weights()
            sync()
            jac_s = time.perf_counter() - t0
            jac_peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None
            log("VEO Jacobian", [round(w, 4) for w in weights.tolist()], json.dumps(jac),
                f"{jac_s:.1f}s", f"peak {jac_peak} GiB")
            t0 = time.perf_counter()
            veo.evaluate(weights)
            sync()
            eval_s = time.perf_counter() - t0
            opt = torch.optim.AdamW(list(veo.vision_params.values()), lr=cfg.lr, weight_decay=0.0)
            steps = []
            for step in range(args.veo_steps):
                if left() < 30:
                    break
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                for chunk, frac in _chunks(calib.batches[step % len(calib.batches)], veo.micro):
                    t = veo.terms(chunk, weights, step)
                    (veo.total(t) * frac).backward()
                opt.step()
                sync()
                steps.append(time.perf_counter() - t0)
        step_s = min(steps[1:] or steps) if steps else None
        n_b = len(calib.batches)
        ballast_gib = 0.0 if ballast is None else ballast.numel() / 2 ** 30
        res["veo"] = {"micro_batch": veo.memory, "ballast_gib": round(ballast_gib, 1),
                      "peak_gpu_gib_without_ballast": round(torch.cuda.max_memory_allocated() / 2 ** 30
                                                            - ballast_gib, 1) if cuda else None, "jacobian_weights": weights.tolist(),
                      "jacobian": jac, "jacobian_peak_gib": None if jac_peak is None else round(jac_peak, 1),
                      "gpu_gib_cap": args.gpu_gib, "jacobian_s_per_batch": round(jac_s, 2),
                      "eval_s_per_batch": round(eval_s, 2),
                      "step_s": [round(s, 2) for s in steps],
                      "extrapolated_s": None if step_s is None else
                      round(n_b * jac_s + 2 * n_b * eval_s + cfg.epochs * n_b * step_s, 1),
                      "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 1) if cuda else None}
        log("VEO", json.dumps(res["veo"]))
        save()
    res["total_wall_s"] = round(time.perf_counter() - t_start, 1)
    save()
    log("done", res["total_wall_s"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
