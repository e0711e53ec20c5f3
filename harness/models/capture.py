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
    # where a part's layers get different arguments (Qwen2.5-VL's vision blocks: window or full
    # attention), each layer's own: index -> (args after the hidden states, kwargs without them)
    layer_args: dict[int, tuple[tuple, dict[str, Any]]] | None = None

    @property
    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def with_hidden(self, hidden: torch.Tensor) -> "LayerCall":
        if self.args:
            return LayerCall((hidden,) + tuple(self.args[1:]), self.kwargs, self.layer_args)
        return LayerCall((), {**self.kwargs, "hidden_states": hidden}, self.layer_args)

    def for_layer(self, index: int) -> "LayerCall":
        """This call's hidden states with the arguments layer ``index`` of the part receives
        (itself where all layers receive the same)."""
        if not self.layer_args or index not in self.layer_args:
            return self
        rest, kwargs = self.layer_args[index]
        if self.args:
            return LayerCall((self.hidden,) + tuple(rest), dict(kwargs), self.layer_args)
        return LayerCall((), {**kwargs, "hidden_states": self.hidden}, self.layer_args)


def _detach(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    return value


def _takes_use_cache(layer: nn.Module) -> bool:
    """Whether ``layer.forward`` accepts ``use_cache`` (decoder layers do; some vision layers,
    e.g. InternViT's, take no extra keyword arguments)."""
    import inspect

    params = inspect.signature(layer.forward).parameters.values()
    return any(p.name == "use_cache" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def capture_inputs(model: nn.Module, layer: nn.Module, batches: Iterable[dict],
                   run: Callable[[nn.Module, dict], Any] | None = None) -> list[LayerCall]:
    """Run ``model`` on each batch until ``layer`` is reached; return the layer's calls.

    ``run(model, batch)`` performs the forward pass (default: ``model(**batch)``).
    """
    calls: list[LayerCall] = []
    use_cache = _takes_use_cache(layer)

    def hook(_module, args, kwargs):
        kw = {k: _detach(v) for k, v in kwargs.items() if k not in ("past_key_values", "cache")}
        if use_cache:
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


def capture_layer_args(model: nn.Module, layers, batches: Iterable[dict],
                       run: Callable[[nn.Module, dict], Any] | None = None) -> list[dict]:
    """Per batch, ``{layer index: (args after the hidden states, kwargs without them)}`` for every
    layer of ``layers`` (one forward pass per batch, stopped after the last layer); for parts
    whose layers receive different arguments (``ModelAdapter.layer_kwargs_vary``)."""
    out: list[dict] = []
    current: dict = {}
    last = len(layers) - 1

    def hook(index):
        def fn(_module, args, kwargs):
            kw = {k: _detach(v) for k, v in kwargs.items()
                  if k not in ("past_key_values", "cache", "hidden_states")}
            if _takes_use_cache(layers[index]):
                kw["use_cache"] = False
            current[index] = (tuple(_detach(a) for a in args[1:]), kw)
            if index == last:
                raise _StopForward
        return fn

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for batch in batches:
                current = {}
                try:
                    (run or (lambda m, b: m(**b, use_cache=False)))(model, batch)
                except _StopForward:
                    pass
                out.append(current)
    finally:
        for h in handles:
            h.remove()
    return out


def layer_output(layer: nn.Module, call: LayerCall) -> torch.Tensor:
    """The hidden states a layer returns for a captured call (tuple outputs unwrapped)."""
    out = layer(*call.args, **call.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out
