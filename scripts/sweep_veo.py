"""VEO hyper-parameter sweep (issue 29 item 5): lr, λ1, λ2 chosen on held-out calibration data.

The paper gives VEO's epochs (10) and batch (8) but no learning rate, λ1 or λ2; the defaults in
``methods/qvlm/method.py`` were guesses. This script runs VEO (``methods/qvlm/encoder.py``,
unchanged) for every (lr, λ1, λ2) of a grid on the bundled model at the default suite's schemes
and measures, on calibration rows VEO did not see:

* what VEO's loss is made of: ``ent`` (L_ent with the Jacobian weights), ``err_vision``,
  ``err_output`` (L_err's parts), ``reg`` (L_reg: the float model's answer loss) and the total;
* the quantized model's answer loss ``ce_q`` (next-token cross-entropy on the answer tokens,
  letter + EOS) and answer exact match ``em_q`` (every answer token the greedy argmax, teacher
  forced: greedy decoding then writes the gold letter and stops), the quantized model being the
  one VEO's L_err trains against: round-to-nearest at the scheme's bits, activation ranges filled
  by the engine's rule for round-to-nearest on the fit rows with the tuned tower (the rule a cell
  would apply); ``ce_f`` / ``em_f`` the same for the float model (the ``fp16+veo`` view);
* how far the tower moved: max |Δw|, and ‖Δw‖ / ‖w‖ and max |Δw| / RMS(w) over all its
  parameters.

Data: the default suite's calibration source (``synth_scienceqa`` train, the engine's loader
``harness.task_data.task_pairs`` with the suite's seed, never the test split), ``--pool`` rows
(default 64, the paper's calibration size), shuffled with ``--split-seed`` and cut into a fit part
(``--fit``, default 32: the default suite's calibration size, 4 batches of 8) and the held-out
rest. The Jacobian weights of L_ent and VEO's round-to-nearest activation ranges depend only on
the untuned model, the fit rows and the scheme, so they are computed once per scheme and reused
for every configuration (the same values VEO would compute itself).

Selection rule (``choose``): score = held-out ``ce_q`` averaged over rows and schemes (λ-free,
unlike the VEO objective, whose value depends on λ); the best configuration is the lowest score
(exact ties: smaller lr, then smaller λ1, λ2). It replaces the current default only if the paired
bootstrap 95 % intervals (over held-out rows, the per-row score) of best − default *and* of best −
its null lie below 0. The null of a run (``null`` in its record) moves each tower tensor by a
seeded random direction of the same norm as VEO's step: the quantized model's answers flip under
tiny weight changes (static per-tensor ranges, 4-bit rounding), and only a gain beyond such a
move is VEO's.

Budget: ``--epochs 1`` over the 4 fit batches is 4 steps, what the default suite's ``fast`` preset
runs (1 epoch over its 32 rows); ``--confirm-epochs 10`` (the paper's epochs) reruns the default
and the best afterwards, 40 steps, as a check that the choice holds at a longer budget.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/sweep_veo.py --out results/veo-sweep
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT = {"lr": 1e-5, "lambda1": 0.1, "lambda2": 1.0}  # method.py's VEO_DEFAULTS before the sweep
GRID = {"lr": [1e-6, 1e-5, 1e-4, 1e-3], "lambda1": [0.01, 0.1, 1.0], "lambda2": [0.1, 1.0, 10.0]}
BOOT = 10000
BOOT_SEED = 0


# ---------------------------------------------------------------------------------------------
# the rule (pure functions of the records; tests use them)

def key(c: dict) -> tuple[float, float, float]:
    return (float(c["lr"]), float(c["lambda1"]), float(c["lambda2"]))


def config_rows(records: list[dict], stage: str = "grid") -> dict[tuple, dict[str, dict]]:
    """``{(lr, λ1, λ2): {scheme: record}}`` of one stage's runs."""
    out: dict[tuple, dict[str, dict]] = {}
    for r in records:
        if r.get("kind") == "run" and r.get("stage", "grid") == stage:
            out.setdefault(key(r), {})[r["scheme"]] = r
    return out


def row_scores(by_scheme: dict[str, dict], metric: str = "ce_q", null: bool = False) -> list[float]:
    """Per held-out row: the metric averaged over the schemes (``null``: of the runs' random-
    direction controls). Exact-match strings ("0110…") count as 0/1."""
    schemes = sorted(by_scheme)
    rows = [(by_scheme[s]["null"] if null else by_scheme[s])["rows"][metric] for s in schemes]
    rows = [[int(c) for c in v] if isinstance(v, str) else v for v in rows]
    return [sum(v) / len(v) for v in zip(*rows)]


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def paired_interval(a: list[float], b: list[float], n_boot: int = BOOT, seed: int = BOOT_SEED) -> tuple[float, float, float]:
    """Mean of a − b and its percentile bootstrap 95 % interval over rows (paired)."""
    d = [x - y for x, y in zip(a, b)]
    rng = random.Random(seed)
    n = len(d)
    means = sorted(sum(d[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    return mean(d), means[int(0.025 * n_boot)], means[int(0.975 * n_boot) - 1]


def choose(records: list[dict], default: dict = DEFAULT) -> dict:
    """The stated rule (module doc): best by held-out ce_q; adopted only if its paired interval
    against the default excludes 0 from below."""
    runs = config_rows(records)
    scores = {k: mean(row_scores(v)) for k, v in runs.items()}
    best = min(scores, key=lambda k: (scores[k], k))
    dkey = key(default)
    diff = paired_interval(row_scores(runs[best]), row_scores(runs[dkey]))
    vs_null = paired_interval(row_scores(runs[best]), row_scores(runs[best], null=True))
    adopt = best != dkey and diff[2] < 0 and vs_null[2] < 0
    base = [r for r in records if r.get("kind") == "untuned"]
    vs_untuned = None
    if base:
        b = {r["scheme"]: r for r in base}
        vs_untuned = paired_interval(row_scores(runs[best]), row_scores(b))
    chosen = best if adopt else dkey
    return {"best": dict(zip(("lr", "lambda1", "lambda2"), best)), "best_score": scores[best],
            "default": dict(default), "default_score": scores[dkey], "best_minus_default": diff,
            "best_minus_untuned": vs_untuned, "best_minus_null": vs_null, "adopt": adopt,
            "chosen": dict(zip(("lr", "lambda1", "lambda2"), chosen)), "scores": scores}


# ---------------------------------------------------------------------------------------------
# the runs

def machine() -> dict:
    name = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": name, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/veo-sweep")
    ap.add_argument("--suite", default="default")
    ap.add_argument("--pool", type=int, default=64)
    ap.add_argument("--fit", type=int, default=32)
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=1, help="VEO epochs over the fit batches (grid stage)")
    ap.add_argument("--lr", type=float, nargs="+", default=GRID["lr"])
    ap.add_argument("--lambda1", type=float, nargs="+", default=GRID["lambda1"])
    ap.add_argument("--lambda2", type=float, nargs="+", default=GRID["lambda2"])
    ap.add_argument("--confirm-epochs", type=int, default=10,
                    help="after the grid, rerun the default and the rule's best at this many epochs (0: skip)")
    ap.add_argument("--schemes", nargs="+", default=None, help="default: the suite's")
    ap.add_argument("--render", action="store_true", help="only rewrite OUT/table.md from OUT/records.jsonl")
    args = ap.parse_args(argv)
    if args.render:
        path = Path(args.out) / "records.jsonl"
        records = [json.loads(x) for x in path.read_text().splitlines()]
        (Path(args.out) / "table.md").write_text(render(records))
        return 0

    import torch

    torch.set_num_threads(1)
    from harness.calibration import encode_pairs
    from harness.cells import DEFAULT_CALIBRATION
    from harness.models.loading import load_model
    from harness.records import git_describe, versions
    from harness.suite_config import load_suite
    from harness.task_data import task_pairs

    suite = load_suite(args.suite)
    spec = {**DEFAULT_CALIBRATION, "seed": suite.seed, **suite.calibration}
    schemes = [q for q in suite.schemes if args.schemes is None or q.scheme in args.schemes]
    model_name = suite.models[0].name
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "records.jsonl"
    path.write_text("")

    def emit(rec: dict) -> None:
        with path.open("a") as fh:
            fh.write(json.dumps(rec, sort_keys=True) + "\n")

    lm = load_model(model_name, dtype=suite.models[0].dtype or suite.dtype, device="cpu")
    pairs = task_pairs(spec["task"], spec["split"], n=args.pool, seed=int(spec["seed"]))
    order = list(range(len(pairs)))
    random.Random(args.split_seed).shuffle(order)
    fit_idx, held_idx = sorted(order[: args.fit]), sorted(order[args.fit:])
    bs = int(spec["batch_size"])
    fit = encode_pairs(lm, [pairs[i] for i in fit_idx], bs).batches
    held = encode_pairs(lm, [pairs[i] for i in held_idx], bs).batches
    grid = list(itertools.product(args.lr, args.lambda1, args.lambda2))
    if key(DEFAULT) not in grid:
        grid.append(key(DEFAULT))
    emit({"kind": "sweep", "git": git_describe(), "machine": machine(), "versions": versions(),
          "command": "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "") + " python "
                     + " ".join(["scripts/sweep_veo.py", *(argv if argv is not None else sys.argv[1:])]),
          "model": model_name, "dtype": str(lm.dtype), "torch_threads": torch.get_num_threads(),
          "calibration": {**spec, "pool": args.pool, "fit": len(fit_idx), "held_out": len(held_idx),
                          "split_seed": args.split_seed, "fit_rows": fit_idx, "held_out_rows": held_idx,
                          "rows_are": "indices into task_pairs(task, split, n=pool, seed)"},
          "schemes": [q.scheme for q in schemes], "quant": schemes[0].to_dict(),
          "grid": {"lr": args.lr, "lambda1": args.lambda1, "lambda2": args.lambda2},
          "epochs": args.epochs, "steps": args.epochs * len(fit), "default": DEFAULT,
          "rule": "min mean held-out ce_q over rows and schemes (ties: smaller lr, λ1, λ2); adopted "
                  "only if the paired bootstrap 95% intervals of best - default and of best - its "
                  "random-direction null are below 0",
          "bootstrap": {"n": BOOT, "seed": BOOT_SEED}})

    t_all = time.process_time()
    for qcfg in schemes:
        cache = prepare(lm, qcfg, fit)
        base = evaluate(lm, qcfg, fit, held, cache["weights"], {})
        emit({"kind": "untuned", "scheme": qcfg.scheme, **base, "jacobian_weights": cache["weights"].tolist(),
              "setup_cpu_s": round(cache["cpu_s"], 2)})
        print(f"{qcfg.scheme} untuned ce_q {base['heldout']['ce_q']:.4f} em_q {base['heldout']['em_q']:.3f}", flush=True)
        for lr, l1, l2 in grid:
            rec = run_one(lm, qcfg, fit, held, cache, lr, l1, l2, args.epochs)
            emit({"kind": "run", "stage": "grid", **rec})
            h = rec["heldout"]
            print(f"{qcfg.scheme} lr {lr:g} l1 {l1:g} l2 {l2:g}: ce_q {h['ce_q']:.4f} em_q {h['em_q']:.3f} "
                  f"err_v {h['err_vision']:.4g} ent {h['ent']:.4f} move {rec['move']['max_over_rms']:.2e} "
                  f"cpu {rec['train_cpu_s'] + rec['eval_cpu_s']:.1f}s", flush=True)
    records = [json.loads(x) for x in path.read_text().splitlines()]
    pick = choose(records)
    print("rule:", json.dumps({k: v for k, v in pick.items() if k != "scores"}), flush=True)
    if args.confirm_epochs:
        todo = [key(DEFAULT)] + ([key(pick["best"])] if key(pick["best"]) != key(DEFAULT) else [])
        for qcfg in schemes:
            cache = prepare(lm, qcfg, fit)
            for lr, l1, l2 in todo:
                rec = run_one(lm, qcfg, fit, held, cache, lr, l1, l2, args.confirm_epochs)
                emit({"kind": "run", "stage": "confirm", **rec})
                print(f"confirm {qcfg.scheme} lr {lr:g} l1 {l1:g} l2 {l2:g}: ce_q {rec['heldout']['ce_q']:.4f}", flush=True)
    emit({"kind": "done", "total_cpu_s": round(time.process_time() - t_all, 1)})
    records = [json.loads(x) for x in path.read_text().splitlines()]
    (out_dir / "table.md").write_text(render(records))
    return 0


def prepare(lm, qcfg, fit) -> dict:
    """The Jacobian weights and VEO's round-to-nearest activation quantizers for ``qcfg`` on the
    untuned model (the same for every configuration)."""
    from methods.qvlm.encoder import VEO, VEOConfig

    t0 = time.process_time()
    veo = VEO(lm.model, qcfg, fit, VEOConfig(epochs=0, report=False))
    acts = veo._acts()
    with veo.prepared():
        veo.micro = None
        weights, jac = veo.jacobian_weights()
    return {"acts": acts, "weights": weights, "jac": jac, "cpu_s": time.process_time() - t0}


def cached_veo(cache: dict):
    from methods.qvlm.encoder import VEO

    class CachedVEO(VEO):
        def _acts(self):
            return copy.deepcopy(cache["acts"])

        def jacobian_weights(self):
            return cache["weights"].clone(), copy.deepcopy(cache["jac"])

    return CachedVEO


def run_one(lm, qcfg, fit, held, cache, lr, l1, l2, epochs) -> dict:
    import torch

    from harness.models.layers import part_of
    from methods.qvlm.encoder import VEOConfig

    cfg = VEOConfig(epochs=epochs, lr=lr, lambda1=l1, lambda2=l2, report=False)
    w0, c0 = time.perf_counter(), time.process_time()
    params, info = cached_veo(cache)(lm.model, qcfg, fit, cfg).run()
    train_cpu, train_wall = time.process_time() - c0, time.perf_counter() - w0
    vision = {n: p.detach().clone() for n, p in lm.model.named_parameters() if part_of(n) == "vision"}
    assert set(params) <= set(vision), "VEO changed parameters outside the vision tower"
    tot_sq = sum(float(p.to(torch.float64).pow(2).sum()) for p in vision.values())
    tot_n = sum(p.numel() for p in vision.values())
    d_sq, d_max = 0.0, 0.0
    for n, new in params.items():
        d = new.to(torch.float64) - vision[n].to(torch.float64)
        d_sq += float(d.pow(2).sum())
        d_max = max(d_max, float(d.abs().max()))
    rms = (tot_sq / tot_n) ** 0.5
    move = {"max_abs": d_max, "max_over_rms": d_max / rms, "rel_norm": (d_sq / tot_sq) ** 0.5,
            "weight_rms": rms, "params_changed": len(params)}
    c1 = time.process_time()
    res = evaluate(lm, qcfg, fit, held, cache["weights"], params, cfg)
    eval_cpu = time.process_time() - c1
    # the null: a random direction with the same norm per tensor (seeded per run), evaluated alike
    gen = torch.Generator().manual_seed(null_seed(qcfg.scheme, lr, l1, l2, epochs))
    rand = {}
    for n, new in params.items():
        w, d = vision[n], new.to(torch.float64) - vision[n].to(torch.float64)
        r = torch.randn(d.shape, generator=gen, dtype=torch.float64)
        rand[n] = (w.to(torch.float64) + r * (d.norm() / r.norm().clamp_min(1e-300))).to(w.dtype)
    null = evaluate(lm, qcfg, fit, held, cache["weights"], rand, cfg)
    return {"scheme": qcfg.scheme, "lr": lr, "lambda1": l1, "lambda2": l2, "epochs": epochs,
            "steps": info["steps"], "move": move, **res,
            "null": {"heldout": null["heldout"], "rows": {k: null["rows"][k] for k in ("ce_q", "em_q")}},
            "train_cpu_s": round(train_cpu, 2), "train_wall_s": round(train_wall, 2),
            "eval_cpu_s": round(eval_cpu, 2), "null_cpu_s": round(time.process_time() - c1 - eval_cpu, 2)}


def null_seed(scheme: str, lr: float, l1: float, l2: float, epochs: int) -> int:
    import zlib

    return zlib.crc32(f"{scheme} {lr!r} {l1!r} {l2!r} {epochs}".encode())


def evaluate(lm, qcfg, fit, held, weights, params: dict, cfg=None) -> dict:
    """Held-out terms with the tower set to ``params`` (none: untuned); the model is restored."""
    import torch

    from harness.quant.answers import answer_mask
    from methods.qvlm.encoder import VEO, VEOConfig, _rel_err

    cfg = cfg or VEOConfig(epochs=0, report=False)
    model = lm.model
    saved = {n: model.get_parameter(n).detach().clone() for n in params}
    sums: dict[str, float] = {}
    rows: dict[str, list] = {"ce_q": [], "ce_f": [], "em_q": [], "em_f": []}
    try:
        with torch.no_grad():
            for n, v in params.items():
                model.get_parameter(n).copy_(v)
        veo = VEO(model, qcfg, fit, cfg)  # its activation ranges: filled on the fit rows, tuned tower
        with veo.prepared(), torch.no_grad():
            veo.micro = None
            for b, batch in enumerate(held):
                out_r, hid_r, xv_r = veo._forward(batch, quant=False, labels=True)
                out_q, _, xv_q = veo._forward(batch, quant=True, labels=True)
                mask = batch.get("attention_mask")
                ent = veo.entropy_term(hid_r, mask, weights, cfg.seed + 1 + b)
                err_out = _rel_err(out_q.logits, out_r.logits, mask)
                err_v = veo.vision_error(xv_q, xv_r)
                err_v = err_out.new_zeros(()) if err_v is None else err_v
                t = {"reg": out_r.loss, "ent": ent, "err_vision": err_v, "err_output": err_out,
                     "err": err_v + cfg.eta * err_out, "reg_q": out_q.loss}
                t["objective"] = veo.total(t)
                for k, v in t.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                amask = answer_mask(batch)
                for tag, out in (("q", out_q), ("f", out_r)):
                    ce, em = per_row(out.logits, batch["labels"], amask)
                    rows[f"ce_{tag}"] += ce
                    rows[f"em_{tag}"] += em
    finally:
        with torch.no_grad():
            for n, v in saved.items():
                model.get_parameter(n).copy_(v)
    heldout = {k: v / len(held) for k, v in sums.items()}
    heldout.update({k: mean(v) for k, v in rows.items()})
    return {"heldout": heldout,
            "rows": {"ce_q": [round(x, 5) for x in rows["ce_q"]], "ce_f": [round(x, 5) for x in rows["ce_f"]],
                     "em_q": "".join(map(str, rows["em_q"])), "em_f": "".join(map(str, rows["em_f"]))}}


def per_row(logits, labels, amask) -> tuple[list[float], list[int]]:
    """Per sequence: mean next-token cross-entropy over its answer tokens, and whether every
    answer token is the argmax (teacher forced)."""
    import torch
    from torch.nn import functional as F

    lg = logits[:, :-1].to(torch.float64)
    tgt = labels[:, 1:]
    m = amask[:, 1:]
    ce = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.clamp_min(0).reshape(-1), reduction="none")
    ce = ce.view(tgt.shape)
    hit = (lg.argmax(-1) == tgt) | ~m
    out_ce = [float((ce[i] * m[i]).sum() / m[i].sum()) for i in range(tgt.shape[0])]
    out_em = [int(bool(hit[i].all())) for i in range(tgt.shape[0])]
    return out_ce, out_em


# ---------------------------------------------------------------------------------------------
# the table

def fmt_cfg(k) -> str:
    return f"{k[0]:g} | {k[1]:g} | {k[2]:g}"


def _span(vals, f) -> str:
    lo, hi = f(min(vals)), f(max(vals))
    return lo if lo == hi else f"{lo}–{hi}"


LR_COLUMNS = [("err_output", "w4a4", "g"), ("err_output", "w6a6", "g"), ("ent", "w4a4", "f"),
              ("ent", "w6a6", "f"), ("err_vision", "w4a4", "g"), ("err_vision", "w6a6", "g")]


def lr_rows(records: list[dict]) -> list[str]:
    """Per learning rate, over its (λ1, λ2) pairs: the move, the held-out terms, score and null
    score as min–max (the untuned tower first). Markdown rows, as methods/qvlm/README.md quotes."""
    fmt = {"g": lambda x: f"{x:.4g}", "f": lambda x: f"{x:.4f}"}
    runs = config_rows(records)
    base = {r["scheme"]: r for r in records if r.get("kind") == "untuned"}
    out = []
    if base:
        cells = ["untuned", "0"] + [fmt[f](base[s]["heldout"][m]) for m, s, f in LR_COLUMNS]
        out.append("| " + " | ".join(cells + [f"{mean(row_scores(base)):.4f}", "–"]) + " |")
    for lr in sorted({k[0] for k in runs}):
        ks = [k for k in runs if k[0] == lr]
        cells = [f"{lr:g}", _span([r["move"]["max_over_rms"] * 100 for k in ks for r in runs[k].values()],
                                  lambda x: f"{x:.3g}")]
        cells += [_span([runs[k][s]["heldout"][m] for k in ks], fmt[f]) for m, s, f in LR_COLUMNS]
        cells.append(_span([mean(row_scores(runs[k])) for k in ks], lambda x: f"{x:.4f}"))
        cells.append(_span([mean(row_scores(runs[k], null=True)) for k in ks], lambda x: f"{x:.4f}"))
        out.append("| " + " | ".join(cells) + " |")
    return out


LR_HEADER = ("| lr | move % | W4A4 err_o | W6A6 err_o | W4A4 ent | W6A6 ent | W4A4 err_v | W6A6 err_v "
             "| score | null score |\n|---|---|---|---|---|---|---|---|---|---|")


def render(records: list[dict]) -> str:
    head = next(r for r in records if r.get("kind") == "sweep")
    done = next((r for r in records if r.get("kind") == "done"), {})
    runs = config_rows(records)
    schemes = head["schemes"]
    pick = choose(records)
    base = {r["scheme"]: r for r in records if r.get("kind") == "untuned"}
    dkey = key(DEFAULT)
    lines = [
        "# VEO sweep (ours): held-out calibration rows",
        "",
        f"Commit `{(head.get('git') or {}).get('commit')}` (dirty: {(head.get('git') or {}).get('dirty')}), "
        f"{head['machine']['cpu']} ({head['machine']['cores']} cores, torch threads {head['torch_threads']}), "
        f"{head['dtype']}. Command: `{head['command']}`.",
        f"Model `{head['model']}`; calibration `{head['calibration']['task']}` {head['calibration']['split']}, "
        f"{head['calibration']['pool']} rows (seed {head['calibration']['seed']}) split by seed "
        f"{head['calibration']['split_seed']} into {head['calibration']['fit']} fit / "
        f"{head['calibration']['held_out']} held-out; VEO {head['epochs']} epochs = {head['steps']} steps "
        f"on the fit rows; total CPU {done.get('total_cpu_s')} s.",
        "",
        "`ce_q`: the quantized (RTN) model's held-out answer cross-entropy; `em_q`: answer exact "
        "match (teacher-forced greedy), `err_v` / `err_o`: L_err's vision and output parts, `ent`: "
        "L_ent, all held-out; `move`: max |Δw| / RMS(w) of the tower, %; `cpu`: train + eval CPU "
        "seconds per run (the null's evaluation not included). Score: `ce_q` averaged over rows and "
        "schemes; Δ: score − default's; null score: the same for the run's random-direction control "
        "(each tensor moved as far as VEO moved it, in a random direction).",
        "",
    ]
    cols = " | ".join(f"{s} ce_q | {s} em_q | {s} err_v | {s} err_o | {s} ent | {s} move % | {s} cpu s" for s in schemes)
    lines.append(f"| lr | λ1 | λ2 | score | Δ default | null score | {cols} |")
    lines.append("|" + "---|" * (6 + 7 * len(schemes)))

    def cells(rs: dict) -> str:
        parts = []
        for s in schemes:
            r = rs[s]
            h = r["heldout"]
            mv = f"{100 * r['move']['max_over_rms']:.3g}" if "move" in r else "0"
            cpu = f"{r['train_cpu_s'] + r['eval_cpu_s']:.1f}" if "train_cpu_s" in r else ""
            parts.append(f"{h['ce_q']:.4f} | {100 * h['em_q']:.1f} | {h['err_vision']:.4g} | "
                         f"{h['err_output']:.4g} | {h['ent']:.4f} | {mv} | {cpu}")
        return " | ".join(parts)

    if base:
        bs = mean(row_scores(base))
        lines.append(f"| untuned | – | – | {bs:.4f} | {bs - pick['default_score']:+.4f} | – | {cells(base)} |")
    for k in sorted(runs, key=lambda k: pick["scores"][k]):
        tag = " (default)" if k == dkey else ""
        ns = mean(row_scores(runs[k], null=True))
        lines.append(f"| {fmt_cfg(k)}{tag} | {pick['scores'][k]:.4f} | {pick['scores'][k] - pick['default_score']:+.4f} "
                     f"| {ns:.4f} | {cells(runs[k])} |")
    d = pick["best_minus_default"]
    lines += ["", f"Rule: best = lr {pick['best']['lr']:g}, λ1 {pick['best']['lambda1']:g}, λ2 "
              f"{pick['best']['lambda2']:g} (score {pick['best_score']:.4f}); best − default "
              f"{d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}] (paired bootstrap over held-out rows); "
              f"{'adopted' if pick['adopt'] else 'not adopted: the defaults stay'}."]
    n = pick["best_minus_null"]
    lines.append(f"Best − its random-direction null: {n[0]:+.4f} [{n[1]:+.4f}, {n[2]:+.4f}].")
    if pick["best_minus_untuned"]:
        u = pick["best_minus_untuned"]
        lines.append(f"Best − untuned tower: {u[0]:+.4f} [{u[1]:+.4f}, {u[2]:+.4f}].")
    if {s for _m, s, _f in LR_COLUMNS} <= set(schemes):
        lines += ["", "Per learning rate, min–max over its (λ1, λ2) pairs:", "", LR_HEADER, *lr_rows(records)]
    conf = config_rows(records, "confirm")
    if conf:
        steps = sorted({r["steps"] for rs in conf.values() for r in rs.values()})
        lines += ["", f"Confirmation at {', '.join(map(str, steps))} steps (the default and the grid's best, "
                  "same fit and held-out rows):", "", f"| lr | λ1 | λ2 | score | {cols} |",
                  "|" + "---|" * (4 + 7 * len(schemes))]
        for k, rs in conf.items():
            lines.append(f"| {fmt_cfg(k)} | {mean(row_scores(rs)):.4f} | {cells(rs)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
