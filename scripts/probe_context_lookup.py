#!/usr/bin/env python
"""Text-only probe: can a decoder of the bundled model's shape learn synth_scienceqa's context look-up?

The bundled model stays at chance on the questions that need the hint (its model card). This
probe drops the image and trains a fresh Llama decoder (default: the bundled model's 4 layers,
256 wide) on the context questions alone, from the prompt text, and prints the validation
accuracy of the first answer token as it trains:

  mc    the real task: "Context: The hot shapes are red and blue. ... Which word describes the
        blue shapes? A. hot B. cold ..." -> the option letter (look-up, then letter)
  open  the same without options -> the answer word (the look-up alone)
  mix   half of the training questions open, half multiple choice (the look-up taught beside the
        letter mapping); validated on the multiple-choice form

Training questions come from the task's train split (``--source rows``, renders every image: slow
for many rows) or straight from the three context families without rendering (``--source
families``: the same question distribution from its own random stream, ~0.2 ms a question, so
hundreds of thousands of distinct questions are cheap). Validation is always the task's own
validation split.

    python scripts/probe_context_lookup.py mc --steps 2000        # ~20 min on a 2-core CPU
    python scripts/probe_context_lookup.py mc --source families --train-rows 300000 --batch 256 \
        --steps 20000 --json /tmp/curve.json                       # GPU

Torch, transformers and the repo only; runs on CPU or CUDA.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


FAMILIES = ("labels", "owner", "material")


def context_rows(split: str, n: int, seed: int, families=FAMILIES) -> list[dict]:
    from tasks.synth.generators import ROW_FNS

    rows, i = [], 0
    while len(rows) < n:
        r = ROW_FNS["synth_scienceqa"](seed, split, i, {})
        i += 1
        if r["skill"].startswith("context_") and r["skill"][len("context_"):] in families:
            rows.append(r)
    return rows


FAMILY_STREAM = 77  # rng stream of --source families (the task's splits use 1..3 per task)


def _family_chunk(args) -> list[dict]:
    import numpy as np

    from tasks.synth import questions as qs
    from tasks.synth.generators import _ask

    seed, start, n, names = args
    fams = [getattr(qs, f"h_{f}") for f in names]  # equal weights, as in the task
    out = []
    for i in range(start, start + n):
        rng = np.random.default_rng([seed, FAMILY_STREAM, i])
        _scene, q = _ask(rng, fams[int(rng.integers(len(fams)))])
        out.append({"question": q.question, "choices": list(q.choices), "answer": q.choices.index(q.answer),
                    "hint": q.hint, "skill": q.family})
    return out


def family_rows(n: int, seed: int, workers: int = 0, families=FAMILIES) -> list[dict]:
    """``n`` context questions drawn from the families directly (no image), deterministic in ``seed``."""
    import os
    from multiprocessing import Pool

    chunk = 5000
    jobs = [(seed, s, min(chunk, n - s), tuple(families)) for s in range(0, n, chunk)]
    if len(jobs) == 1 or workers == 1:
        return [r for j in jobs for r in _family_chunk(j)]
    with Pool(workers or os.cpu_count()) as pool:
        return [r for part in pool.map(_family_chunk, jobs) for r in part]


def encode(tok, rows: list[dict], mode: str):
    """Token ids of prompt + answer + </s>, lengths, and where each answer starts."""
    from tasks import synth

    seqs, starts = [], []
    for k, r in enumerate(rows):
        if mode == "mc" or (mode == "mix" and k % 2 == 0):
            prompt, answer = synth.prompt_text("synth_scienceqa", r), "ABCDE"[r["answer"]]
        else:
            prompt, answer = f"Context: {r['hint']}\n{r['question']}", r["choices"][r["answer"]]
        p = tok(f"USER: {prompt} ASSISTANT:", add_special_tokens=False)["input_ids"]
        a = tok(answer, add_special_tokens=False)["input_ids"]
        seqs.append(p + a + [tok.eos_token_id])
        starts.append(len(p))
    ids = torch.full((len(seqs), max(map(len, seqs))), tok.pad_token_id)
    for k, s in enumerate(seqs):
        ids[k, :len(s)] = torch.tensor(s)
    return ids, torch.tensor([len(s) for s in seqs]), torch.tensor(starts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=("mc", "open", "mix"))
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--train-rows", type=int, default=20000)
    ap.add_argument("--heads", type=int, default=0, help="attention heads (0: hidden / 64)")
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--source", choices=("rows", "families"), default="rows")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--families", default=",".join(FAMILIES), help="context families to train and validate on")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--max-seconds", type=float, default=0.0, help="stop (and report) after this long")
    ap.add_argument("--json", default="", help="write the learning curve here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tasks import synth

    torch.manual_seed(a.seed)
    tok = AutoTokenizer.from_pretrained(REPO / "harness" / "models" / "bundled" / "qvlm-tiny-llava")
    t0 = time.time()
    fams = a.families.split(",")
    unknown = sorted(set(fams) - set(FAMILIES))
    if unknown:
        raise SystemExit(f"--families: unknown {unknown}; valid: {', '.join(FAMILIES)}")
    train = (context_rows("train", a.train_rows, synth.DEFAULT_SEED, fams) if a.source == "rows"
             else family_rows(a.train_rows, synth.DEFAULT_SEED, a.workers, fams))
    tr = encode(tok, train, a.mode)
    va_rows = context_rows("validation", 300, synth.DEFAULT_SEED, fams)
    va_skill = [r["skill"] for r in va_rows]
    va = encode(tok, va_rows, "open" if a.mode == "open" else "mc")
    tr, va = [t.to(a.device) for t in tr], [t.to(a.device) for t in va]
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=a.hidden, intermediate_size=3 * a.hidden,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads or a.hidden // 64,
                      num_key_value_heads=a.heads or a.hidden // 64, max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg).to(a.device)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.98), weight_decay=0.05)
    pos = torch.arange(tr[0].shape[1], device=a.device)
    print(f"{a.mode}: {len(tr[0])} train / {len(va[0])} validation questions, data in {time.time() - t0:.0f}s",
          flush=True)

    def lr_at(step):
        warm = min(1.0, (step + 1) / a.warmup)
        return a.lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / a.steps))))

    @torch.no_grad()
    def accuracy() -> float:
        model.eval()
        ids, lens, starts = va
        att = (pos[:ids.shape[1]][None] < lens[:, None]).long()
        logits = model(input_ids=ids, attention_mask=att).logits
        rows = torch.arange(len(ids), device=a.device)
        model.train()
        hit = (logits[rows, starts - 1].argmax(-1) == ids[rows, starts]).float().cpu()
        per = {f: round(float(hit[[k for k, s in enumerate(va_skill) if s == f"context_{f}"]].mean()), 3)
               for f in fams}
        return float(hit.mean()), per

    ids_all, lens_all, starts_all = tr
    amp = dict(device_type="cuda", dtype=torch.bfloat16, enabled=str(a.device).startswith("cuda"))
    curve = []
    for step in range(a.steps):
        idx = torch.randint(0, len(ids_all), (a.batch,), device=a.device)
        L = int(lens_all[idx].max())
        x = ids_all[idx, :L]
        att = (pos[:L][None] < lens_all[idx][:, None]).long()
        tgt = ((pos[1:L][None] >= starts_all[idx][:, None]) & att[:, 1:].bool()).float()
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        with torch.autocast(**amp):
            logits = model(input_ids=x, attention_mask=att).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                 x[:, 1:].reshape(-1), reduction="none").view(a.batch, L - 1)
        loss = ((loss * tgt).sum(1) / tgt.sum(1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        done = a.max_seconds and time.time() - t0 > a.max_seconds
        if (step + 1) % a.eval_every == 0 or done or step + 1 == a.steps:
            (acc, per), lv = accuracy(), loss.detach().item()
            curve.append({"step": step + 1, "loss": round(lv, 4), "accuracy": round(acc, 4), "families": per,
                          "seconds": round(time.time() - t0, 1)})
            print(f"step {step + 1} loss {lv:.3f} validation first-token accuracy {acc:.3f} {per} "
                  f"({time.time() - t0:.0f}s)", flush=True)
        if done:
            print(f"time limit: stopped at step {step + 1} of {a.steps}", flush=True)
            break
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "curve": curve}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
