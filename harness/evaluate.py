"""The lm-eval bridge: run lm-eval generation tasks on an in-memory (quantized) LLaVA model.

Tasks stay plain lm-eval tasks (``lm_eval --include_path tasks`` works on a float model too);
this module supplies the model side as an ``lm_eval.api.model.LM`` instance, which is what
lm-eval accepts for a model that lives in memory. Prompt framing comes from the model's chat
template (image first), batches are left-padded so batch size cannot change greedy answers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .prompting import chat_prompt

DEFAULT_MAX_NEW_TOKENS = 16


def _cut_at_stops(text: str, stops: Sequence[str]) -> str:
    cut = len(text)
    for s in stops:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


def generate_answers(lm, prompts: Sequence[str], images: Sequence[Any], *, max_new_tokens: int,
                     stops: Sequence[str] = (), batch_size: int = 8, progress=None) -> list[str]:
    """Greedy answers for (text prompt, image) pairs, in input order.

    Padding is on the left and the attention mask covers it, so a prompt's answer does not depend
    on which other prompts share its batch (tests check batch 1 against batch 8).
    """
    processor = lm.processor
    tok = processor.tokenizer
    tok.padding_side = "left"
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        texts = [chat_prompt(processor, p, with_image=images[start + i] is not None)
                 for i, p in enumerate(prompts[start:start + batch_size])]
        imgs = [im for im in images[start:start + batch_size] if im is not None]
        enc = processor(images=imgs or None, text=texts, return_tensors="pt", padding=True)
        enc = {k: v.to(lm.device) for k, v in enc.items()}
        if "pixel_values" in enc:
            enc["pixel_values"] = enc["pixel_values"].to(lm.dtype)
        with torch.inference_mode():
            out = lm.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                    num_beams=1, pad_token_id=tok.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        for row in tok.batch_decode(new, skip_special_tokens=True):
            answers.append(_cut_at_stops(row, stops).strip())
        if progress is not None:
            progress.update(len(texts))
    return answers


def lm_class():
    """The ``lm_eval.api.model.LM`` class that evaluates a ``LoadedModel`` in memory:
    ``lm_class()(lm, batch_size=8, show_progress=True)`` is the model ``lm_eval.evaluator.evaluate``
    takes (generation tasks only). Defined lazily: importing lm-eval is slow and the GPU image
    lacks it."""
    from lm_eval.api.model import LM

    class InMemoryVLM(LM):
        """An ``lm_eval`` model backed by a ``LoadedModel`` (quantized or not)."""

        MULTIMODAL = True

        def __init__(self, lm, batch_size: int = 8, show_progress: bool = True):
            super().__init__()
            self.lm = lm
            self.batch_size = batch_size
            self.show_progress = show_progress

        def generate_until(self, requests, disable_tqdm: bool = False):
            from tqdm.auto import tqdm

            groups: dict[tuple, list[int]] = {}
            for i, req in enumerate(requests):
                gen_kwargs = req.args[1] if len(req.args) > 1 else {}
                key = (int(gen_kwargs.get("max_gen_toks", DEFAULT_MAX_NEW_TOKENS)),
                       tuple(gen_kwargs.get("until", []) or []))
                groups.setdefault(key, []).append(i)
            results: list[str | None] = [None] * len(requests)
            bar = tqdm(total=len(requests), desc="generate", unit="q", leave=False,
                       disable=disable_tqdm or not self.show_progress)
            for (max_new, stops), idx in groups.items():
                prompts, images = [], []
                for i in idx:
                    args = requests[i].args
                    prompts.append(args[0])
                    visual = (args[2] or {}).get("visual") if len(args) > 2 else None
                    if isinstance(visual, (list, tuple)):
                        if len(visual) > 1:
                            raise ValueError("one image per question is supported")
                        visual = visual[0] if visual else None
                    images.append(visual.convert("RGB") if visual is not None else None)
                answers = generate_answers(self.lm, prompts, images, max_new_tokens=max_new,
                                           stops=stops, batch_size=self.batch_size, progress=bar)
                for i, ans in zip(idx, answers):
                    results[i] = ans
            bar.close()
            return results

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("qvlm-bench evaluates generation tasks only (output_type: generate_until)")

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("qvlm-bench evaluates generation tasks only (output_type: generate_until)")

    return InMemoryVLM


@dataclass
class TaskResult:
    task: str
    metric: str
    value: float  # percent, 0-100
    stderr: float | None
    n: int
    n_empty: int
    n_unparsed: int
    samples: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    cluster_unit: str = "question"  # what the interval resamples (the task's cluster_spec)


def task_manager(include_paths: Sequence[str | Path] = ()):
    """lm-eval's TaskManager for tasks/ plus ``include_paths``, built once per tuple of folders."""
    from tasks.index import task_manager as shared

    return shared(include_paths)


_TASKS: dict[str, dict] = {}


def load_tasks(task_specs: Sequence[str | dict], include_paths: Sequence[str | Path] = ()) -> dict:
    """lm-eval's task dict for ``task_specs``, built once per spec and kept: building a task loads
    its dataset (0.3 s for 64 ScienceQA rows on the CPU), and every cell of a suite evaluates the
    same tasks. lm-eval rebuilds a task's requests and results on each ``evaluate`` call."""
    import json

    key = json.dumps([list(task_specs), [str(p) for p in include_paths]], sort_keys=True, default=str)
    if key not in _TASKS:
        if len(_TASKS) >= 16:
            _TASKS.pop(next(iter(_TASKS)))
        _TASKS[key] = task_manager(include_paths).load(list(task_specs))
    return _TASKS[key]


def _sample_logger(task_obj):
    """The task's ``metadata.sample_logger`` (``module:function``, called as ``fn(doc,
    generation)`` for the row's task fields), or None."""
    import importlib

    meta = getattr(task_obj.config, "metadata", None) or {}
    target = meta.get("sample_logger") if isinstance(meta, dict) else None
    if not target:
        return None
    mod_name, _, fn = target.replace(":", ".").rpartition(".")
    return getattr(importlib.import_module(mod_name), fn)


def cluster_spec(task_obj) -> tuple[str, str | None]:
    """(unit, field) of the clusters a task declares in its YAML ``metadata``: ``cluster_unit``
    (``"image"``) and ``cluster_field``, the doc column holding each question's cluster
    (``image_id``). Undeclared: ``("question", None)`` — every question its own cluster."""
    meta = getattr(getattr(task_obj, "config", None), "metadata", None) or {}
    meta = meta if isinstance(meta, dict) else {}
    unit, col = str(meta.get("cluster_unit") or "question"), meta.get("cluster_field")
    if (unit == "question") != (col is None):
        name = getattr(task_obj.config, "task", "?")
        raise ValueError(f"task {name}: metadata cluster_unit {unit!r} with cluster_field {col!r}; a unit other "
                         "than 'question' needs the doc column naming each question's cluster, and "
                         "'question' takes none")
    return unit, col


def sample_rows(task_obj, samples: Sequence[dict]) -> list[dict]:
    """The per-question rows of a task's lm-eval samples (``evaluator.evaluate(...,
    log_samples=True)["samples"][task]``), as the samples files hold them (``harness.samples``):
    ``{"doc_id", "prompt", "generation"}``, then the task's ``sample_logger`` fields
    (``question_id``, ``parsed``, ``score``; without a logger, ``score`` is lm-eval's
    ``accuracy``), then ``cluster`` where the task declares a ``cluster_field``. Raises
    ``ValueError`` when a doc lacks its declared cluster column."""
    logger = _sample_logger(task_obj) if task_obj is not None else None
    return [_sample_row(task_obj, logger, s) for s in samples]


def _sample_row(task_obj, logger, s: dict) -> dict:
    doc = s.get("doc", {})
    args = s.get("arguments")
    prompt = None
    if args:
        first = args[0] if isinstance(args, (list, tuple)) else args
        prompt = first[0] if isinstance(first, (list, tuple)) else first
        if isinstance(prompt, dict):  # lm-eval may key arguments as {"gen_args_0": {"arg_0": ...}}
            prompt = next(iter(prompt.values()), None)
            if isinstance(prompt, dict):
                prompt = prompt.get("arg_0")
    resp = s.get("filtered_resps") or s.get("resps")
    while isinstance(resp, (list, tuple)) and resp:
        resp = resp[0]
    generation = resp if isinstance(resp, str) else ""
    row = {"doc_id": s.get("doc_id"), "prompt": prompt, "generation": generation}
    if logger is not None:
        row.update(logger(doc, generation))
    else:
        row["score"] = s.get("accuracy")
    _, col = cluster_spec(task_obj)
    if col is not None:  # the leaderboard resamples these clusters (harness.stats)
        if doc.get(col) is None:
            raise ValueError(f"task {task_obj.config.task}: doc {row['doc_id']} has no {col!r}, the column its "
                             "metadata names as cluster_field")
        row["cluster"] = doc[col]
    return row


def evaluate_tasks(lm, task_specs: Sequence[str | dict], *, limit: int | None = None,
                   batch_size: int = 8, include_paths: Sequence[str | Path] = (),
                   seed: int = 0, show_progress: bool = True) -> list[TaskResult]:
    """Evaluate ``lm`` on lm-eval tasks; accuracies in percent with per-sample logs."""
    from lm_eval import evaluator

    model = lm_class()(lm, batch_size=batch_size, show_progress=show_progress)
    task_dict = load_tasks(task_specs, include_paths)
    # lm-eval re-encodes every logged image to PNG to hash it (LMEVAL_HASHMM) for multimodal
    # models; our per-sample rows keep no images, and the encoding cost ~0.6 s per 32 ScienceQA
    # questions on the CPU (a third of the bridge's overhead over plain generate on the H200)
    hash_images = getattr(evaluator, "LMEVAL_HASHMM", None)
    evaluator.LMEVAL_HASHMM = False
    try:
        out = evaluator.evaluate(model, task_dict, limit=limit, log_samples=True,
                                 bootstrap_iters=1000, verbosity="ERROR")
    finally:
        if hash_images is not None:
            evaluator.LMEVAL_HASHMM = hash_images
    results = []
    for name, metrics in out["results"].items():
        task_obj = task_dict["tasks"].get(name)
        n = int(out.get("n-samples", {}).get(name, {}).get("effective", 0))
        samples = out.get("samples", {}).get(name, [])
        n = n or len(samples)
        acc = metrics.get("accuracy,none")
        if acc is None:
            continue
        se = metrics.get("accuracy_stderr,none")
        se = float(se) * 100 if isinstance(se, (int, float)) and not math.isnan(se) else None
        rows = sample_rows(task_obj, samples)
        results.append(TaskResult(
            task=name, metric="accuracy", value=float(acc) * 100, stderr=se, n=n,
            n_empty=round(float(metrics.get("empty,none", 0.0)) * n),
            n_unparsed=round(float(metrics.get("unparsed,none", 0.0)) * n),
            samples=rows, cluster_unit=cluster_spec(task_obj)[0] if task_obj is not None else "question",
        ))
    return results
