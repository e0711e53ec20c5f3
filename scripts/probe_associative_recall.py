#!/usr/bin/env python
"""Toy associative recall: does a small Llama decoder learn a look-up, and how does the layout matter?

The multi-fact context look-ups of synth_scienceqa versions 1-3 stayed at chance in every model
trained on them and in a text-only probe (``probe_context_lookup.py``, removed with those
questions in version 4; the bundled model's card has the results). This strips the task to
tokens: three key/value pairs, then a query key, and the value to predict at the last position. ``--layout`` places each value relative to
its key:

  kv      key value ,              (value right after its key: one induction step)
  after2  key - value ,            (two positions after)
  after3  key x y value ,          (three after)
  before3 value x y key ,          (three before, like "Mia drew the circles.")

    python scripts/probe_associative_recall.py kv --steps 3000     # ~2.5 min on one CPU core
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

PAIRS, KEYS, VALUES = 3, range(10, 30), range(30, 50)  # token ids; 0..9 are separators
LAYOUTS = {"kv": lambda k, v: [k, v, 1], "after2": lambda k, v: [k, 2, v, 1],
           "after3": lambda k, v: [k, 2, 3, v, 1], "before3": lambda k, v: [v, 2, 3, k, 1]}


def batch(n: int, layout: str, g: torch.Generator):
    keys = torch.stack([torch.randperm(len(KEYS), generator=g)[:PAIRS] for _ in range(n)]) + KEYS[0]
    vals = torch.randint(VALUES[0], VALUES[-1] + 1, (n, PAIRS), generator=g)
    which = torch.randint(0, PAIRS, (n,), generator=g)
    rows = [sum((LAYOUTS[layout](int(keys[i, j]), int(vals[i, j])) for j in range(PAIRS)), [])
            + [4, int(keys[i, which[i]]), 5, 6] for i in range(n)]  # "who drew the KEY ? ASSISTANT"
    return torch.tensor(rows), vals[torch.arange(n), which]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("layout", choices=sorted(LAYOUTS))
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(a.seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=a.hidden, intermediate_size=3 * a.hidden,
                      num_hidden_layers=a.layers, num_attention_heads=a.hidden // 32,
                      num_key_value_heads=a.hidden // 32, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.98), weight_decay=0.05)
    g = torch.Generator().manual_seed(a.seed + 1)
    xv, yv = batch(500, a.layout, torch.Generator().manual_seed(a.seed + 2))
    t0 = time.time()
    for step in range(a.steps):
        x, y = batch(a.batch, a.layout, g)
        loss = torch.nn.functional.cross_entropy(model(input_ids=x).logits[:, -1], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 250 == 0:
            with torch.no_grad():
                acc = float((model(input_ids=xv).logits[:, -1].argmax(-1) == yv).float().mean())
            print(f"{a.layout} step {step + 1} loss {loss.item():.3f} held-out accuracy {acc:.3f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
