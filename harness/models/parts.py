"""The quantizable parts of a LLaVA-family model and which part a module path belongs to.

Its own module because both sides need it without needing each other: ``QuantConfig`` validates
``parts`` against these names, and ``harness.models.layers`` selects linears by them.
"""

from __future__ import annotations

PARTS = ("language", "vision", "projector", "lm_head")


def part_of(name: str) -> str | None:
    """Which quantizable part a linear layer's path belongs to (None: not quantizable).

    Path rules of every supported family (``harness.models.family``): ``vision_tower`` (LLaVA,
    InternVL) or ``visual`` (Qwen2-VL's ``visual.blocks``) is the vision encoder, except
    ``visual.merger``, Qwen2-VL's projector; ``multi_modal_projector`` the projector."""
    segments = name.split(".")
    if "visual" in segments:
        return "projector" if "merger" in segments[segments.index("visual"):] else "vision"
    if "vision_tower" in name:
        return "vision"
    if "multi_modal_projector" in name:
        return "projector"
    if "language_model" in name:
        return "language"
    if name.split(".")[-1] == "lm_head":
        return "lm_head"
    return None
