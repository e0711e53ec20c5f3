"""A prompt's picture as the perf path passes it around: LLaVA-1.5's ``pixel_values`` tensor, or
the dict of image inputs another family's model takes (``pixel_values`` plus ``image_sizes`` for
LLaVA-OneVision's any-resolution tiles, ``image_grid_thw`` for Qwen2-VL / Qwen2.5-VL's patches);
the family adapter makes them (``ModelAdapter.synthetic_image``)."""

from __future__ import annotations

import torch


def image_inputs(pixels) -> dict[str, torch.Tensor]:
    """``pixels`` (a ``pixel_values`` tensor or a dict of image inputs) as a dict."""
    return dict(pixels) if isinstance(pixels, dict) else {"pixel_values": pixels}


def images_to(pixels, device=None, dtype: torch.dtype | None = None):
    """``pixels`` on ``device``, its floating-point tensors in ``dtype`` (grid sizes stay integers);
    the same kind (tensor or dict) as given."""
    def move(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype if t.is_floating_point() and dtype is not None else t.dtype)

    if isinstance(pixels, dict):
        return {k: move(v) for k, v in pixels.items()}
    return move(pixels)


def repeat_images(pixels, B: int):
    """The picture inputs of one prompt repeated for a batch of ``B`` identical prompts (every
    tensor's leading dimension is per image or per patch)."""
    def rep(t: torch.Tensor) -> torch.Tensor:
        return t.repeat(B, *([1] * (t.dim() - 1)))

    if isinstance(pixels, dict):
        return {k: rep(v) for k, v in pixels.items()}
    return rep(pixels)


def first_image(pixels):
    """The picture inputs of the first prompt of a batch of identical prompts (``repeat_images``
    undone): one image's tensors (Qwen's patches: the first ``t*h*w`` rows)."""
    if not isinstance(pixels, dict):
        return pixels[:1]
    out = {k: v[:1] for k, v in pixels.items()}
    grid = pixels.get("image_grid_thw")
    if grid is not None and "pixel_values" in pixels:
        out["pixel_values"] = pixels["pixel_values"][: int(grid[0].prod())]
    return out
