"""Watch what linear layers receive while calibration data runs: the one hook loop methods share.

Every statistic a method or the engine takes from calibration data (AWQ's and SmoothQuant's
per-channel magnitudes, GPTQ's Hessians, the engine's activation ranges, Q-VLM's search samples)
comes through here, so all of them see the same tokens the same way:

* the input a linear's *quantizer* sees: hooks run after any online transform the state put in
  front of the linear (QuaRot's Hadamard, ``harness.quant.transforms``), since those are
  registered as the module's first pre-hook;
* real tokens only: ``fn(name, x, mask)`` gets the batch's attention mask for language-model
  linears (``None`` for the vision tower and projector, whose every patch token is real, so a
  vision tensor is never masked by a text mask of the same shape), and ``token_rows`` drops the
  padding rows;
* released after use: hooks are removed when the ``with`` block or the call ends, even on error.

Typical use::

    from harness.quant.capture import channel_stats, linear_inputs

    amax = channel_stats(model, ["model.language_model.layers.0.self_attn.q_proj"], batches,
                         stat="absmax")          # {name: [in_features] tensor}
    linear_inputs(model, names, batches, lambda name, x, mask: ...)   # stream every input
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from ..models.parts import part_of

IMAGE_PARTS = ("vision", "projector")  # their inputs are image patches, every one real
InputFn = Callable[[str, torch.Tensor, "torch.Tensor | None"], None]


def token_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Rows of ``x`` (``[..., features]``) for real tokens only, flattened to ``[n, features]``."""
    if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
        return x[mask.to(x.device)]
    return x.reshape(-1, x.shape[-1])


class Tokens:
    """The token mask of the call in flight (set by whoever drives the forward passes)."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None


@contextmanager
def watch_inputs(root: nn.Module, names: Iterable[str], fn: InputFn,
                 tokens: Tokens | None = None) -> Iterator[Tokens]:
    """While the block runs, ``fn(name, x, tokens.mask)`` for the input of each named module
    (paths relative to ``root``); yields the ``Tokens`` whose mask the driver sets per call."""
    tokens = tokens or Tokens()
    handles = []
    try:
        for name in names:
            patches = part_of(name) in IMAGE_PARTS  # the token mask describes text tokens only

            def hook(_m, args, _n=name, _patches=patches):
                fn(_n, args[0].detach(), None if _patches else tokens.mask)
            handles.append(root.get_submodule(name).register_forward_pre_hook(hook))
        yield tokens
    finally:
        for h in handles:
            h.remove()


class _Stop(Exception):
    pass


def batch_mask(batch: dict) -> torch.Tensor | None:
    """Real tokens of a tokenized batch (its attention mask as bool), or None."""
    am = batch.get("attention_mask")
    return None if am is None else am.bool()


def image_token_mask(batch: dict, image_token_id: int) -> torch.Tensor:
    """``[batch, seq]`` bool: the positions that carry image features (processors expand the
    image placeholder into one token per feature, so these are the vision tokens)."""
    return batch["input_ids"] == image_token_id


def run_batches(model: nn.Module, batches: Iterable[dict], tokens: Tokens,
                stop_after: set[str] | None = None) -> None:
    """Full forward passes (no KV cache, no grad), setting ``tokens.mask`` per batch; with
    ``stop_after``, each pass ends once every named module has run (later layers are not needed)."""
    fired: set[str] = set()
    handles = []
    if stop_after:
        def after(name):
            def hook(_m, _a, _o):
                fired.add(name)
                if stop_after <= fired:
                    raise _Stop
            return hook
        handles = [model.get_submodule(n).register_forward_hook(after(n)) for n in stop_after]
    try:
        with torch.no_grad():
            for batch in batches:
                fired.clear()
                tokens.mask = batch_mask(batch)
                try:
                    model(**batch, use_cache=False)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()


def linear_inputs(model: nn.Module, names: Iterable[str], batches: Iterable[dict], fn: InputFn, *,
                  state=None, stop_after: set[str] | None = None) -> None:
    """Stream the input of each named linear to ``fn(name, x, mask)`` over full forward passes
    of ``model`` on ``batches``, with ``state`` (a ``QuantState``) applied if given."""
    from .simulated import applied

    names = list(names)
    with watch_inputs(model, names, fn) as tokens:
        if state is not None and (state.linears or state.float_params):
            with applied(model, state):
                run_batches(model, batches, tokens, stop_after)
        else:
            run_batches(model, batches, tokens, stop_after)


def shared_input_sets(order: Iterable[tuple[str, torch.Tensor]]) -> list[list[str]]:
    """Group linears that read the very same tensor (q/k/v, gate/up), from ``(name, input)``
    pairs in call order (one forward pass): a set shares one activation quantizer and Hessian."""
    sets: list[list[str]] = []
    firsts: list[torch.Tensor] = []
    seen: set[str] = set()
    for name, x in order:
        if name in seen:
            continue
        seen.add(name)
        for s, x0 in zip(sets, firsts):
            if x is x0 or (x.data_ptr() == x0.data_ptr() and x.shape == x0.shape
                           and x.stride() == x0.stride()):
                s.append(name)
                break
        else:
            sets.append([name])
            firsts.append(x)
    return sets


class ChannelStat:
    """Per input channel ``max|x|`` (``absmax``) or ``mean|x|`` (``absmean``) over real tokens,
    accumulated in float64 on the CPU when the input is float64, else float32."""

    KINDS = ("absmax", "absmean")

    def __init__(self, kind: str = "absmax"):
        if kind not in self.KINDS:
            raise ValueError(f"channel statistic {kind!r}; valid: {', '.join(self.KINDS)}")
        self.kind = kind
        self.acc: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        rows = token_rows(x, mask)
        rows = rows.abs().to(torch.float64 if rows.dtype == torch.float64 else torch.float32)
        if not rows.shape[0]:
            return
        part = rows.amax(0) if self.kind == "absmax" else rows.sum(0)
        if self.acc is None:
            self.acc = part
        else:
            self.acc = torch.maximum(self.acc, part) if self.kind == "absmax" else self.acc + part
        self.count += rows.shape[0]

    def value(self) -> torch.Tensor:
        if self.acc is None:
            raise RuntimeError("no real tokens reached this linear")
        return self.acc if self.kind == "absmax" else self.acc / self.count


def channel_stats(model: nn.Module, names: Iterable[str], batches: Iterable[dict],
                  stat: str = "absmax", *, state=None) -> dict[str, torch.Tensor]:
    """``{name: [in_features]}``: a per-channel statistic of each named linear's input over the
    real tokens of ``batches`` (one forward pass per batch, ``state`` applied if given)."""
    names = list(names)
    acc = {n: ChannelStat(stat) for n in names}
    linear_inputs(model, names, batches, lambda n, x, m: acc[n].add(x, m), state=state)
    missing = [n for n in names if acc[n].acc is None]
    if missing:
        raise RuntimeError(f"calibration never reached {missing[:5]}")
    return {n: a.value() for n, a in acc.items()}
