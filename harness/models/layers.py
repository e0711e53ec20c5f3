"""Find the parts of a LLaVA-family model that quantization methods work on.

Asked of the model's family adapter (``harness.models.family``); a model of no known family (or
without a config) gets the base adapter's name-based rules: layer lists by module path and type,
linears' parts by ``parts.part_of``. This module sits above family.py, which never imports it.
"""

from __future__ import annotations

from torch import nn

from .family import ModelAdapter, UnknownFamilyError, adapter_for
from .parts import PARTS, part_of

__all__ = ["PARTS", "part_of", "language_layers", "vision_layers", "select_linears"]  # part_of: methods import it here

_BY_NAME = ModelAdapter()  # the name-based rules every adapter starts from


def _adapter(model: nn.Module) -> ModelAdapter:
    """The model's family adapter, or the name-based rules (a model of no known family, or no config)."""
    if getattr(model, "config", None) is None:
        return _BY_NAME
    try:
        return adapter_for(model)
    except UnknownFamilyError:
        return _BY_NAME


def language_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(path, layers)`` of the language model's decoder layers (the family adapter's, else by
    name: the shortest ``*language_model*layers`` list)."""
    return _adapter(model).language_layers(model)


def vision_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(path, layers)`` of the vision encoder's transformer layers (the family adapter's, e.g.
    Qwen2-VL's ``visual.blocks``; else by name: ``*vision_tower*layers``)."""
    return _adapter(model).vision_layers(model)


def select_linears(model: nn.Module, parts: tuple[str, ...] | list[str]) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` in the requested parts, by module path, in model order."""
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise ValueError(f"unknown model part(s) {bad}; valid: {list(PARTS)}")
    which = _adapter(model).part_of
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and which(n) in parts}
