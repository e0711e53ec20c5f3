"""Calibration data: image-text pairs encoded once and shared by every method of a suite.

``with_images=False`` (a suite's ``calibration: {modality: text}``) encodes the same questions
and answers without their images: no image placeholder in the prompt, no ``pixel_values``.

Methods receive a ``CalibrationSet`` of ready model inputs; ``labels`` mark the answer tokens
(-100 elsewhere) for methods with a language-modelling loss (Q-VLM's encoder optimization).
The digest enters the state cache key, so a different calibration never reuses a state.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .prompting import chat_prompt


@dataclass
class CalibrationSet:
    batches: list[dict[str, torch.Tensor]]
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return sum(int(b["input_ids"].shape[0]) for b in self.batches)

    def inputs(self):
        """Batches without ``labels``: what a plain forward pass takes."""
        for b in self.batches:
            yield {k: v for k, v in b.items() if k != "labels"}

    def digest(self) -> str:
        h = hashlib.sha256()
        for b in self.batches:
            for k in sorted(b):
                t = b[k].detach().cpu().contiguous()
                h.update(k.encode())
                h.update(str(tuple(t.shape)).encode())
                h.update(t.float().numpy().tobytes() if t.is_floating_point() else t.numpy().tobytes())
        return h.hexdigest()[:16]


def encode_pairs(lm, pairs: Sequence[tuple[Any, str, str]], batch_size: int = 8,
                 source: dict | None = None, with_images: bool = True) -> CalibrationSet:
    """Encode ``(image, prompt, answer)`` triples as LLaVA training examples.

    The text is the model's chat prompt followed by the answer and EOS; labels cover the answer.
    ``with_images=False``: the prompts without their images (text-only calibration).
    """
    processor = lm.processor
    tok = processor.tokenizer
    batches = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        prompts = [chat_prompt(processor, text, with_image=with_images) for _, text, _ in chunk]
        full = [p + " " + ans + (tok.eos_token or "") for p, (_, _, ans) in zip(prompts, chunk)]
        images = [img for img, _, _ in chunk] if with_images else None
        enc = processor(images=images, text=full, return_tensors="pt", padding=True)
        labels = torch.full_like(enc["input_ids"], -100)
        for i, prompt in enumerate(prompts):
            one = [chunk[i][0]] if with_images else None
            n_prompt = len(processor(images=one, text=[prompt], return_tensors="pt")["input_ids"][0])
            n_real = int(enc["attention_mask"][i].sum())
            seq = enc["input_ids"].shape[1]
            # left padding: the real tokens are the last n_real; the answer follows the prompt
            labels[i, seq - n_real + n_prompt:] = enc["input_ids"][i, seq - n_real + n_prompt:]
        batch = {k: v.to(lm.device) for k, v in enc.items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(lm.dtype)
        # positions count real tokens only, as generate() does under left padding (families with
        # multimodal RoPE compute their 3-D positions from the mask themselves)
        if _text_position_ids(lm):
            batch["position_ids"] = (batch["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
        batch["labels"] = labels.to(lm.device)
        batches.append(batch)
    return CalibrationSet(batches=batches, source=dict(source or {}, n=len(pairs), batch_size=batch_size))


def _text_position_ids(lm) -> bool:
    from .models.family import UnknownFamilyError, adapter_for

    adapter = getattr(lm, "adapter", None)
    if adapter is None:
        try:
            adapter = adapter_for(lm.model)
        except (UnknownFamilyError, AttributeError):
            return True
    return adapter.text_position_ids(lm.model)


def sample_indices(total: int, n: int, seed: int) -> list[int]:
    """A seeded random subset of ``n`` of ``range(total)`` (all if fewer), in ascending order."""
    return sorted(random.Random(seed).sample(range(total), min(n, total)))
