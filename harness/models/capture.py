"""Capture what a block receives during a forward pass, without copying the model.

Block-wise methods (GPTQ, AWQ, Q-VLM) process one transformer layer at a time; they need the
exact positional and keyword arguments the first layer receives (hidden states, rotary
embeddings, masks). A forward pre-hook records them and stops the forward pass right there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn


class _StopForward(Exception):
    pass


@dataclass
class LayerCall:
    """One call of a layer: its arguments, with the hidden states first."""

    args: tuple
    kwargs: dict[str, Any]

    @property
    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def with_hidden(self, hidden: torch.Tensor) -> "LayerCall":
        if self.args:
            return LayerCall((hidden,) + tuple(self.args[1:]), self.kwargs)
        return LayerCall((), {**self.kwargs, "hidden_states": hidden})


def _detach(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    return value


def capture_inputs(model: nn.Module, layer: nn.Module, batches: Iterable[dict],
                   run: Callable[[nn.Module, dict], Any] | None = None) -> list[LayerCall]:
    """Run ``model`` on each batch until ``layer`` is reached; return the layer's calls.

    ``run(model, batch)`` performs the forward pass (default: ``model(**batch)``).
    """
    calls: list[LayerCall] = []

    def hook(_module, args, kwargs):
        kw = {k: _detach(v) for k, v in kwargs.items() if k not in ("past_key_values", "cache")}
        kw["use_cache"] = False
        calls.append(LayerCall(tuple(_detach(a) for a in args), kw))
        raise _StopForward

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    (run or (lambda m, b: m(**b, use_cache=False)))(model, batch)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return calls


def layer_output(layer: nn.Module, call: LayerCall) -> torch.Tensor:
    """The hidden states a layer returns for a captured call (tuple outputs unwrapped)."""
    out = layer(*call.args, **call.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out
