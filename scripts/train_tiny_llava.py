#!/usr/bin/env python
"""Train the bundled default model, qvlm-tiny-llava, on the synthetic tasks' train splits.

A real ``LlavaForConditionalGeneration`` (CLIP vision tower, projector, Llama decoder) built by
``harness.models.tiny``, trained LLaVA-style: "USER: <image>\\n{prompt} ASSISTANT: {answer}</s>"
with the loss on the answer tokens only. Imports torch, transformers, numpy and Pillow only (no
lm-eval, no datasets), so it runs on a bare GPU machine.

Subcommands:
  prepare  generate the train splits once (parallel) and the vocabulary  -> DATA/
  train    train one model from DATA, save it in Hugging Face format, evaluate it -> OUT/
  eval     greedy test-split accuracy of a saved model: float, and simulated W8A8 / W4A4 RTN
  stats    activation statistics of the decoder linear inputs (for the model card)
  pack-state / unpack-state   a training state <-> a lossless compact file (carried between device calls)

Reproduce the committed model (exact command and machine in
harness/models/bundled/qvlm-tiny-llava/MODEL_CARD.md):
  python scripts/train_tiny_llava.py prepare --data /tmp/synth-data --workers 15
  python scripts/train_tiny_llava.py train --data /tmp/synth-data --out /tmp/tiny --eval-split validation
  python scripts/train_tiny_llava.py eval --model /tmp/tiny            # CPU: float / W8A8 / W4A4
  python scripts/train_tiny_llava.py stats --model /tmp/tiny --markdown
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tasks import synth  # noqa: E402  (numpy + Pillow only)
from tasks.synth import questions as qs  # noqa: E402

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)

# The bundled model's shape. Chosen so that one evaluation cell (150 questions) takes a few
# seconds on a 2-core CPU while the model is still a real multi-layer LLaVA.
SPECS = {
    "base": dict(vision_hidden=128, vision_layers=4, vision_heads=4, vision_intermediate=512,
                 image_size=64, patch_size=8, text_hidden=256, text_layers=4, text_heads=4,
                 text_kv_heads=4, text_intermediate=768, max_positions=512),
    "p16": dict(vision_hidden=128, vision_layers=4, vision_heads=4, vision_intermediate=512,
                image_size=64, patch_size=16, text_hidden=256, text_layers=4, text_heads=4,
                text_kv_heads=4, text_intermediate=768, max_positions=512),
    # deeper decoder: the context and spatial ScienceQA families chain 3 look-ups (image -> attribute
    # -> hint -> option letter), which 4 layers did not learn
    "deep": dict(vision_hidden=128, vision_layers=4, vision_heads=4, vision_intermediate=512,
                 image_size=64, patch_size=8, text_hidden=256, text_layers=8, text_heads=4,
                 text_kv_heads=4, text_intermediate=768, max_positions=512),
    # session 5: capacity at the same (CPU-bound) step cost, for schedules 3x longer than 6500 steps
    "d6": dict(vision_hidden=128, vision_layers=4, vision_heads=4, vision_intermediate=512,
               image_size=64, patch_size=8, text_hidden=256, text_layers=6, text_heads=4,
               text_kv_heads=4, text_intermediate=768, max_positions=512),
    "w384": dict(vision_hidden=128, vision_layers=4, vision_heads=4, vision_intermediate=512,
                 image_size=64, patch_size=8, text_hidden=384, text_layers=4, text_heads=6,
                 text_kv_heads=6, text_intermediate=1152, max_positions=512),
    "wide": dict(vision_hidden=192, vision_layers=4, vision_heads=4, vision_intermediate=768,
                 image_size=64, patch_size=8, text_hidden=320, text_layers=4, text_heads=5,
                 text_kv_heads=5, text_intermediate=960, max_positions=512),
    # issue 29: a decoder deep enough for Q-VLM's blocks to form (12 layers), the base's vision
    # tower; 3.76 M parameters, 7.5 MB in fp16 (<= 10 MB), a 43.8 MB training state (fp32
    # weights + AdamW moments; 36.8 MB packed), which the device tool can carry between calls
    # (64 MiB with the working tree). harness/models/bundled/README.md: why this shape, its
    # schedule and the device commands.
    "deep12": dict(vision_hidden=128, vision_layers=4, vision_heads=4, vision_intermediate=512,
                   image_size=64, patch_size=8, text_hidden=128, text_layers=12, text_heads=4,
                   text_kv_heads=4, text_intermediate=448, max_positions=512),
}
TRAIN_PER_TASK = 60_000
PROFILE_AT = 40  # --profile-steps starts the profiler here (after warm-up and compilation)
FIT_AT = 150  # --fit-seconds measures steps 30..150 and then fixes the schedule's length
OPEN_ROW_OFFSET = 10_000_000  # sqa_open rows: train rows of synth_scienceqa from this index on
RELATION_ROW_OFFSET = 20_000_000  # relations rows: train rows of synth_scienceqa / synth_vqav2 from here
# the relations source alternates: even rows as synth_scienceqa, odd rows as synth_vqav2, each
# narrowed to its two-object question families (weights as in tasks.synth.generators' tables)
RELATION_DRILL = (("synth_scienceqa", [(qs.mc_relation, 1.0)]),
                  ("synth_vqav2", [(qs.q_relation_word, 0.4), (qs.q_relation_yn, 0.4), (qs.q_compare_yn, 0.2)]))
# Training mix: the share of each batch drawn from each source (rows within a source uniformly).
# Sources missing from the prepared data are dropped and the rest renormalised: with `prepare`'s
# defaults (no sqa_open rows) this is the bundled model's mix.
DEFAULT_MIX = {"synth_scienceqa": 0.4, "synth_vizwiz": 0.2, "synth_vqav2": 0.2, "captions": 0.2,
               "sqa_open": 0.15, "relations": 0.15}
EVAL_SPLIT = "test"
STATE_FILE = "train_state.pt"  # in --out: what --resume continues from (not part of the model folder)
AUX_CLASSES = (5, 7, 3, 9, 9)  # patch label rows (tasks.synth.scene.patch_labels), background included


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


# ---------------------------------------------------------------- data
def _labels(meta) -> np.ndarray:
    """Patch labels for 8x8 and 4x4 patch grids (patch 8 / patch 16), 255 where the photo is degraded."""
    from tasks.synth.scene import patch_labels

    if not meta.get("clean"):
        return np.full((5, 80), 255, dtype=np.uint8)
    return np.concatenate([patch_labels(meta["scene"], 8), patch_labels(meta["scene"], 4)], axis=1)


def _gen_chunk(args):
    from tasks.synth.generators import ROW_FNS, caption_example

    task, start, n, seed = args
    imgs, prompts, answers, labels = [], [], [], []
    for i in range(start, start + n):
        meta: dict = {}
        if task == "captions":
            e = caption_example(seed, i, meta)
            img, prompt, answer = e["image"], e["prompt"], e["answer"]
        elif task == "relations":
            # drill for the two-object questions (relative position, size comparison), which trail
            # every other family: multiple choice and open-ended, from rows the other sources don't use
            as_task, fams = RELATION_DRILL[i % 2]
            r = ROW_FNS[as_task](seed, "train", RELATION_ROW_OFFSET + i, meta, families=fams)
            img, prompt, answer = r["image"], synth.prompt_text(as_task, r), synth.canonical_answer(as_task, r)
        elif task == "sqa_open":
            # the ScienceQA questions asked open-ended (answer: the option's text), from rows the
            # multiple-choice source doesn't use: teaches each look-up apart from the letter mapping
            r = ROW_FNS["synth_scienceqa"](seed, "train", OPEN_ROW_OFFSET + i, meta)
            img, prompt, answer = r["image"], open_prompt(r), r["choices"][int(r["answer"])]
        else:
            r = ROW_FNS[task](seed, "train", i, meta)
            img, prompt, answer = r["image"], synth.prompt_text(task, r), synth.canonical_answer(task, r)
        imgs.append(np.asarray(img, dtype=np.uint8))
        prompts.append(prompt)
        answers.append(answer)
        labels.append(_labels(meta))
    return task, start, np.stack(imgs), prompts, answers, np.stack(labels)


def open_prompt(row) -> str:
    """A synth_scienceqa row as an open question, in the VQA prompt style."""
    hint = f"Context: {row['hint']}\n" if row["hint"] else ""
    return f"{hint}{row['question']}\n{synth.VQA_INSTRUCTION}"


def vocabulary(prompts: list[str], answers: list[str]) -> list[str]:
    """Every word of the corpus (prompts of all splits, answers), sorted for stability."""
    from harness.models.tiny import words_in

    texts = list(prompts) + list(answers)
    for task in synth.TASKS:
        for split in ("validation", "test"):
            rows = synth.generate_rows(task, split, seed=synth.DEFAULT_SEED)
            texts += [synth.prompt_text(task, r) for r in rows]
    return sorted(words_in(texts))


def cmd_prepare(a):
    from multiprocessing import Pool

    out = Path(a.data)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    sources = list(synth.TASKS) + (["captions"] if a.captions else []) + (["sqa_open"] if a.open_rows else []) \
        + (["relations"] if a.relation_rows else [])
    counts = {src: a.per_task for src in sources}
    counts["synth_scienceqa"] = a.sqa_rows or a.per_task
    if a.open_rows:
        counts["sqa_open"] = a.open_rows
    if a.relation_rows:
        counts["relations"] = a.relation_rows
    jobs = [(task, s, min(a.chunk, counts[task] - s), a.seed)
            for task in sources for s in range(0, counts[task], a.chunk)]
    if a.workers == 1:  # in this process (also when the script is imported rather than run)
        parts = list(map(_gen_chunk, jobs))
    else:
        with Pool(a.workers or os.cpu_count()) as pool:
            parts = pool.map(_gen_chunk, jobs)
    parts.sort(key=lambda p: (sources.index(p[0]), p[1]))
    images = np.concatenate([p[2] for p in parts])
    prompts = [x for p in parts for x in p[3]]
    answers = [x for p in parts for x in p[4]]
    tasks = [p[0] for p in parts for _ in p[3]]
    np.save(out / "patch_labels.npy", np.concatenate([p[5] for p in parts]))
    log(f"generated {len(prompts)} train rows in {time.time() - t0:.1f}s")
    vocab = vocabulary(prompts, answers)
    np.save(out / "images.npy", images)
    (out / "text.json").write_text(json.dumps({"prompts": prompts, "answers": answers, "tasks": tasks,
                                               "seed": a.seed, "per_task": a.per_task, "captions": a.captions,
                                               "counts": counts,
                                               "synth_version": synth.SYNTH_VERSION}))
    (out / "vocab.json").write_text(json.dumps(vocab))
    log(f"prepared {out}: {images.shape}, vocab {len(vocab)} words, {time.time() - t0:.1f}s")


def chat_text(prompt: str) -> str:
    """LLaVA-1.5 framing as the bundled processor's chat template renders it (checked in tests)."""
    return f"USER: <image>\n{prompt} ASSISTANT:"


def pixel_values(images_uint8):
    """CLIP normalisation of 64x64 RGB uint8 images, identical to the processor's (checked in tests)."""
    import torch

    x = images_uint8.float().div_(255.0)
    mean = torch.as_tensor(CLIP_MEAN, device=x.device)
    std = torch.as_tensor(CLIP_STD, device=x.device)
    return ((x - mean) / std).permute(0, 3, 1, 2).contiguous()


def encode(tokenizer, prompts, answers, n_image_tokens: int):
    """Token ids of prompt+answer+eos (image token expanded) and the answer start of each row."""
    img_id = tokenizer.convert_tokens_to_ids("<image>")
    eos = tokenizer.eos_token_id
    p_ids = tokenizer([chat_text(p) for p in prompts], add_special_tokens=False)["input_ids"]
    a_ids = tokenizer(list(answers), add_special_tokens=False)["input_ids"]
    seqs, starts = [], []
    for p, ans in zip(p_ids, a_ids):
        k = p.index(img_id)
        p = p[:k] + [img_id] * n_image_tokens + p[k + 1:]
        seqs.append(p + ans + [eos])
        starts.append(len(p))
    L = max(map(len, seqs))
    ids = np.full((len(seqs), L), tokenizer.pad_token_id, dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
    return ids, np.array([len(s) for s in seqs]), np.array(starts)


# ---------------------------------------------------------------- train
def multimodal_embeds(model, input_ids, pixel_values):
    """LLaVA's input embeddings (image features in place of the <image> tokens), batched.

    The same computation as ``LlavaModel.forward`` with ``pixel_values`` (checked in tests), which
    splits the image features into one tensor per image: at batch 512 that Python loop, forward
    and backward, made training CPU-bound (~75 of ~90 ms a step on an H200).
    """
    cfg = model.config
    inner = model.model
    out = inner.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
    feats = out.hidden_states[cfg.vision_feature_layer]
    if cfg.vision_feature_select_strategy == "default":
        feats = feats[:, 1:]
    image = inner.multi_modal_projector(feats)
    emb = inner.get_input_embeddings()(input_ids)
    mask = (input_ids == cfg.image_token_id).unsqueeze(-1).expand_as(emb)
    return emb.masked_scatter(mask, image.to(emb.dtype))


def batch_mix(spec: str, sources: list[str], batch: int):
    """Parse ``--mix`` ("src=w,...", default DEFAULT_MIX) into per-step row counts per source.

    Returns (weights used, {source: row indices}, {source: rows per batch}); sources absent from
    the data are dropped and the weights renormalised; counts sum to ``batch``.
    """
    import torch

    mix = dict(DEFAULT_MIX)
    if spec:
        mix = {}
        for part in spec.split(","):
            k, _, v = part.partition("=")
            mix[k.strip()] = float(v)
    src = np.asarray(sources)
    groups = {k: torch.from_numpy(np.flatnonzero(src == k)) for k in mix}
    missing = [k for k, g in groups.items() if len(g) == 0]
    unknown = sorted(set(sources) - set(mix))
    if unknown:
        raise SystemExit(f"--mix gives no weight to source(s) {unknown} in the data; sources: {sorted(set(sources))}")
    for k in missing:
        mix.pop(k), groups.pop(k)
    total = sum(mix.values())
    mix = {k: v / total for k, v in mix.items()}
    take = {k: int(batch * v) for k, v in mix.items()}
    for k in sorted(mix, key=lambda k: batch * mix[k] - take[k], reverse=True)[:batch - sum(take.values())]:
        take[k] += 1
    return mix, groups, {k: n for k, n in take.items() if n}


# what a resumed call must share with the calls before it (else it would silently train another run)
RUN_ARGS = ("spec", "steps", "batch", "lr", "wd", "warmup", "seed", "limit", "mix", "aux_weight", "aux_position",
            "deterministic", "compile", "fit_seconds")


def data_digest(data: Path, images) -> str:
    """sha256 of the prepared data as training reads it: text.json, vocab.json, the patch labels and
    every 101st image (a fresh device machine re-runs `prepare`; a resumed run checks it got the
    same rows)."""
    import hashlib

    h = hashlib.sha256()
    for name in ("text.json", "vocab.json", "patch_labels.npy"):
        f = data / name
        h.update(f.read_bytes() if f.is_file() else b"-")
    h.update(np.ascontiguousarray(images[::101]).tobytes())
    return h.hexdigest()


def check_resumable(st: dict, a, digest: str, state_path: Path) -> None:
    """Refuse to resume a saved state with other training arguments or other data (states saved
    before these were recorded are not checked)."""
    saved = st.get("run_args")
    if saved is not None:
        diff = {k: (saved.get(k), getattr(a, k)) for k in RUN_ARGS if saved.get(k) != getattr(a, k)}
        if diff:
            raise SystemExit(f"--resume: {state_path} was trained with other arguments: "
                             + ", ".join(f"--{k.replace('_', '-')} {v[0]!r} there, {v[1]!r} now" for k, v in diff.items())
                             + "; pass the first call's arguments")
    if st.get("data_digest") not in (None, digest):
        raise SystemExit(f"--resume: the prepared data differs from the data {state_path} was trained on "
                         "(data digest); run `prepare` with the first call's arguments")


def cmd_train(a):
    if a.fit_seconds and a.warmup <= FIT_AT:
        raise SystemExit(f"--fit-seconds fixes the schedule at step {FIT_AT}: needs --warmup > {FIT_AT}")
    if a.deterministic:  # must precede CUDA initialisation
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch

    if a.deterministic:
        # warn_only: ops without a deterministic kernel warn instead of failing the run
        torch.use_deterministic_algorithms(True, warn_only=True)
        # ...but don't fill every new tensor with NaN (a debugging aid that deterministic mode turns
        # on): ~900 extra kernels a step, and nothing here reads uninitialised memory
        torch.utils.deterministic.fill_uninitialized_memory = False

    from harness.models.tiny import TinyLlavaSpec, build_tiny_llava

    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    data = Path(a.data)
    meta = json.loads((data / "text.json").read_text())
    vocab = json.loads((data / "vocab.json").read_text())
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = TinyLlavaSpec(**SPECS[a.spec], extra_words=vocab, seed=a.seed)
    build_tiny_llava(out, spec)
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(out)
    model = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(dev).train()
    n_params = sum(p.numel() for p in model.parameters())
    n_img = (spec.image_size // spec.patch_size) ** 2
    log(f"spec {a.spec}: {n_params / 1e6:.2f}M parameters, {n_img} image tokens, vocab {len(processor.tokenizer)}, device {dev}"
        + (f" ({torch.cuda.get_device_name(0)})" if dev.type == "cuda" else ""))

    images_np = np.load(data / "images.npy")
    digest = data_digest(data, images_np)
    images = torch.from_numpy(images_np)
    ids, lens, starts = encode(processor.tokenizer, meta["prompts"], meta["answers"], n_img)
    if a.limit:
        images, ids, lens, starts = images[:a.limit], ids[:a.limit], lens[:a.limit], starts[:a.limit]
    N = len(lens)
    images = images.to(dev)
    ids_t = torch.from_numpy(ids).to(dev)
    lens_t = torch.from_numpy(lens).to(dev)
    starts_t = torch.from_numpy(starts).to(dev)
    pos = torch.arange(ids.shape[1], device=dev)
    lens_cpu = torch.from_numpy(lens)
    log(f"train rows {N}, max len {ids.shape[1]}")

    aux = None
    if a.aux_weight > 0:
        # Dense auxiliary signal for the vision tower (training only; the head is not saved):
        # per patch, the shape / colour / size of the object covering it, read from the vision
        # features the projector consumes (layer vision_feature_layer, CLS dropped).
        from harness.models.layers import vision_layers

        grid = spec.image_size // spec.patch_size
        lab = np.load(data / "patch_labels.npy")
        lab = lab[:, :, :64] if grid == 8 else lab[:, :, 64:80]
        if a.limit:
            lab = lab[:a.limit]
        labels_t = torch.from_numpy(lab.astype(np.int64)).to(dev)
        labels_t[labels_t == 255] = -100
        _, vlayers = vision_layers(model)
        feat_box = {}
        vlayers[model.config.vision_feature_layer].register_forward_hook(
            lambda _m, _i, o: feat_box.__setitem__("h", o[0] if isinstance(o, tuple) else o))
        # classes per label row (0 = background): shape, colour, size, then the object centre's
        # column and row bins (--aux-position; version 1 of the data had the first three only)
        aux_classes = AUX_CLASSES[:5 if a.aux_position else 3]
        aux_slices = [(sum(aux_classes[:k]), sum(aux_classes[:k + 1])) for k in range(len(aux_classes))]
        aux = torch.nn.Linear(spec.vision_hidden, sum(aux_classes)).to(dev)
    decay, no_decay = [], []
    for n, p in list(model.named_parameters()) + ([("aux." + n, p) for n, p in aux.named_parameters()] if aux else []):
        (no_decay if p.ndim < 2 or "norm" in n or "embed" in n else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.98), eps=1e-8, fused=dev.type == "cuda")
    mix, groups, take = batch_mix(a.mix, meta["tasks"][:N], a.batch)
    log("batch mix: " + ", ".join(f"{src} {k}/{a.batch} of {len(groups[src])} rows" for src, k in take.items()))
    gen = torch.Generator(device="cpu").manual_seed(a.seed)
    total = a.steps
    probe = 30
    state_path = out / STATE_FILE
    step, ema, trained_before, calls = 0, None, 0.0, []
    if a.resume:
        if not state_path.is_file():
            raise SystemExit(f"--resume: no {STATE_FILE} in {out}; run without --resume to start this run")
        st = torch.load(state_path, map_location=dev, weights_only=False)
        check_resumable(st, a, digest, state_path)
        model.load_state_dict(st["model"])
        if aux is not None:
            aux.load_state_dict(st["aux"])
        opt.load_state_dict(st["opt"])
        gen.set_state(st["gen"].cpu())  # map_location moved it to the GPU; a CPU generator needs it back
        step, total, ema, trained_before, calls = st["step"], st["total"], st["ema"], st["train_seconds"], st["calls"]
        # nothing in the loop draws from the global generators today (no dropout); restored anyway,
        # so that a resumed run stays the uninterrupted one if something ever does
        if st.get("torch_rng") is not None:
            torch.set_rng_state(st["torch_rng"].cpu())
        if st.get("cuda_rng") is not None and dev.type == "cuda":
            torch.cuda.set_rng_state(st["cuda_rng"].cpu())
        log(f"resumed {state_path} at step {step} of {total} ({trained_before:.0f}s trained before)")

    def lr_at(step):
        if step < a.warmup:
            return a.lr * (step + 1) / a.warmup
        prog = min(1.0, (step - a.warmup) / max(1, total - a.warmup))
        return a.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * prog)))

    fwd, L_fixed = model, 0
    if a.compile:
        fwd, L_fixed = torch.compile(model), ids.shape[1]
    amp = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    t0 = time.time()
    first_step = step
    stopped_at = None
    t_probe = t0
    prof = None
    while step < total:
        idx_cpu = torch.cat([groups[src][torch.randint(0, len(groups[src]), (k,), generator=gen)]
                             for src, k in take.items()])
        # on the CPU: no device sync per step; compiled: one fixed length (no recompiles)
        L = L_fixed or int(lens_cpu[idx_cpu].max())
        idx = idx_cpu.to(dev, non_blocking=True)
        x = ids_t[idx, :L]
        attn = (pos[:L][None, :] < lens_t[idx][:, None]).long()
        # predict token t+1 from position t; the targets are the answer tokens and </s>
        tgt_mask = (pos[1:L][None, :] >= starts_t[idx][:, None]) & attn[:, 1:].bool()
        pv = pixel_values(images[idx])
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        with torch.autocast(**amp):
            logits = fwd(inputs_embeds=multimodal_embeds(model, x, pv), attention_mask=attn).logits
        tok_loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none"
        ).view(x.shape[0], L - 1)
        # every example weighs the same, whatever its answer length (captions are long, answers one word)
        m = tgt_mask.float()
        loss = ((tok_loss * m).sum(1) / m.sum(1).clamp(min=1)).mean()
        if aux is not None:
            with torch.autocast(**amp):
                ao = aux(feat_box["h"][:, 1:]).float()
            y = labels_t[idx]
            aux_loss = sum(torch.nn.functional.cross_entropy(ao[..., lo:hi].reshape(-1, hi - lo), y[:, k].reshape(-1))
                           for k, (lo, hi) in enumerate(aux_slices))
            loss = loss + a.aux_weight * aux_loss
        if prof is not None and step == PROFILE_AT + a.profile_steps:
            prof.__exit__(None, None, None)
            for key in ("self_cpu_time_total", "self_device_time_total"):
                print(prof.key_averages().table(sort_by=key, row_limit=12), flush=True)
            prof = None
        if a.profile_steps and step == PROFILE_AT:
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]
                                          + ([torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else []))
            prof.__enter__()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        lv = None
        if step % 50 == 0 or step % a.log_every == 0 or step == probe:
            lv = float(loss.detach())
            ema = lv if ema is None else 0.8 * ema + 0.2 * lv
        if step == probe:
            log(f"{(time.time() - t0) / probe * 1000:.1f} ms/step over the first {probe} steps (incl. warm-up)")
            t_probe = time.time()
        if a.fit_seconds and step == FIT_AT and not a.resume:
            # Fix the schedule's length from the measured speed, while still in warm-up (whose lr
            # doesn't depend on the length): the run equals one started with --steps <fitted>.
            torch.cuda.synchronize() if dev.type == "cuda" else None
            per_step = (time.time() - t_probe) / (FIT_AT - probe)
            fitted = max(FIT_AT + 1, int((a.fit_seconds - (time.time() - t0)) / per_step) + step)
            if fitted < total:
                total = fitted
                log(f"--fit-seconds {a.fit_seconds:.0f}: {per_step * 1000:.1f} ms/step, schedule set to {total} steps")
        if step < total and ((a.max_seconds and time.time() - t0 > a.max_seconds)
                             or (a.stop_at and step >= a.stop_at)):
            log(f"stopping at step {step} of {total} (schedule not finished; --resume continues it)")
            stopped_at = step
            break
        if step % a.log_every == 0:
            log(f"step {step}/{total} loss {lv:.4f} (ema {ema:.4f}) lr {lr_at(step):.2e} {time.time() - t0:.0f}s")
    call_s = time.time() - t0
    train_s = trained_before + call_s
    calls = calls + [{"from": first_step, "to": step, "seconds": round(call_s, 1),
                      "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"}]
    log(f"trained steps {first_step}..{step} in {call_s:.0f}s ({train_s:.0f}s in all)")
    # the full training state (fp32 weights, optimizer, sampler), so that --resume continues the run
    # exactly where it stopped: a run split over several device calls equals one uninterrupted run
    torch.save({"model": model.state_dict(), "aux": aux.state_dict() if aux is not None else None,
                "opt": opt.state_dict(), "gen": gen.get_state(), "step": step, "total": total, "ema": ema,
                "train_seconds": train_s, "calls": calls,
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state() if dev.type == "cuda" else None,
                "run_args": {k: getattr(a, k) for k in RUN_ARGS}, "data_digest": digest}, state_path)
    model.eval()
    model.to(torch.float16)
    model.config.dtype = "float16"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    info = {"spec": a.spec, "spec_args": SPECS[a.spec], "steps": total, "steps_requested": a.steps, "batch": a.batch, "lr": a.lr, "wd": a.wd,
            "warmup": a.warmup, "seed": a.seed, "stopped_at": stopped_at, "aux_weight": a.aux_weight,
            "aux_position": a.aux_position,
            "deterministic": a.deterministic, "captions": meta.get("captions", False),
            "mix": mix, "rows": meta.get("counts"), "data_seed": meta["seed"], "train_per_task": meta["per_task"],
            "synth_version": meta["synth_version"], "train_seconds": round(train_s, 1), "calls": calls, "params": n_params,
            "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
            "torch": torch.__version__, "final_loss_ema": ema}
    import transformers

    info["transformers"] = transformers.__version__
    info["eval_split"] = a.eval_split if a.eval else None
    (out / "training_info.json").write_text(json.dumps(info, indent=1))
    if a.eval:
        res = evaluate(out, dev=str(dev), schemes=tuple(a.eval_schemes.split(",")), split=a.eval_split)
        info["eval"] = res
        (out / "training_info.json").write_text(json.dumps(info, indent=1))


# ---------------------------------------------------------------- a training state, packed losslessly
PACK_MAGIC = b"QVLM-TRAIN-STATE-1\n"


def _same_dict(like: dict, items: dict) -> dict:
    """``items`` as ``like``'s type, with ``like``'s attributes (state_dict's ``_metadata``)."""
    if type(like) is dict:
        return items
    out = type(like)(items)
    out.__dict__.update(getattr(like, "__dict__", {}))
    return out


def pack_state(src: Path, dst: Path) -> dict:
    """Write ``src`` (a train_state.pt) to ``dst`` losslessly and smaller than torch.save + gzip:
    the tensors' bytes split into byte planes (the bytes of one significance of every element
    together) and each plane deflated. The top byte of float32 (sign, exponent) shrinks to about
    a third; the mantissa bytes don't shrink, so a state packs to ~84 % (gzip: ~93 %). The rest
    of the state (step, schedule, calls, optimizer settings) is pickled as it is. Returns sizes."""
    import pickle
    import zlib

    import torch

    st = torch.load(src, map_location="cpu", weights_only=False)
    tensors: list = []

    def strip(x):
        if isinstance(x, torch.Tensor):
            tensors.append(x.detach().contiguous())
            return {"__tensor__": len(tensors) - 1}
        if isinstance(x, dict):  # state_dict()'s OrderedDict, with its _metadata, stays one
            return _same_dict(x, {k: strip(v) for k, v in x.items()})
        if isinstance(x, (list, tuple)):
            return type(x)(strip(v) for v in x)
        return x

    skeleton = pickle.dumps(strip(st), protocol=4)
    meta, blobs = [], []
    for size in sorted({t.element_size() for t in tensors}):
        group = [i for i, t in enumerate(tensors) if t.element_size() == size]
        raw = np.concatenate([tensors[i].reshape(-1).view(torch.uint8).numpy() for i in group] or [np.zeros(0, np.uint8)])
        planes = raw.reshape(-1, size)
        lens = []
        for b in range(size):
            blobs.append(zlib.compress(np.ascontiguousarray(planes[:, b]).tobytes(), 6))
            lens.append(len(blobs[-1]))
        meta.append({"size": size, "tensors": [[i, str(tensors[i].dtype).removeprefix("torch."),
                                                list(tensors[i].shape)] for i in group], "planes": lens})
    header = json.dumps({"skeleton": len(skeleton), "groups": meta}).encode()
    with open(dst, "wb") as f:
        f.write(PACK_MAGIC + len(header).to_bytes(8, "little") + header + skeleton)
        for blob in blobs:
            f.write(blob)
    raw_bytes = sum(t.numel() * t.element_size() for t in tensors)
    return {"tensors": len(tensors), "tensor_bytes": raw_bytes, "packed": dst.stat().st_size,
            "state_file": src.stat().st_size}


def unpack_state(src: Path, dst: Path) -> None:
    """Inverse of ``pack_state``: the same state (every tensor bit for bit), saved with torch.save."""
    import pickle
    import zlib

    import torch

    data = src.read_bytes()
    if not data.startswith(PACK_MAGIC):
        raise SystemExit(f"{src} is not a packed training state (pack-state)")
    at = len(PACK_MAGIC)
    n = int.from_bytes(data[at:at + 8], "little")
    header = json.loads(data[at + 8:at + 8 + n])
    at += 8 + n
    skeleton = pickle.loads(data[at:at + header["skeleton"]])
    at += header["skeleton"]
    tensors: dict[int, torch.Tensor] = {}
    for g in header["groups"]:
        size = g["size"]
        planes = []
        for ln in g["planes"]:
            planes.append(np.frombuffer(zlib.decompress(data[at:at + ln]), dtype=np.uint8))
            at += ln
        raw = np.stack(planes, axis=1).reshape(-1) if planes else np.zeros(0, np.uint8)
        off = 0
        for i, dtype, shape in g["tensors"]:
            dt = getattr(torch, dtype)
            nbytes = int(np.prod(shape, dtype=np.int64)) * size
            tensors[i] = (torch.from_numpy(raw[off:off + nbytes].copy()).view(dt).reshape(shape) if nbytes
                          else torch.empty(shape, dtype=dt))
            off += nbytes
    if at != len(data):
        raise SystemExit(f"{src}: {len(data) - at} bytes left over after the state (a stale or wrong piece?)")

    def fill(x):
        if isinstance(x, dict):
            if type(x) is dict and set(x) == {"__tensor__"}:
                return tensors[x["__tensor__"]]
            return _same_dict(x, {k: fill(v) for k, v in x.items()})
        if isinstance(x, (list, tuple)):
            return type(x)(fill(v) for v in x)
        return x

    torch.save(fill(skeleton), dst)


def cmd_pack_state(a):
    info = pack_state(Path(a.state), Path(a.packed))
    log(f"packed {a.state} ({info['state_file']} bytes, {info['tensors']} tensors) -> {a.packed} "
        f"({info['packed']} bytes)")


def cmd_unpack_state(a):
    unpack_state(Path(a.packed), Path(a.state))
    log(f"unpacked {a.packed} -> {a.state}")


# ---------------------------------------------------------------- simulated quantization
def _fake_quant_weight(w, bits):
    """Per-output-channel asymmetric RTN (the harness's default weight format)."""
    qmax = 2 ** bits - 1
    lo = w.amin(dim=1, keepdim=True).clamp(max=0)
    hi = w.amax(dim=1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / qmax).clamp(min=1e-8)
    zero = torch_round(-lo / scale)
    q = (torch_round(w / scale) + zero).clamp(0, qmax)
    return (q - zero) * scale


def torch_round(x):
    import torch

    return torch.round(x)


def _act_hook(bits):
    qmax = 2 ** (bits - 1) - 1

    def hook(_mod, args):
        x = args[0].float()  # in float32: a 1e-8 floor underflows to 0 in fp16 (NaN on all-zero rows)
        s = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / qmax
        return ((x / s).round().clamp(-qmax - 1, qmax) * s).to(args[0].dtype), *args[1:]
    return hook


def decoder_linears(model):
    from torch import nn

    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and "language_model" in n}


def simulate(model, scheme: str):
    """Fake-quantize every decoder nn.Linear in place: per-channel weight RTN, per-token symmetric activations."""
    import torch

    from harness.quant.config import parse_scheme

    if scheme == "float":
        return []
    q = parse_scheme(scheme)
    wb, ab = q.w_bits, q.a_bits
    handles = []
    with torch.no_grad():
        for m in decoder_linears(model).values():
            m.weight.copy_(_fake_quant_weight(m.weight.float(), wb).to(m.weight.dtype))
            handles.append(m.register_forward_pre_hook(_act_hook(ab)))
    return handles


# ---------------------------------------------------------------- evaluation
def generate(model, processor, rows, task, dev, batch=32, max_new_tokens=8):
    import torch

    tok = processor.tokenizer
    tok.padding_side = "left"
    outs = []
    for s in range(0, len(rows), batch):
        chunk = rows[s:s + batch]
        texts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": synth.prompt_text(task, r)}]}],
            add_generation_prompt=True) for r in chunk]
        enc = processor(images=[r["image"] for r in chunk], text=texts, return_tensors="pt", padding=True).to(dev)
        enc["pixel_values"] = enc["pixel_values"].to(model.dtype)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        outs += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return outs


def score(task, row, pred) -> float:
    from tasks import metrics

    if task == "synth_scienceqa":
        return float(metrics.scienceqa_correct(pred, int(row["answer"]), len(row["choices"])))
    answers = [a["answer"] if isinstance(a, dict) else a for a in row["answers"]]
    return float(metrics.vqa_accuracy(pred, answers))


def evaluate(path, dev="cpu", schemes=("float",), split=EVAL_SPLIT, n=None, batch=32, dtype=None):
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    dtype = dtype or (torch.float16 if str(dev).startswith("cuda") else torch.float32)
    processor = AutoProcessor.from_pretrained(path)
    res = {}
    for scheme in schemes:
        model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype).to(dev).eval()
        simulate(model, scheme)
        res[scheme] = {}
        for task in synth.TASKS:
            rows = synth.generate_rows(task, split, n=n) if n else synth.load_split(task, split, cache=False)
            t0 = time.time()
            preds = generate(model, processor, rows, task, dev, batch=batch)
            dt = time.time() - t0
            scores = [score(task, r, p) for r, p in zip(rows, preds)]
            acc = 100.0 * float(np.mean(scores))
            if task == "synth_scienceqa":
                by: dict[str, list] = {}
                for r, sc in zip(rows, scores):
                    by.setdefault(r["skill"], []).append(sc)
                log(f"{scheme:6s} {task} by skill: " + ", ".join(
                    f"{k} {100 * np.mean(v):.0f} (n={len(v)})" for k, v in sorted(by.items())))
            res[scheme][task] = round(acc, 2)
            log(f"{scheme:6s} {task:16s} {split} n={len(rows)} acc {acc:6.2f}  ({dt:.2f}s, {dt / len(rows) * 1000:.1f} ms/q)"
                f"  e.g. {preds[:4]}")
    return res


def cmd_eval(a):
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    res = evaluate(a.model, dev=a.device, schemes=tuple(a.schemes.split(",")), split=a.split, n=a.n,
                   batch=a.batch, dtype=getattr(torch, a.dtype) if a.dtype else None)
    print(json.dumps(res, indent=1))


# ---------------------------------------------------------------- activation statistics
def cmd_stats(a):
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(a.model)
    model = LlavaForConditionalGeneration.from_pretrained(a.model, dtype=torch.float32).eval()
    lins = decoder_linears(model)
    store: dict[str, list] = {n: [] for n in lins}
    mask_box = {}

    def mk(name):
        def hook(_m, args):
            x = args[0].detach().float()
            m = mask_box["mask"]
            store[name].append(x[m.bool()] if x.shape[:2] == m.shape else x.reshape(-1, x.shape[-1]))
        return hook

    hs = [m.register_forward_pre_hook(mk(n)) for n, m in lins.items()]
    tok = processor.tokenizer
    tok.padding_side = "left"
    for task in synth.TASKS:
        rows = synth.load_split(task, "validation", cache=False)[:a.n]
        texts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": synth.prompt_text(task, r)}]}],
            add_generation_prompt=True) for r in rows]
        enc = processor(images=[r["image"] for r in rows], text=texts, return_tensors="pt", padding=True)
        mask_box["mask"] = enc["attention_mask"]
        with torch.no_grad():
            model(**enc)
    for h in hs:
        h.remove()
    table = []
    for name, xs in store.items():
        x = torch.cat(xs)  # tokens x channels
        ax = x.abs()
        flat = x.flatten()
        z = (flat - flat.mean()) / flat.std()
        ch_max = ax.amax(dim=0)
        table.append({
            "layer": name.split("layers.")[-1],
            "max": round(float(ax.max()), 3),
            "median": round(float(ax.median()), 4),
            "max_over_median": round(float(ax.max() / ax.median()), 1),
            "kurtosis": round(float((z ** 4).mean()), 1),
            "top_channel_max_over_median_channel_max": round(float(ch_max.max() / ch_max.median()), 1),
            "tokens": int(x.shape[0]),
        })
    print(json.dumps(table, indent=1))
    if a.markdown:
        print("| layer | max abs | median abs | max/median | kurtosis | top channel / median channel (max abs) |")
        print("|---|---|---|---|---|---|")
        for r in table:
            print(f"| {r['layer']} | {r['max']} | {r['median']} | {r['max_over_median']} | {r['kurtosis']} |"
                  f" {r['top_channel_max_over_median_channel_max']} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("prepare")
    q.add_argument("--data", required=True)
    q.add_argument("--per-task", type=int, default=TRAIN_PER_TASK)
    q.add_argument("--seed", type=int, default=synth.DEFAULT_SEED)
    q.add_argument("--chunk", type=int, default=1000)
    q.add_argument("--workers", type=int, default=0)
    q.add_argument("--sqa-rows", type=int, default=2 * TRAIN_PER_TASK,
                   help="synth_scienceqa train rows (0: --per-task)")
    q.add_argument("--open-rows", type=int, default=0, help="open-ended synth_scienceqa rows (0: none)")
    q.add_argument("--relation-rows", type=int, default=0,
                   help="drill rows of the two-object questions (relative position, size comparison; 0: none)")
    q.add_argument("--captions", action=argparse.BooleanOptionalAction, default=True,
                   help="add per-task-many dense scene descriptions (LLaVA stage-1 style) to the training mix")
    q = sub.add_parser("train")
    q.add_argument("--data", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--spec", default="base", choices=sorted(SPECS))
    q.add_argument("--steps", type=int, default=6500)
    q.add_argument("--batch", type=int, default=512)
    q.add_argument("--lr", type=float, default=2e-3)
    q.add_argument("--wd", type=float, default=0.05)
    q.add_argument("--warmup", type=int, default=300)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--limit", type=int, default=0, help="use only the first N train rows (debugging)")
    q.add_argument("--mix", default="", help="batch shares per source, e.g. synth_scienceqa=0.4,captions=0.2 "
                                             "(default: DEFAULT_MIX)")
    q.add_argument("--log-every", type=int, default=250)
    q.add_argument("--aux-weight", type=float, default=1.0,
                   help="weight of the dense per-patch shape/colour/size loss on the vision features (0: off)")
    q.add_argument("--aux-position", action=argparse.BooleanOptionalAction, default=True,
                   help="the auxiliary loss also classifies where each patch's object is (column, row)")
    q.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=True,
                   help="deterministic CUDA kernels where they exist (re-runs on one machine give one model)")
    q.add_argument("--profile-steps", type=int, default=0,
                   help="profile this many steps (from step 40) and print the top operators")
    q.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the model (sequences padded to one length)")
    q.add_argument("--fit-seconds", type=float, default=0.0,
                   help="shorten the schedule so that training takes about this long (the fitted --steps "
                        "is recorded; pass it as --steps to reproduce the run)")
    q.add_argument("--max-seconds", type=float, default=0.0,
                   help="safety guard: stop training after this many seconds (recorded as stopped_at)")
    q.add_argument("--stop-at", type=int, default=0,
                   help="stop this call at this step, saving the state (--resume continues the schedule)")
    q.add_argument("--resume", action="store_true",
                   help=f"continue the run saved in --out ({STATE_FILE}: weights, optimizer, sampler, step)")
    q.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True)
    q.add_argument("--eval-split", default=EVAL_SPLIT)
    q.add_argument("--eval-schemes", default="float,w8a8,w4a4")
    for verb in ("pack-state", "unpack-state"):
        q = sub.add_parser(verb, help="a training state <-> its lossless compact form (device calls carry it)")
        q.add_argument("--state", required=True, help=f"the {STATE_FILE}")
        q.add_argument("--packed", required=True, help="the packed file")
    q = sub.add_parser("eval")
    q.add_argument("--model", required=True)
    q.add_argument("--device", default="cpu")
    q.add_argument("--schemes", default="float,w8a8,w4a4")
    q.add_argument("--split", default=EVAL_SPLIT)
    q.add_argument("--n", type=int, default=None)
    q.add_argument("--batch", type=int, default=32)
    q.add_argument("--dtype", default=None)
    q.add_argument("--threads", type=int, default=0)
    q = sub.add_parser("stats")
    q.add_argument("--model", required=True)
    q.add_argument("--n", type=int, default=48)
    q.add_argument("--markdown", action="store_true")
    a = p.parse_args(argv)
    {"prepare": cmd_prepare, "train": cmd_train, "eval": cmd_eval, "stats": cmd_stats,
     "pack-state": cmd_pack_state, "unpack-state": cmd_unpack_state}[a.cmd](a)


if __name__ == "__main__":
    main()
