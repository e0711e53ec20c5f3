"""Rows ``start:end`` of a processor batch, for every family.

A batch's text tensors have one row per sequence, but the picture tensors of some families are
packed over the batch's images instead: Qwen2-VL / Qwen2.5-VL concatenate every image's patches
into one ``pixel_values`` of (Σ t·h·w, features), InternVL every image's tiles. Slicing such a
tensor ``[start:end]`` takes patches, not sequences (the bug that stopped Q-VLM's VEO on a
Qwen2.5-VL-7B state on a GPU, where it splits batches into micro-batches).

The rule needs no family names: a tensor whose first dimension is the batch size is per
sequence (LLaVA's pictures, LLaVA-NeXT's tiles per image, ``image_grid_thw`` and ``image_sizes``
with one image per sequence); any other is packed over the images and is cut where the
sequences' image placeholder tokens are, at a fixed number of packed rows per placeholder
token (4 patches per token for Qwen's 2×2 merge, 1/256 of a tile for InternVL). A cut that does
not fall on a whole row is an error, never a silent mis-slice.
"""

from __future__ import annotations

from fractions import Fraction

import torch


def batch_size(batch: dict) -> int:
    return int(batch["input_ids"].shape[0])


def select_rows(batch: dict, start: int, end: int, image_token_id: int | None) -> dict:
    """Sequences ``start:end`` of ``batch`` (``image_token_id``: the placeholder that marks a
    picture's tokens in ``input_ids``; needed only when a tensor is packed over images)."""
    n = batch_size(batch)
    if not 0 <= start < end <= n:
        raise ValueError(f"rows {start}:{end} are outside a batch of {n}")
    if start == 0 and end == n:
        return dict(batch)
    tokens = None
    out = {}
    for key, value in batch.items():
        if not torch.is_tensor(value) or value.dim() == 0 or value.shape[0] == n:
            out[key] = value[start:end] if torch.is_tensor(value) and value.dim() else value
            continue
        if tokens is None:
            if image_token_id is None:
                raise ValueError(f"batch tensor {key!r} has {value.shape[0]} rows for {n} sequences "
                                 "and the model names no image token to split it by")
            tokens = [0] + torch.cumsum((batch["input_ids"] == image_token_id).sum(1), 0).tolist()
        if tokens[-1] == 0:
            raise ValueError(f"batch tensor {key!r} has {value.shape[0]} rows for {n} sequences, "
                             "but the sequences hold no image tokens")
        per_token = Fraction(int(value.shape[0]), tokens[-1])
        lo, hi = tokens[start] * per_token, tokens[end] * per_token
        if lo.denominator != 1 or hi.denominator != 1:
            raise ValueError(f"cannot cut batch tensor {key!r} ({value.shape[0]} rows over "
                             f"{tokens[-1]} image tokens) at sequences {start}:{end}: the cut falls "
                             "inside a row; use whole batches (micro-batch null)")
        out[key] = value[int(lo):int(hi)]
    return out
