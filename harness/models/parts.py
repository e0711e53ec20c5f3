"""The quantizable parts of a LLaVA-family model and which part a module path belongs to.

Its own module because both sides need it without needing each other: ``QuantConfig`` validates
``parts`` against these names, and ``harness.models.layers`` selects linears by them.
"""

from __future__ import annotations

PARTS = ("language", "vision", "projector", "lm_head")


def part_of(name: str) -> str | None:
    """Which quantizable part a linear layer's path belongs to (None: not quantizable)."""
    if "vision_tower" in name:
        return "vision"
    if "multi_modal_projector" in name:
        return "projector"
    if "language_model" in name:
        return "language"
    if name.split(".")[-1] == "lm_head":
        return "lm_head"
    return None
