"""Clipping-percentile search, layer-wise (paper Eq. 2) and joint over a block (Eq. 3): Q-VLM §2.

What is searched (the paper and the official code: activation clipping): an activation clipping
percentile from ``grid`` (default 1.0, 0.995, ..., 0.98) per transformer layer
(``coordinates="layer"``, the default: every activation quantizer of the layer clips at that
percentile of its own input), or per *quantizer group* (``coordinates="group"``: one activation
tensor and the linears that read it — Llama: q/k/v, o, gate/up, down; found by watching which
linears receive the same tensor object). ``search_weights=True`` (ours, off by default) adds a
weight clipping percentile per coordinate; otherwise the weights are plain round-to-nearest of
the scheme.

How a percentile becomes a quantizer (the core's ``clip_ratio`` form, so the simulated model
computes exactly what was searched):

* per-token activations: ``clip = mean over real calibration tokens of q_p(|x_t|) / max|x_t|``
  on the group's inputs, stored as ``ActQuant.clip_ratio``;
* per-tensor activations: the calibration range ``[min, max]`` over real tokens shrunk by
  ``q_p(|x|) / max|x|`` (quantile over up to 65536 sampled values per batch);
* weights (``search_weights``): per output channel (or group) ``clip = q_p(|w|) / max|w|``.

Which stream those statistics come from (``act_stats``): by default (``stream_stats``) the
engine's ``weights`` stream (``harness.quant.ranges``) — one pass of the model with every target
linear's round-to-nearest weights and activation quantizers off — the stream every other row's
static ranges come from, so at p = 1 the range is exactly the one the engine gives a
round-to-nearest layer (tested: a grid of ``[1.0]`` is the RTN state, ranges included). Without
``act_stats`` (Q-VLM's ``range_stream: float``, a control) they come from the float model's own
inputs of each layer, the paper's "full-precision distribution".

Both are multiplied by the config's ``w_clip`` / ``a_clip`` (1.0 by default), so p = 1.0
everywhere is exactly round-to-nearest.

Objective: mean squared error at the output of the layer (layer-wise) or block (joint) over the
real calibration tokens (of the first ``eval_batches`` batches when set), the quantized layers
fed by the already-quantized previous blocks, the target the float model's own activation there.
Errors are computed in the tensors' dtype (float64 stays float64; half precision is widened to
float32). Every choice among candidates goes through ``harness.quant.ties`` (a candidate must win
by a relative margin; earlier candidates win near-ties; the grid lists the unclipped 1.0 first).

Search over a set of coordinates (one layer for Eq. 2, a block for Eq. 3):

* **exhaustive** when the number of combinations ``len(grid) ** n_coordinates`` is at most
  ``exhaustive_max``: enumerated as a tree over the block's layers, so each layer's output is
  computed once per prefix of choices (3 layers x 1 coordinate x 5 values: 5 + 25 + 125 layer
  passes, 125 objective evaluations);
* otherwise **coordinate descent to a fixed point** from several starts (each coordinate in
  forward order set to its best grid value with the others fixed, sweeps repeated until one
  changes nothing): the incumbent (for a block: the layer-wise optimum, so the block never ends
  worse than layer-wise), all unclipped (round-to-nearest), and the best *uniform* assignment
  (every coordinate at the same percentile, the best of the grid's values — a joint move that
  single-coordinate steps cannot make). The best fixed point wins, earlier starts winning ties.

Layer-wise (``joint=False``): each layer in order, its coordinates searched against its own
output, fed by the layer-wise-quantized layers before it. Joint: the layer-wise solution first
(recorded as ``layerwise_error``), then the block's coordinates jointly against the block output.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from harness.models.capture import LayerCall, layer_output
from harness.quant.build import act_quantizer, linear_from_weight
from harness.quant.capture import run_batches, shared_input_sets, watch_inputs
from harness.quant.config import QuantConfig
from harness.quant.grid import PERCENTILE_GRID, clip_ratios, quantile_index, unclipped_first, upper_quantiles
from harness.quant.quantizer import dequantize_weight, qparams, rtn_weight, wide
from harness.quant.simulated import apply_state, quantize_activation
from harness.quant.state import ActQuant, LinearQuant, QuantState
from harness.quant.ties import improves, stable_argmin

DEFAULT_GRID = PERCENTILE_GRID
COORDINATES = ("group", "layer")
RANGE_STREAMS = ("weights", "float")  # the engine's stream (default), the float model's (control)
PER_TENSOR_SAMPLES = 65536
EXHAUSTIVE_MAX = 125  # 5 percentiles ** 3 layers: a block of three with layer coordinates
MAX_SWEEPS = 50  # safety cap on coordinate-descent sweeps (each move lowers the error by a margin)


# ---- percentiles -> clip ratios ------------------------------------------------------------------

def weight_clip_ratios(weight: torch.Tensor, group_size: int | None,
                       grid: Sequence[float]) -> dict[float, torch.Tensor]:
    """Per group ``q_p(|w|) / max|w|`` as ``[out, n_groups, 1]`` float32 tensors (1.0 at p = 1):
    clip ratios enter ``qparams``, which computes weight scales in float32 for every input dtype."""
    out_f, in_f = weight.shape
    gs = in_f if group_size is None or group_size <= 0 or group_size >= in_f else group_size
    return clip_ratios(weight.detach().float().abs().reshape(out_f, in_f // gs, gs), grid)


@dataclass
class ActStats:
    """Calibration statistics of one activation tensor, enough to map percentiles to quantizers."""

    ratio_sum: dict[float, float] = field(default_factory=dict)
    tokens: int = 0
    lo: float = float("inf")
    hi: float = float("-inf")
    samples: list[torch.Tensor] = field(default_factory=list)
    _made: dict = field(default_factory=dict, repr=False)

    def add(self, x: torch.Tensor, mask: torch.Tensor | None, grid: Sequence[float],
            per_tensor: bool, gen: torch.Generator) -> None:
        rows = x.detach().reshape(-1, x.shape[-1])
        if mask is not None and mask.numel() == rows.shape[0]:
            rows = rows[mask.reshape(-1).to(rows.device).bool()]
        if rows.shape[0] == 0:
            return
        rows = wide(rows)
        self._made.clear()
        if per_tensor:
            self.lo = min(self.lo, float(rows.min()))
            self.hi = max(self.hi, float(rows.max()))
            flat = rows.abs().reshape(-1)
            if flat.numel() > PER_TENSOR_SAMPLES:
                idx = torch.randint(flat.numel(), (PER_TENSOR_SAMPLES,), generator=gen)
                flat = flat[idx.to(flat.device)]
            self.samples.append(flat.cpu())
            return
        mx, q = upper_quantiles(rows.abs(), grid)
        mx = mx.clamp_min(1e-12)
        for p in grid:
            if p < 1.0:
                self.ratio_sum[p] = self.ratio_sum.get(p, 0.0) + float((q[p] / mx).sum())
        self.tokens += rows.shape[0]

    def quantizer(self, qcfg: QuantConfig, p: float) -> ActQuant:
        """The activation quantizer for percentile ``p`` (the config's bits, symmetry, granularity).

        The same object for the same ``p`` (so the search's input cache recognizes it)."""
        if p not in self._made:
            self._made[p] = self._make(qcfg, p)
        return self._made[p]

    def _make(self, qcfg: QuantConfig, p: float) -> ActQuant:
        act = act_quantizer(qcfg)
        if act.granularity == "per_token":
            ratio = 1.0 if p >= 1.0 or self.tokens == 0 else self.ratio_sum[p] / self.tokens
            act.clip_ratio = float(qcfg.a_clip * ratio)
            return act
        if not self.samples:
            raise RuntimeError("no calibration activations reached this quantizer")
        if p >= 1.0:
            ratio = 1.0
        else:
            vals = torch.cat(self.samples).sort().values
            ratio = float(vals[quantile_index(vals.numel(), p)]) / max(abs(self.lo), abs(self.hi), 1e-12)
        act.clip_ratio = float(qcfg.a_clip * ratio)
        span = torch.tensor([self.lo, self.hi], dtype=torch.float32)
        act.scale, act.zero = qparams(span, act.bits, act.sym, act.clip_ratio, dim=0)
        return act


def _layer_seed(seed: int, layer: int) -> int:
    """The sampling seed of one layer's statistics (the same for either stream)."""
    return seed + 7919 * layer


def _same_tensor(x: torch.Tensor, x0: torch.Tensor) -> bool:
    """``harness.quant.capture.shared_input_sets``'s test: the very same tensor."""
    return x is x0 or (x.data_ptr() == x0.data_ptr() and x.shape == x0.shape
                       and x.stride() == x0.stride())


@torch.no_grad()
def stream_stats(model: nn.Module, state: QuantState, layer_of: dict[str, int], batches,
                 qcfg: QuantConfig, grid: Sequence[float], seed: int) -> dict[str, ActStats]:
    """Activation statistics of the linears in ``layer_of`` (model path -> layer index) on the
    engine's ``weights`` stream: full passes of ``model`` over ``batches`` with ``state`` applied,
    which holds round-to-nearest weights and no activation quantizers (what
    ``harness.quant.ranges`` applies for its default stream). Linears that read one tensor
    (q/k/v, gate/up) share one ``ActStats`` object; returns it under each of their paths."""
    if any(lq.act is not None for lq in state.linears.values()):
        raise ValueError("the weights stream has every activation quantizer off")
    grid = unclipped_first(grid)
    per_tensor = qcfg.a_granularity == "per_tensor"
    stats: dict[str, ActStats] = {}
    head: dict[str, str] = {}  # linear -> the first linear (in call order) reading its tensor
    gens: dict[int, torch.Generator] = {}
    last: list = [None, None]  # the previous call's (input, linear)

    def add(name: str, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        if name not in head:
            prev_x, prev = last
            shared = prev is not None and layer_of[prev] == layer_of[name] and _same_tensor(x, prev_x)
            head[name] = head[prev] if shared else name
            stats[name] = stats[head[name]] if shared else ActStats()
        last[0], last[1] = x, name
        if head[name] != name:
            return
        layer = layer_of[name]
        if layer not in gens:
            gens[layer] = torch.Generator().manual_seed(_layer_seed(seed, layer))
        stats[name].add(x, mask, grid, per_tensor, gens[layer])

    # the state first, then the hooks: they watch the simulated linears, as the engine's do
    # (``capture.linear_inputs`` hooks the modules before applying its state)
    handle = apply_state(model, state)
    try:
        with watch_inputs(model, list(layer_of), add) as tokens:
            run_batches(model, batches, tokens)
    finally:
        handle.restore()
        last[0] = last[1] = None
    missing = set(layer_of) - set(stats)
    if missing:
        raise RuntimeError(f"linears never called during calibration: {sorted(missing)[:5]}")
    return stats


# ---- the searchable layer ---------------------------------------------------------------------

def _same_act(a: ActQuant, b: ActQuant) -> bool:
    return a is b or (a.scale is None and b.scale is None and a.to_meta() == b.to_meta())


class ActCache:
    """Quantize a tensor once when several linears read it with the same quantizer (q/k/v,
    gate/up): the result is identical, only computed once. Holds the last input, so its id
    cannot be reused while cached."""

    def __init__(self, fn=None):
        self.fn = fn or quantize_activation
        self.key: tuple | None = None
        self.value: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, act: ActQuant) -> torch.Tensor:
        if self.key is not None and self.key[0] is x and _same_act(self.key[1], act):
            return self.value
        self.value = self.fn(x, act)
        self.key = (x, act)
        return self.value

    def clear(self) -> None:
        self.key = self.value = None


class SearchLinear(nn.Module):
    """Stands in for an ``nn.Linear`` during the search and computes what ``FakeQuantLinear``
    will compute for the current percentiles (same quantizer functions, same order)."""

    def __init__(self, linear: nn.Linear, qcfg: QuantConfig, grid: Sequence[float],
                 cache: ActCache | None = None, search_weights: bool = False):
        super().__init__()
        self.linear = linear
        self.cache = cache or ActCache()
        self.qcfg = qcfg
        self.search_weights = search_weights
        self.ratios = weight_clip_ratios(linear.weight, qcfg.w_group_size, grid) \
            if qcfg.quantizes_weights and search_weights else {}
        self.p_w = 1.0
        self.act: ActQuant | None = None
        self._dq: dict[float, torch.Tensor] = {}

    def _clip(self, p: float):
        """The weight clip ``linear_from_weight`` gets: the config's (RTN) unless weights are searched."""
        return self.qcfg.w_clip * self.ratios[p] if self.search_weights else None

    def weight_for(self, p: float) -> torch.Tensor:
        if not self.qcfg.quantizes_weights:
            return self.linear.weight
        if p not in self._dq:
            w = self.linear.weight
            clip = self._clip(p)
            codes, scale, zero = rtn_weight(w.detach().float(), self.qcfg.w_bits, self.qcfg.w_sym,
                                            self.qcfg.w_group_size,
                                            self.qcfg.w_clip if clip is None else clip)
            self._dq[p] = dequantize_weight(codes, scale, zero).to(w.dtype)
        return self._dq[p]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = self.cache(x, self.act)
        return F.linear(x, self.weight_for(self.p_w), self.linear.bias)

    def state_entry(self) -> LinearQuant:
        clip = self._clip(self.p_w) if self.qcfg.quantizes_weights else None
        return linear_from_weight(self.linear.weight, self.qcfg, clip_ratio=clip, act=self.act)


@dataclass
class QuantizerGroup:
    """One quantizer group: an activation tensor and the linears (paths inside the layer) reading it."""

    linears: list[str]
    stats: ActStats = field(default_factory=ActStats)
    p_a: float = 1.0
    p_w: float = 1.0

    @property
    def name(self) -> str:
        return "+".join(self.linears)


def _split(name: str) -> tuple[str, str]:
    parent, _, child = name.rpartition(".")
    return parent, child


class SearchLayer:
    """A transformer layer prepared for the search: its quantizer groups and float targets."""

    def __init__(self, layer: nn.Module, qcfg: QuantConfig, grid: Sequence[float],
                 linear_names: Sequence[str], coordinates: str = "layer",
                 search_weights: bool = False):
        if coordinates not in COORDINATES:
            raise ValueError(f"coordinates must be one of {COORDINATES}, got {coordinates!r}")
        self.coordinates = coordinates
        self.search_weights = search_weights
        self.layer = layer
        self.qcfg = qcfg
        self.grid = tuple(grid)
        self.linear_names = list(linear_names)  # local paths of the linears to quantize
        self.groups: list[QuantizerGroup] = []
        self.swapped: dict[str, SearchLinear] = {}
        self.cache = ActCache()

    # -- float pass: targets, groups, activation statistics
    @torch.no_grad()
    def probe(self, calls: Sequence[LayerCall], hidden: Sequence[torch.Tensor],
              masks: Sequence[torch.Tensor | None], seed: int,
              stats: dict[str, ActStats] | None = None) -> list[torch.Tensor]:
        """Float pass: the layer's outputs (the targets) and its quantizer groups. The groups'
        activation statistics are ``stats`` (local linear path -> ``ActStats``, from
        ``stream_stats``) when given, else taken here from the float inputs ``hidden``."""
        seen: list[tuple[str, torch.Tensor]] = []
        gen = torch.Generator().manual_seed(seed)
        per_tensor = self.qcfg.quantizes_acts and self.qcfg.a_granularity == "per_tensor"
        collect = self.qcfg.quantizes_acts and stats is None
        outs = []
        with watch_inputs(self.layer, self.linear_names, lambda n, x, _m: seen.append((n, x))):
            for call, h, mask in zip(calls, hidden, masks):
                seen.clear()
                outs.append(layer_output(self.layer, call.with_hidden(h)))
                if not self.groups:
                    self.groups = [QuantizerGroup(names) for names in shared_input_sets(seen)]
                if collect:
                    first = {n: x for n, x in reversed(seen)}
                    for g in self.groups:
                        g.stats.add(first[g.linears[0]], mask, self.grid, per_tensor, gen)
        seen.clear()
        missing = set(self.linear_names) - {n for g in self.groups for n in g.linears}
        if missing:
            raise RuntimeError(f"linears never called during calibration: {sorted(missing)}")
        if stats is not None and self.qcfg.quantizes_acts:
            for g in self.groups:
                given = {id(stats[n]) for n in g.linears if n in stats}
                if len(given) != 1 or any(n not in stats for n in g.linears):
                    raise RuntimeError(f"the statistics' stream does not group {g.linears} as the "
                                       f"float layer does")
                g.stats = stats[g.linears[0]]
        return outs

    def swap_in(self) -> None:
        for name in self.linear_names:
            parent, child = _split(name)
            owner = self.layer.get_submodule(parent) if parent else self.layer
            sl = SearchLinear(getattr(owner, child), self.qcfg, self.grid, self.cache,
                              self.search_weights)
            setattr(owner, child, sl)
            self.swapped[name] = sl
        self.set(self.groups, "a", 1.0)
        self.set(self.groups, "w", 1.0)

    def swap_out(self) -> None:
        for name, sl in self.swapped.items():
            parent, child = _split(name)
            owner = self.layer.get_submodule(parent) if parent else self.layer
            setattr(owner, child, sl.linear)
        self.swapped = {}
        self.cache.clear()

    def coords(self) -> list[tuple[list[QuantizerGroup], str]]:
        """Search coordinates: ``(groups sharing the value, "a" | "w")`` in forward order."""
        units = [[g] for g in self.groups] if self.coordinates == "group" else [list(self.groups)]
        out = []
        for unit in units:
            if self.qcfg.quantizes_acts:
                out.append((unit, "a"))
            if self.qcfg.quantizes_weights and self.search_weights:
                out.append((unit, "w"))
        return out

    def set(self, unit: list[QuantizerGroup], kind: str, p: float) -> None:
        for g in unit:
            if kind == "a":
                g.p_a = p
                act = g.stats.quantizer(self.qcfg, p) if self.qcfg.quantizes_acts else None
                for n in g.linears:
                    self.swapped[n].act = act
            else:
                g.p_w = p
                for n in g.linears:
                    self.swapped[n].p_w = p

    @staticmethod
    def get(unit: list[QuantizerGroup], kind: str) -> float:
        return unit[0].p_a if kind == "a" else unit[0].p_w


# ---- the objective -------------------------------------------------------------------------------

def output_error(outs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                 masks: Sequence[torch.Tensor | None]) -> float:
    """Mean squared error over the real tokens' channels, in the outputs' precision (≥ float32)."""
    num, den = 0.0, 0
    for o, t, m in zip(outs, targets, masks):
        se = (wide(o) - wide(t)).pow(2).sum(dim=-1)
        if m is not None and m.shape == se.shape:
            m = m.to(se.device, se.dtype)
            num += float((se * m).sum())
            den += int(m.sum()) * o.shape[-1]
        else:
            num += float(se.sum())
            den += se.numel() * o.shape[-1]
    return num / max(den, 1)


# ---- joint search over a set of coordinates ------------------------------------------------------

@dataclass
class Coord:
    """One search coordinate: position ``d`` of its layer in the searched span, and what it sets."""

    d: int
    layer: SearchLayer
    unit: list[QuantizerGroup]
    kind: str

    def get(self) -> float:
        return SearchLayer.get(self.unit, self.kind)

    def set(self, p: float) -> None:
        self.layer.set(self.unit, self.kind, p)


class Span:
    """Consecutive searched layers with an input and a target: the objective and its search."""

    def __init__(self, sls: Sequence[SearchLayer], layers: Sequence[nn.Module],
                 calls: Sequence[LayerCall], hin: Sequence[torch.Tensor],
                 target: Sequence[torch.Tensor], masks: Sequence[torch.Tensor | None],
                 grid: Sequence[float], counter: dict):
        self.sls, self.layers, self.calls = list(sls), list(layers), list(calls)
        self.hin, self.target, self.masks = list(hin), list(target), list(masks)
        self.grid = tuple(grid)
        self.count = counter  # {"evaluations": objective evaluations, "layer_passes": layer forwards}
        self.coords = [Coord(d, sl, unit, kind) for d, sl in enumerate(self.sls)
                       for unit, kind in sl.coords()]

    # -- objective
    def layer(self, d: int, hid: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        self.count["layer_passes"] += 1
        return [layer_output(self.layers[d], c.with_hidden(x)) for c, x in zip(self.calls, hid)]

    def run(self, d0: int, hid: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = list(hid)
        for d in range(d0, len(self.layers)):
            out = self.layer(d, out)
        return out

    def error(self, out: Sequence[torch.Tensor]) -> float:
        self.count["evaluations"] += 1
        return output_error(out, self.target, self.masks)

    def assignment(self) -> tuple[float, ...]:
        return tuple(c.get() for c in self.coords)

    def apply(self, values: Sequence[float]) -> None:
        for c, p in zip(self.coords, values):
            c.set(p)

    def evaluate(self, values: Sequence[float]) -> float:
        self.apply(values)
        return self.error(self.run(0, self.hin))

    def combinations(self) -> int:
        return len(self.grid) ** len(self.coords)

    # -- exhaustive, as a tree over the layers
    def exhaustive(self, incumbents: Sequence[tuple[str, tuple]]) -> dict:
        """Every combination, each layer's output computed once per prefix of choices."""
        by_layer = [[c for c in self.coords if c.d == d] for d in range(len(self.layers))]
        leaves: list[tuple[tuple, float]] = []

        def rec(d: int, hid: list[torch.Tensor], prefix: tuple) -> None:
            cs = by_layer[d]
            for combo in itertools.product(self.grid, repeat=len(cs)):
                for c, p in zip(cs, combo):
                    c.set(p)
                out = self.layer(d, hid)
                if d + 1 == len(self.layers):
                    leaves.append((prefix + combo, self.error(out)))
                else:
                    rec(d + 1, out, prefix + combo)

        rec(0, self.hin, ())
        errs = dict(leaves)
        cands = [(name, v, errs[tuple(v)]) for name, v in incumbents] + \
                [("grid", v, e) for v, e in leaves]
        i = stable_argmin([e for _, _, e in cands])
        name, best, err = cands[i]
        self.apply(best)
        others = [e for v, e in leaves if tuple(v) != tuple(best)]
        return {"search": "exhaustive", "combinations": len(leaves), "values": tuple(best),
                "error": err, "winner": name,
                # how close the rest of the grid came (the best combination that lost)
                "runner_up_error": min(others) if others else None}

    # -- coordinate descent to a fixed point from several starts
    def descent(self, start: Sequence[float]) -> tuple[tuple, float, int, bool]:
        """Iterated coordinate descent from ``start``: ``(values, error, sweeps, converged)``."""
        self.apply(start)
        n = len(self.layers)
        outs: list[list[torch.Tensor] | None] = [None] * n  # layer outputs, current assignment

        def input_of(d: int) -> list[torch.Tensor]:
            if d == 0:
                return self.hin
            if outs[d - 1] is None:
                outs[d - 1] = self.layer(d - 1, input_of(d - 1))
            return outs[d - 1]

        err = self.error(self.run(0, self.hin))
        sweeps, converged = 0, False
        while sweeps < MAX_SWEEPS:
            sweeps += 1
            moved = False
            for c in self.coords:
                hid = input_of(c.d)
                cur = c.get()
                errs, mine = [], {}
                for p in self.grid:
                    if p == cur:
                        errs.append(err)
                        continue
                    c.set(p)
                    mine[p] = self.layer(c.d, hid)
                    errs.append(self.error(self.run(c.d + 1, mine[p])))
                i = stable_argmin(errs)
                if self.grid[i] != cur and improves(errs[i], err):
                    c.set(self.grid[i])
                    err = errs[i]
                    moved = True
                    outs[c.d] = mine[self.grid[i]]
                    for k in range(c.d + 1, n):
                        outs[k] = None
                else:
                    c.set(cur)
            if not moved:
                converged = True
                break
        return self.assignment(), err, sweeps, converged

    def search(self, incumbents: Sequence[tuple[str, tuple]], exhaustive_max: int) -> dict:
        """Exhaustive if small enough, else descent from the incumbents, all-unclipped and the
        best uniform assignment. Leaves the winner applied; returns what happened."""
        if not self.coords:
            return {"search": "none", "values": (), "error": self.evaluate(()), "winner": "rtn"}
        if self.combinations() <= exhaustive_max:
            return self.exhaustive(incumbents)
        k = len(self.coords)
        uniform = [(p, self.evaluate((p,) * k)) for p in self.grid]
        best_uniform = uniform[stable_argmin([e for _, e in uniform])][0]
        starts: list[tuple[str, tuple]] = []
        for name, v in list(incumbents) + [("unclipped", (self.grid[0],) * k),
                                           ("uniform", (best_uniform,) * k)]:
            if all(tuple(v) != s for _, s in starts):
                starts.append((name, tuple(v)))
        runs = []
        for name, v in starts:
            values, err, sweeps, conv = self.descent(v)
            runs.append({"start": name, "error": err, "sweeps": sweeps, "converged": conv,
                         "values": values})
        i = stable_argmin([r["error"] for r in runs])
        self.apply(runs[i]["values"])
        return {"search": "descent", "values": runs[i]["values"], "error": runs[i]["error"],
                "winner": runs[i]["start"],
                "starts": [{k_: r[k_] for k_ in ("start", "error", "sweeps", "converged")}
                           for r in runs]}


# ---- one block ---------------------------------------------------------------------------------

@dataclass
class BlockResult:
    layers: list[int]
    q_out: list[torch.Tensor]
    f_out: list[torch.Tensor]
    layerwise_error: float
    block_error: float
    evaluations: int
    entries: dict[str, LinearQuant]  # local "layer_index.linear_path" -> entry
    percentiles: dict[int, dict[str, dict[str, float]]]  # layer -> group -> {"a", "w"}
    layer_passes: int = 0
    search: dict = field(default_factory=dict)  # how the block's joint search went


@torch.no_grad()
def search_block(layers: Sequence[nn.Module], indices: Sequence[int], calls: Sequence[LayerCall],
                 q_in: Sequence[torch.Tensor], f_in: Sequence[torch.Tensor],
                 masks: Sequence[torch.Tensor | None], qcfg: QuantConfig,
                 linear_names: Sequence[Sequence[str]], grid: Sequence[float] = DEFAULT_GRID,
                 joint: bool = True, seed: int = 0, coordinates: str = "layer",
                 eval_batches: int | None = None, search_weights: bool = False,
                 exhaustive_max: int = EXHAUSTIVE_MAX,
                 act_stats: Sequence[dict[str, ActStats]] | None = None) -> BlockResult:
    """Search one block of consecutive layers (see the module doc).

    ``q_in``/``f_in``: the block's input in the quantized/float model, one tensor per batch.
    ``joint=False`` stops after the layer-wise solution (Eq. 2). ``eval_batches``: the objective
    uses the first that many batches (all when None); the activation statistics always use
    every batch. ``act_stats``: per layer, the activation statistics by local linear path
    (``stream_stats``); None: taken from the float stream ``f_in``. ``q_out`` covers the
    evaluated batches.
    """
    grid = unclipped_first(grid)
    sls = [SearchLayer(layer, qcfg, grid, names, coordinates, search_weights)
           for layer, names in zip(layers, linear_names)]
    f_outs: list[list[torch.Tensor]] = []
    h = list(f_in)
    for j, sl in enumerate(sls):
        h = sl.probe(calls, h, masks, _layer_seed(seed, indices[j]),
                     None if act_stats is None else act_stats[j])
        f_outs.append(h)
    k = len(calls) if not eval_batches else max(1, min(int(eval_batches), len(calls)))
    calls, q_in, masks = list(calls)[:k], list(q_in)[:k], list(masks)[:k]
    f_outs = [f[:k] for f in f_outs]
    count = {"evaluations": 0, "layer_passes": 0}
    info: dict = {}
    try:
        for sl in sls:
            sl.swap_in()
        # 1. layer-wise (Eq. 2): each layer against its own output, fed by the earlier ones
        hin = list(q_in)
        layerwise: list[float] = []
        per_layer = []
        for j, sl in enumerate(sls):
            span = Span([sl], [layers[j]], calls, hin, f_outs[j], masks, grid, count)
            res = span.search([], exhaustive_max)
            per_layer.append({k_: v for k_, v in res.items() if k_ != "values"})
            layerwise.extend(res["values"])
            hin = span.run(0, hin)
        layerwise_error = output_error(hin, f_outs[-1], masks)
        info["layerwise"] = per_layer
        err, q_out = layerwise_error, hin
        # 2. joint over the block (Eq. 3), the layer-wise solution as the incumbent
        if joint and len(sls) > 1:
            span = Span(sls, layers, calls, q_in, f_outs[-1], masks, grid, count)
            res = span.search([("layerwise", tuple(layerwise))], exhaustive_max)
            info["joint"] = {k_: v for k_, v in res.items() if k_ != "values"}
            err = res["error"]
            q_out = span.run(0, q_in)
        entries: dict[str, LinearQuant] = {}
        percentiles: dict[int, dict[str, dict[str, float]]] = {}
        for idx, sl in zip(indices, sls):
            for name, lin in sl.swapped.items():
                entries[f"{idx}.{name}"] = lin.state_entry()
            percentiles[idx] = {g.name: {"a": g.p_a, "w": g.p_w} for g in sl.groups}
    finally:
        for sl in sls:
            sl.swap_out()
    return BlockResult(layers=list(indices), q_out=q_out, f_out=f_outs[-1],
                       layerwise_error=layerwise_error, block_error=err,
                       evaluations=count["evaluations"], entries=entries, percentiles=percentiles,
                       layer_passes=count["layer_passes"], search=info)


def sequential_search(model: nn.Module, inputs, targets: dict[str, nn.Linear], qcfg: QuantConfig,
                      blocks: Sequence[Sequence[int]], grid: Sequence[float] = DEFAULT_GRID,
                      joint: bool = True, seed: int = 0, method: str = "qvlm",
                      coordinates: str = "layer", eval_batches: int | None = None,
                      search_weights: bool = False, exhaustive_max: int = EXHAUSTIVE_MAX,
                      on_block: Callable[[dict], None] | None = None,
                      act_stats: dict[str, ActStats] | None = None,
                      ) -> tuple[dict[str, LinearQuant], list[dict], dict]:
    """Search every block in order, each fed by the already-quantized previous blocks.

    Runs on the shared loop ``harness.quant.blockwise.run_blockwise`` (``inputs`` from its
    ``part_inputs``), which also propagates each searched block through the simulated model.
    ``act_stats``: activation statistics by model path (``stream_stats``); None: the float
    stream's. Returns ``(entries by model path, per-block summaries, percentiles by linear path)``.
    """
    from harness.quant.blockwise import run_blockwise

    summaries: list[dict] = []
    percentiles: dict[str, dict[str, float]] = {}

    def process(block):
        t0 = time.perf_counter()
        names = []
        for path in block.paths:
            names.append([n[len(path) + 1:] for n in targets if n.startswith(path + ".")])
        stats = None
        if act_stats is not None:
            stats = [{n[len(path) + 1:]: act_stats[n] for n in targets if n.startswith(path + ".")
                      and n in act_stats} for path in block.paths]
        res = search_block(block.layers, block.layer_ids, block.calls,
                           [c.hidden for c in block.calls], [c.hidden for c in block.float_calls],
                           block.masks, qcfg, names, grid, joint, seed, coordinates,
                           eval_batches, search_weights, exhaustive_max, stats)
        frag = block.fragment(method, qcfg)
        for key, lq in res.entries.items():
            i, _, local = key.partition(".")
            frag.linears[f"{inputs.path}.{i}.{local}"] = lq
        for i, groups in res.percentiles.items():
            for gname, ps in groups.items():
                for local in gname.split("+"):
                    percentiles[f"{inputs.path}.{i}.{local}"] = dict(ps)
        summary = {"layers": list(block.layer_ids), "layerwise_error": res.layerwise_error,
                   "block_error": res.block_error, "evaluations": res.evaluations,
                   "layer_passes": res.layer_passes, "search": res.search,
                   "seconds": round(time.perf_counter() - t0, 3),
                   "percentiles": {str(i): g for i, g in res.percentiles.items()}}
        summaries.append(summary)
        if on_block is not None:
            on_block(summary)
        return frag

    merged = run_blockwise(model, inputs, process, blocks=[list(b) for b in blocks],
                           propagate="quantized", track_float=True)
    return dict(merged.linears), summaries, percentiles
