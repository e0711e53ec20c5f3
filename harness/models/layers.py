"""Find the parts of a LLaVA-family model that quantization methods work on.

Located by module path and type rather than by attribute chains, so the code follows the model
through transformers' refactorings (``model.language_model.layers`` in v5,
``language_model.model.layers`` before) and works for any LLaVA-compatible checkpoint.
"""

from __future__ import annotations

from torch import nn

from .parts import PARTS, part_of


def _module_list(model: nn.Module, must_contain: str) -> tuple[str, nn.ModuleList]:
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and must_contain in n and n.endswith("layers")]
    if not found:
        raise ValueError(f"no transformer layer list under a module named like '*{must_contain}*' "
                         f"in {type(model).__name__}")
    return min(found, key=lambda nm: len(nm[0]))


def language_layers_by_name(model: nn.Module) -> tuple[str, nn.ModuleList]:
    return _module_list(model, "language_model")


def vision_layers_by_name(model: nn.Module) -> tuple[str, nn.ModuleList]:
    return _module_list(model, "vision_tower")


def _adapter(model: nn.Module):
    """The model's family adapter, or None (a model of no known family, or no config)."""
    from .family import UnknownFamilyError, adapter_for

    if getattr(model, "config", None) is None:
        return None
    try:
        return adapter_for(model)
    except UnknownFamilyError:
        return None


def language_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(path, layers)`` of the language model's decoder layers (the family adapter's, else by
    name: the shortest ``*language_model*layers`` list)."""
    adapter = _adapter(model)
    return adapter.language_layers(model) if adapter else language_layers_by_name(model)


def vision_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(path, layers)`` of the vision encoder's transformer layers (the family adapter's, e.g.
    Qwen2-VL's ``visual.blocks``; else by name: ``*vision_tower*layers``)."""
    adapter = _adapter(model)
    return adapter.vision_layers(model) if adapter else vision_layers_by_name(model)


def select_linears(model: nn.Module, parts: tuple[str, ...] | list[str]) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` in the requested parts, by module path, in model order."""
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise ValueError(f"unknown model part(s) {bad}; valid: {list(PARTS)}")
    adapter = _adapter(model)
    which = adapter.part_of if adapter else part_of
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and which(n) in parts}
