"""Sequential block-wise processing: decide one block of transformer layers at a time.

The loop GPTQ, AWQ and Q-VLM share: capture what a model part's first layer receives, then walk
the part's layers in blocks of consecutive layers. For each block a method's ``process`` callback
decides the block's quantization and returns it as a *fragment* (a ``QuantState`` holding only
that block's linears and float params, keyed by full model paths); the loop then computes the
next block's inputs, either from the block as quantized by the fragment (``propagate=
"quantized"``: each block sees the errors of the already-quantized blocks before it, as in GPTQ)
or from the float block (``propagate="float"``: AWQ's reference implementations). The model is
never modified: fragments are applied with ``applied()`` only while their outputs are computed.

Typical use::

    from harness.quant.blockwise import part_inputs, run_blockwise

    inputs = part_inputs(model, "language", calib.inputs(), state=vision_state)
    def process(block):                 # one Block per group of consecutive layers
        frag = block.fragment(method, qcfg)
        for name, lin in block.linears().items():
            ...                         # frag.linears[name] = LinearQuant(...)
        return frag
    state = run_blockwise(model, inputs, process, propagate="quantized")

API
---
``part_inputs(model, part, batches, state=None) -> PartInputs``
    ``part`` is ``"language"`` or ``"vision"``. Runs the model on each batch (with ``state``
    applied, e.g. the quantized vision encoder when capturing language-layer inputs) until the
    part's first layer and records its calls. ``PartInputs`` has ``path`` (e.g.
    ``"model.language_model.layers"``), ``layers`` (the ``ModuleList``), ``calls`` (one
    ``LayerCall`` per batch) and ``masks`` (per call a bool ``[batch, seq]`` tensor marking real,
    non-padding tokens, from the batch's ``attention_mask``; ``None`` = every token is real).

``run_blockwise(model, inputs, process, *, blocks=None, propagate="quantized",
track_float=False, on_block=None) -> QuantState``
    ``blocks``: lists of consecutive layer indices covering the part (default: one layer per
    block; Q-VLM passes its mined partition). ``process(block)`` returns a fragment or ``None``
    (leave the block float); the fragments are merged into the returned state (method name
    ``"fragment"``; callers copy its ``linears``/``float_params`` into their own state).
    ``track_float=True`` keeps the float model's stream beside the quantized one, so each block
    also offers ``float_calls``/``float_outputs()`` (targets for block-output objectives).
    ``on_block(block, fragment)`` is called after each block (progress, timing).

``Block`` (what ``process`` receives)
    ``index``, ``layer_ids``, ``paths`` (full module path per layer), ``layers``,
    ``calls`` (the block's inputs: from the quantized previous blocks under
    ``propagate="quantized"``, from the float model under ``"float"``), ``masks``,
    ``float_calls`` (the float model's inputs, or ``None`` unless tracked or propagating float).
    ``linears()``: ``{full path: nn.Linear}`` inside the block, in model order.
    ``forward(call, state=None)``: the block's output hidden states for one call, with a
    fragment applied if given. ``outputs(state=None, calls=None)``: for every call.
    ``float_outputs()``: the float block on ``float_calls`` (cached).
    ``linear_inputs(names, fn, state=None, calls=None)``: runs the block on every call and calls
    ``fn(name, x, mask)`` with the input each named linear receives (``x`` is the raw input,
    before any activation quantizer of ``state``; ``mask`` is that call's token mask or ``None``).
    ``fragment(method, config)``: an empty ``QuantState`` to fill.

``token_rows(x, mask)`` (from ``harness.quant.capture``): the ``[n_real_tokens, features]`` rows of a ``[batch, seq, features]``
tensor (all rows if ``mask`` is ``None`` or does not match), for statistics that must not count
padding.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from ..models.capture import LayerCall, capture_inputs, capture_layer_args, layer_output
from ..models.layers import language_layers, vision_layers
from .capture import watch_inputs
from .config import QuantConfig
from .simulated import applied
from .state import QuantState

PROPAGATE = ("quantized", "float")
log = logging.getLogger(__name__)


@dataclass
class PartInputs:
    path: str
    layers: nn.ModuleList
    calls: list[LayerCall]
    masks: list[torch.Tensor | None]


def _mask_for(batch: dict, call: LayerCall) -> torch.Tensor | None:
    am = batch.get("attention_mask")
    hidden = call.hidden
    if am is None or am.dim() != 2 or tuple(am.shape) != tuple(hidden.shape[:2]):
        return None
    mask = am.to(device=hidden.device).bool()
    return None if bool(mask.all()) else mask


def _layer_kwargs_vary(model: nn.Module, part: str) -> bool:
    from ..models.family import UnknownFamilyError, adapter_for

    if getattr(model, "config", None) is None:
        return False
    try:
        return adapter_for(model).layer_kwargs_vary(model, part)
    except UnknownFamilyError:
        return False


def part_inputs(model: nn.Module, part: str, batches: Iterable[dict],
                state: QuantState | None = None) -> PartInputs:
    """What the first layer of ``part`` ("language" | "vision") receives for each batch."""
    finder = {"language": language_layers, "vision": vision_layers}.get(part)
    if finder is None:
        raise ValueError(f"block-wise processing covers 'language' and 'vision', not {part!r}")
    path, layers = finder(model)
    batches = list(batches)
    vary = _layer_kwargs_vary(model, part)

    def capture():
        calls = capture_inputs(model, layers[0], batches)
        if vary:  # each layer's own arguments (e.g. window vs full attention), hidden states aside
            for call, per_layer in zip(calls, capture_layer_args(model, layers, batches)):
                call.layer_args = per_layer
        return calls

    if state is not None and (state.linears or state.float_params):
        with applied(model, state):
            calls = capture()
    else:
        calls = capture()
    if len(calls) != len(batches):
        raise RuntimeError(f"captured {len(calls)} calls of {path}.0 from {len(batches)} batches")
    masks = [_mask_for(b, c) if part == "language" else None for b, c in zip(batches, calls)]
    return PartInputs(path=path, layers=layers, calls=calls, masks=masks)


@dataclass
class Block:
    index: int
    layer_ids: list[int]
    paths: list[str]
    layers: list[nn.Module]
    calls: list[LayerCall]
    masks: list[torch.Tensor | None]
    float_calls: list[LayerCall] | None = None
    model: nn.Module | None = None
    _float_out: list[torch.Tensor] | None = field(default=None, repr=False)

    def linears(self) -> dict[str, nn.Linear]:
        out: dict[str, nn.Linear] = {}
        for path, layer in zip(self.paths, self.layers):
            for name, mod in layer.named_modules():
                if isinstance(mod, nn.Linear):
                    out[f"{path}.{name}"] = mod
        return out

    def fragment(self, method: str, config: QuantConfig) -> QuantState:
        return QuantState(method=method, config=config)

    def _forward_raw(self, call: LayerCall) -> torch.Tensor:
        hidden = None
        for index, layer in zip(self.layer_ids, self.layers):
            c = call if hidden is None else call.with_hidden(hidden)
            hidden = layer_output(layer, c.for_layer(index))
        return hidden

    def forward(self, call: LayerCall, state: QuantState | None = None) -> torch.Tensor:
        with torch.no_grad():
            if state is not None and (state.linears or state.float_params):
                with applied(self.model, state):
                    return self._forward_raw(call)
            return self._forward_raw(call)

    def outputs(self, state: QuantState | None = None,
                calls: list[LayerCall] | None = None) -> list[torch.Tensor]:
        calls = self.calls if calls is None else calls
        with torch.no_grad():
            if state is not None and (state.linears or state.float_params):
                with applied(self.model, state):
                    return [self._forward_raw(c) for c in calls]
            return [self._forward_raw(c) for c in calls]

    def float_outputs(self) -> list[torch.Tensor]:
        if self.float_calls is None:
            raise ValueError("float stream not tracked: pass track_float=True to run_blockwise")
        if self._float_out is None:
            self._float_out = self.outputs(calls=self.float_calls)
        return self._float_out

    def linear_inputs(self, names: Iterable[str], fn: Callable[[str, torch.Tensor, torch.Tensor | None], None],
                      state: QuantState | None = None, calls: list[LayerCall] | None = None) -> None:
        """Stream the input of each named linear to ``fn(name, x, mask)`` while the block runs."""
        calls = self.calls if calls is None else calls

        def run():
            with watch_inputs(self.model, names, fn) as tokens:
                for call, mask in zip(calls, self.masks):
                    tokens.mask = mask
                    self._forward_raw(call)

        with torch.no_grad():
            if state is not None and (state.linears or state.float_params):
                with applied(self.model, state):
                    run()
            else:
                run()


def _merge(into: QuantState, frag: QuantState | None) -> None:
    if frag is None:
        return
    into.linears.update(frag.linears)
    into.float_params.update(frag.float_params)


def run_blockwise(model: nn.Module, inputs: PartInputs,
                  process: Callable[[Block], QuantState | None], *,
                  blocks: list[list[int]] | None = None, propagate: str = "quantized",
                  track_float: bool = False,
                  on_block: Callable[[Block, QuantState | None], None] | None = None) -> QuantState:
    """Decide ``inputs``' layers block by block; return the merged fragments (see module doc)."""
    if propagate not in PROPAGATE:
        raise ValueError(f"propagate must be one of {PROPAGATE}, got {propagate!r}")
    n = len(inputs.layers)
    if blocks is None:
        blocks = [[i] for i in range(n)]
    flat = [i for b in blocks for i in b]
    if flat != list(range(n)):
        raise ValueError(f"blocks must be consecutive runs covering layers 0..{n - 1}, got {blocks}")
    merged = QuantState(method="fragment", config=QuantConfig())
    calls = list(inputs.calls)
    keep_float = track_float or propagate == "float"
    float_calls = list(inputs.calls) if keep_float else None
    for index, ids in enumerate(blocks):
        first = ids[0]  # a block's calls carry its first layer's own arguments
        block = Block(index=index, layer_ids=list(ids),
                      paths=[f"{inputs.path}.{i}" for i in ids],
                      layers=[inputs.layers[i] for i in ids],
                      calls=[c.for_layer(first) for c in (float_calls if propagate == "float" else calls)],
                      masks=inputs.masks,
                      float_calls=None if float_calls is None else [c.for_layer(first) for c in float_calls],
                      model=model)
        t0 = time.perf_counter()
        frag = process(block)
        _merge(merged, frag)
        log.info("%s block %d/%d (layers %s) processed in %.2fs", inputs.path, index + 1,
                 len(blocks), ids, time.perf_counter() - t0)
        if on_block is not None:
            on_block(block, frag)
        if index == len(blocks) - 1:
            break
        with torch.no_grad():
            if keep_float:
                outs = block.float_outputs()
                float_calls = [c.with_hidden(o) for c, o in zip(float_calls, outs)]
            if propagate == "quantized":
                outs = block.outputs(state=frag, calls=calls)
                calls = [c.with_hidden(o) for c, o in zip(calls, outs)]
        del block
    return merged
