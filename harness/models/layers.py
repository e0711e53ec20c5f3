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


def language_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(path, layers)`` of the language model's decoder layers."""
    return _module_list(model, "language_model")


def vision_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(path, layers)`` of the vision encoder's transformer layers."""
    return _module_list(model, "vision_tower")


def select_linears(model: nn.Module, parts: tuple[str, ...] | list[str]) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` in the requested parts, by module path, in model order."""
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise ValueError(f"unknown model part(s) {bad}; valid: {list(PARTS)}")
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and part_of(n) in parts}
