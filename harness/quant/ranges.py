"""Static activation ranges (and the clipping search) by one rule for every method.

A method decides weights and whatever it searches itself; the activation quantizers it leaves
undecided (per-tensor ranges with no ``scale``; with the clipping search, every quantizer's clip)
are filled here, the same way for all methods, so a gap between two rows is never a gap between
two calibrations. The rule, recorded in every record (``act_ranges``):

* tokens: real tokens only (the attention mask drops left padding);
* stream (``act_ranges.stream`` in a suite):
  - ``weights`` (default): one forward pass of the model as the state leaves it — quantized
    weights and the method's float transforms (AWQ's folded scales, Q-VLM's tuned encoder) —
    with activation quantizers off. It is what calibration tools for deployment run (ranges
    from one pass with quantizers in calibration mode), it does not depend on the order in which
    earlier quantizers round, and it is cheap;
  - ``quantized``: layer by layer, each transformer layer's ranges taken with every earlier
    layer's activation quantizers on (the stream the deployed layer sees; one pass per layer).
* stat: ``minmax`` — the range of the real tokens; ``search`` (a row's ``act_clip_search: true``) — the
  layer-wise percentile search: for each activation tensor, the clipping percentile ``p`` from
  ``SEARCH_GRID`` (the Q-VLM paper's grid) whose quantizer gives the least output error of the
  linears that read it, ``‖(Q_p(x) − x)·Ŵᵀ‖²`` over sampled real tokens with the method's
  weights ``Ŵ`` fixed — the error the activation quantizer adds at that layer, defined the same
  way for methods that transform the model. Per-tensor: the range ``[lo, hi]`` shrunk by
  ``q_p(|x|)/max|x|``; per-token: the clip ratio ``mean_t q_p(|x_t|)/max|x_t|``. Ties go to
  the earlier grid value (``harness.quant.ties``), i.e. to less clipping.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from typing import Iterable

import torch
from torch import nn

from .capture import run_batches, shared_input_sets, token_rows, watch_inputs
from .config import QuantConfig
from .grid import PERCENTILE_GRID, clip_ratios, upper_quantiles
from .quantizer import qparams
from .simulated import apply_state, quantize_activation
from .state import ActQuant, QuantState
from .ties import stable_argmin

STREAMS = ("weights", "quantized")
SEARCH_GRID = PERCENTILE_GRID
SEARCH_ROWS = 2048  # real-token rows per activation tensor kept for the clipping search
_LAYER = re.compile(r"^(.*\.layers\.\d+)\.")


def rule_for(qcfg: QuantConfig, act_clip_search: bool = False, stream: str | None = None) -> dict | None:
    """The rule for a scheme (None when nothing is left to fill: dynamic ranges, no search);
    ``act_clip_search``: the clipping search (stat ``search``) instead of ``minmax``."""
    stream = stream or STREAMS[0]
    if stream not in STREAMS:
        raise ValueError(f"activation-range stream {stream!r}; valid: {', '.join(STREAMS)}")
    if not qcfg.quantizes_acts or (qcfg.a_granularity != "per_tensor" and not act_clip_search):
        return None
    rule = {"stream": stream, "tokens": "real", "stat": "search" if act_clip_search else "minmax"}
    if act_clip_search:
        rule.update(grid=list(SEARCH_GRID), rows=SEARCH_ROWS)
    return rule


def undecided(state: QuantState, rule: dict | None) -> list[str]:
    """Linears whose input quantizer the rule fills: static ranges the method left unset, and
    under the search every quantizer (the lever is meant for methods that do not search)."""
    if rule is None:
        return []
    out = []
    for name, lq in state.linears.items():
        act = lq.act
        if act is None:
            continue
        if (act.granularity == "per_tensor" and act.scale is None) or rule["stat"] == "search":
            out.append(name)
    return out


class _Collector:
    """Gathers (through ``harness.quant.capture``), per linear, the range of its input over real tokens and
    (for the search) evenly spaced real-token rows; and which linears read the same tensor."""

    def __init__(self, model: nn.Module, names: list[str], rows_per_batch: int):
        self.model = model
        self.names = names
        self.rows_per_batch = rows_per_batch
        self.lo: dict[str, torch.Tensor] = {}
        self.hi: dict[str, torch.Tensor] = {}
        self.rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        self.order: list[tuple[str, torch.Tensor]] = []  # first batch: call order and inputs
        self.batch = 0

    def add(self, name: str, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        if self.batch == 0:
            self.order.append((name, x))
        rows = token_rows(x, mask)
        lo, hi = rows.min(), rows.max()
        self.lo[name] = lo if name not in self.lo else torch.minimum(self.lo[name], lo)
        self.hi[name] = hi if name not in self.hi else torch.maximum(self.hi[name], hi)
        if self.rows_per_batch and rows.shape[0]:
            k = min(self.rows_per_batch, rows.shape[0])
            idx = torch.linspace(0, rows.shape[0] - 1, k, device=rows.device).round().long().unique()
            self.rows[name].append(rows[idx])

    def run(self, batches: list[dict], stop_after: set[str] | None = None) -> None:
        with watch_inputs(self.model, self.names, self.add) as tokens:
            for i, batch in enumerate(batches):
                self.batch = i
                run_batches(self.model, [batch], tokens, stop_after)
        missing = [n for n in self.names if n not in self.lo]
        if missing:
            raise RuntimeError(f"calibration never reached {missing[:5]}; cannot set their activation ranges")

    def shared_sets(self) -> list[list[str]]:
        """Linears that read the very same tensor (q/k/v, gate/up) share one quantizer."""
        return shared_input_sets(self.order)


def _weights_only(state: QuantState, keep_acts: set[str]) -> QuantState:
    """The state with every activation quantizer off except those named in ``keep_acts``."""
    linears = {n: lq if n in keep_acts else replace(lq, act=None) for n, lq in state.linears.items()}
    return QuantState(state.method, state.config, linears, state.float_params, state.meta)


def _stages(names: list[str]) -> list[list[str]]:
    """Consecutive runs of linears (in call order) that belong to one transformer layer."""
    stages: list[list[str]] = []
    key_prev = None
    for n in names:
        m = _LAYER.match(n)
        key = m.group(1) if m else n
        if stages and key == key_prev:
            stages[-1].append(n)
        else:
            stages.append([n])
        key_prev = key
    return stages


def _weight_of(model: nn.Module, state: QuantState, name: str, like: torch.Tensor) -> torch.Tensor:
    lq = state.linears[name]
    if lq.codes is not None:
        w = lq.dequantized()
    elif lq.weight is not None:
        w = lq.weight
    else:
        w = model.get_submodule(name).weight.detach()
    return w.to(device=like.device, dtype=like.dtype)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _candidates(act: ActQuant, qcfg: QuantConfig, lo: float, hi: float, rows: torch.Tensor,
                grid: Iterable[float]) -> list[ActQuant]:
    """The quantizer each percentile of ``grid`` stands for (percentile 1.0: the full range)."""
    grid = list(grid)
    absx = rows.abs()
    out = []
    if act.granularity == "per_tensor":
        _, q = upper_quantiles(absx.reshape(-1), grid)
        amax = max(abs(lo), abs(hi), 1e-12)
        span = torch.tensor([lo, hi], dtype=torch.float64)
        for p in grid:
            ratio = 1.0 if p >= 1.0 else float(q[p]) / amax
            clip = float(qcfg.a_clip * min(ratio, 1.0))
            scale, zero = qparams(span, act.bits, act.sym, clip, dim=0)
            out.append(ActQuant(act.bits, act.sym, "per_tensor", clip, scale, zero))
        return out
    ratios = clip_ratios(absx, grid)
    for p in grid:
        ratio = 1.0 if p >= 1.0 else float(ratios[p].mean())
        out.append(ActQuant(act.bits, act.sym, "per_token", float(qcfg.a_clip * ratio)))
    return out


def _search(model, state, names, rows, lo, hi, qcfg, grid) -> tuple[ActQuant, float]:
    """The percentile whose quantizer adds the least output error to the linears in ``names``."""
    x = rows.to(_compute_dtype(rows))
    ws = [_weight_of(model, state, n, x) for n in names]
    cands = _candidates(state.linears[names[0]].act, qcfg, lo, hi, x, grid)
    errors = []
    for act in cands:
        d = quantize_activation(x, act) - x
        errors.append(sum(float((d @ w.T).pow(2).sum()) for w in ws))
    best = stable_argmin(errors)
    return cands[best], list(grid)[best]


def fill_static_ranges(model: nn.Module, state: QuantState, batches: list[dict],
                       rule: dict | None) -> dict:
    """Fill the state's undecided activation quantizers by ``rule`` (in place); returns a summary
    for records: the rule, how many quantizers it filled and, for the search, the percentiles."""
    names = undecided(state, rule)
    summary = dict(rule or {}, filled=len(names))
    if not names:
        return summary
    if not batches:
        raise ValueError("static activation ranges need calibration batches")
    qcfg = state.config
    search = rule["stat"] == "search"
    per_batch = math.ceil(int(rule.get("rows", SEARCH_ROWS)) / len(batches)) if search else 0
    pending = set(names)
    chosen: dict[str, float] = {}

    def fill(col: _Collector, stage: list[str]) -> None:
        for group in col.shared_sets():
            group = [n for n in group if n in stage]
            if not group:
                continue
            lo = float(min(col.lo[n] for n in group))
            hi = float(max(col.hi[n] for n in group))
            head = state.linears[group[0]].act
            if search:
                rows = torch.cat(col.rows[group[0]], 0)
                act, p = _search(model, state, group, rows, lo, hi, qcfg, rule["grid"])
                chosen.update({n: p for n in group})
            else:
                span = torch.tensor([lo, hi], dtype=torch.float64)
                scale, zero = qparams(span, head.bits, head.sym, head.clip_ratio, dim=0)
                act = replace(head, scale=scale, zero=zero)
            for n in group:
                state.linears[n].act = replace(act, scale=None if act.scale is None else act.scale.clone(),
                                               zero=None if act.zero is None else act.zero.clone())
            pending.difference_update(group)

    decided = {n for n, lq in state.linears.items() if lq.act is not None and n not in pending}
    if rule["stream"] == "weights":
        col = _Collector(model, names, per_batch)
        with_state = _weights_only(state, keep_acts=set())
        handle = apply_state(model, with_state)
        try:
            col.run(batches)
        finally:
            handle.restore()
        fill(col, names)
    else:
        # call order, from one pass with every activation quantizer off
        probe = _Collector(model, names, 0)
        handle = apply_state(model, _weights_only(state, keep_acts=set()))
        try:
            probe.run(batches[:1])
        finally:
            handle.restore()
        order = list(dict.fromkeys(n for n, _ in probe.order))
        for stage in _stages(order):
            col = _Collector(model, stage, per_batch)
            on = decided | (set(names) - pending)  # method-decided and already-filled quantizers
            handle = apply_state(model, _weights_only(state, keep_acts=on))
            try:
                col.run(batches, stop_after=set(stage))
            finally:
                handle.restore()
            fill(col, stage)
    if pending:
        raise RuntimeError(f"activation ranges left unfilled: {sorted(pending)[:5]}")
    if chosen:
        summary["mean_percentile"] = round(sum(chosen.values()) / len(chosen), 6)
        summary["percentiles"] = chosen
    return summary
