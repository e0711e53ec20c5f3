"""The engine's clipping-search objective in Q-VLM's coordinates: Q-VLM's ``objective: linear``.

A control (ours), not the paper. The engine's ``+clip`` lever (``harness.quant.ranges``, stat
``search``) chooses, per activation tensor, the grid percentile whose quantizer adds the least
error to the output of the linears reading it, ``Σ ‖(Q_p(x) − x)·Ŵᵀ‖²`` over up to 2048 real-token
rows of the engine's ``weights`` stream, ``Ŵ`` the state's weights. Q-VLM's own search (Eq. 2)
minimizes the error at the layer's output instead, one percentile per layer shared by its
activation tensors. This module runs the engine's objective on Q-VLM's coordinates:

* ``coordinates: group`` — one percentile per activation tensor: the engine's search itself, so
  ``qvlm-layerwise (coordinates=group, objective=linear)`` is the ``rtn+clip`` state (tested);
* ``coordinates: layer`` — one percentile per transformer layer, the one minimizing the sum of
  the engine's errors over the layer's activation tensors (ties to the earlier grid value).

So the rows step one difference at a time: ``rtn+clip`` → ``qvlm-layerwise (objective=linear)``
(the coordinates) → ``qvlm-layerwise`` (the objective) → ``qvlm`` (the method: CDM and VEO).
The helpers are the engine's own (``harness.quant.ranges``), imported so the two cannot drift.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from typing import Sequence

import torch
from torch import nn

from harness.quant.config import QuantConfig
from harness.quant.ranges import (SEARCH_ROWS, _candidates, _Collector, _compute_dtype, _weight_of,
                                  _weights_only)
from harness.quant.simulated import apply_state, quantize_activation
from harness.quant.state import QuantState
from harness.quant.ties import stable_argmin

_LAYER = re.compile(r"^(.*\.layers\.\d+)\.")


def _clone(act):
    return replace(act, scale=None if act.scale is None else act.scale.clone(),
                   zero=None if act.zero is None else act.zero.clone())


@torch.no_grad()
def linear_objective_search(model: nn.Module, state: QuantState, names: Sequence[str],
                            batches: list[dict], qcfg: QuantConfig, grid: Sequence[float],
                            coordinates: str) -> dict[str, float]:
    """Set the activation quantizers of ``names`` in ``state`` (in place) by the engine's
    clipping-search objective on ``coordinates`` (module doc); returns the chosen percentile per
    linear. ``state`` holds the weights (its activation quantizers are off for the stream)."""
    if not batches:
        raise ValueError("the clipping search needs calibration batches")
    grid = list(grid)
    names = list(names)
    col = _Collector(model, names, math.ceil(SEARCH_ROWS / len(batches)))
    handle = apply_state(model, _weights_only(state, keep_acts=set()))
    try:
        col.run(batches)
    finally:
        handle.restore()
    units: dict[str, list[list[str]]] = {}  # coordinate -> the activation tensors (sets) it sets
    for s in col.shared_sets():
        s = [n for n in s if n in names]
        if not s:
            continue
        m = _LAYER.match(s[0])
        key = m.group(1) if coordinates == "layer" and m else s[0]
        units.setdefault(key, []).append(s)
    chosen: dict[str, float] = {}
    for sets in units.values():
        errors = [0.0] * len(grid)
        cands = []
        for s in sets:
            lo = float(min(col.lo[n] for n in s))
            hi = float(max(col.hi[n] for n in s))
            rows = torch.cat(col.rows[s[0]], 0)
            x = rows.to(_compute_dtype(rows))
            ws = [_weight_of(model, state, n, x) for n in s]
            c = _candidates(state.linears[s[0]].act, qcfg, lo, hi, x, grid)
            for i, act in enumerate(c):
                d = quantize_activation(x, act) - x
                errors[i] += sum(float((d @ w.T).pow(2).sum()) for w in ws)
            cands.append(c)
        best = stable_argmin(errors)
        for s, c in zip(sets, cands):
            for n in s:
                state.linears[n].act = _clone(c[best])
                chosen[n] = grid[best]
    missing = set(names) - set(chosen)
    if missing:
        raise RuntimeError(f"the clipping search never reached {sorted(missing)[:5]}")
    return chosen
