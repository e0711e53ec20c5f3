"""Clipping-percentile search, layer-wise (paper Eq. 2) and block-wise (Eq. 3): Q-VLM §2.

What is searched: for every *quantizer group* of a transformer layer — one activation tensor and
the linear layers that read it (Llama: q/k/v, o, gate/up, down; found by watching which linears
receive the same tensor object) — an activation clipping percentile and a weight clipping
percentile, each from ``grid`` (default 1.0, 0.995, ..., 0.98). ``coordinates="layer"`` shares
one activation and one weight percentile among all groups of a layer (4x fewer evaluations on
Llama layers).

How a percentile becomes a quantizer (the core's ``clip_ratio`` form, so the simulated model
computes exactly what was searched):

* weights: per output channel (or group) ``clip = q_p(|w|) / max|w|``, passed as a tensor
  ``clip_ratio`` to ``linear_from_weight``;
* per-token activations: ``clip = mean over real calibration tokens of q_p(|x_t|) / max|x_t|``
  on the float model's inputs of the group, stored as ``ActQuant.clip_ratio``;
* per-tensor activations: the float calibration range ``[min, max]`` shrunk by
  ``q_p(|x|) / max|x|`` (quantile over up to 65536 sampled values per batch).

Both are multiplied by the config's ``w_clip`` / ``a_clip`` (1.0 by default), so p = 1.0
everywhere is exactly round-to-nearest.

Objective: mean squared error at the output of the layer (layer-wise) or block (block-wise) over
the real calibration tokens (of the first ``eval_batches`` batches when set, for speed), the quantized layers fed by the already-quantized previous blocks,
the target the float model's own activation there.

Search order (a coordinate search, since a full grid over a block's quantizers is exponential):

1. layer-wise initialization: layers in order, each layer's coordinates in forward order (per
   group: activation, then weight), each set to the grid value minimizing the layer's own output
   error with the earlier coordinates fixed; this *is* the layer-wise method's solution;
2. block-wise (blocks of more than one layer): ``passes`` sweeps over all coordinates of the block
   in the same order, each set to the grid value minimizing the *block* output error. A value
   replaces the current one only when it is strictly better, so the block error never exceeds
   the layer-wise solution's on the same inputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from harness.models.capture import LayerCall, layer_output
from harness.quant.build import act_quantizer, linear_from_weight
from harness.quant.config import QuantConfig
from harness.quant.quantizer import dequantize_weight, qparams, rtn_weight
from harness.quant.simulated import quantize_activation
from harness.quant.state import ActQuant, LinearQuant

DEFAULT_GRID = (1.0, 0.995, 0.99, 0.985, 0.98)
COORDINATES = ("group", "layer")
PER_TENSOR_SAMPLES = 65536


# ---- percentiles -> clip ratios ------------------------------------------------------------------

def _quantile_index(n: int, p: float) -> int:
    return min(n - 1, max(0, int(round(p * (n - 1)))))


def upper_quantiles(x: torch.Tensor, grid: Sequence[float]) -> tuple[torch.Tensor, dict[float, torch.Tensor]]:
    """``(max, {p: q_p})`` of ``x`` along the last dim (kept), for percentiles near 1.

    Uses ``topk`` of the few largest values instead of a full sort; ``q_p`` is the order
    statistic at index ``round(p * (n - 1))`` of the ascending order.
    """
    n = x.shape[-1]
    idx = {p: _quantile_index(n, p) for p in grid}
    k = n - min(idx.values())
    top = x.topk(k, dim=-1).values  # descending
    return top[..., :1], {p: top[..., n - 1 - i:n - i] for p, i in idx.items()}


def weight_clip_ratios(weight: torch.Tensor, group_size: int | None,
                       grid: Sequence[float]) -> dict[float, torch.Tensor]:
    """Per group ``q_p(|w|) / max|w|`` as ``[out, n_groups, 1]`` tensors (1.0 at p = 1)."""
    out_f, in_f = weight.shape
    gs = in_f if group_size is None or group_size <= 0 or group_size >= in_f else group_size
    mx, q = upper_quantiles(weight.detach().float().abs().reshape(out_f, in_f // gs, gs), grid)
    mx = mx.clamp_min(1e-12)
    return {p: torch.ones_like(mx) if p >= 1.0 else q[p] / mx for p in grid}


@dataclass
class ActStats:
    """Calibration statistics of one activation tensor, enough to map percentiles to quantizers."""

    ratio_sum: dict[float, float] = field(default_factory=dict)
    tokens: int = 0
    lo: float = float("inf")
    hi: float = float("-inf")
    samples: list[torch.Tensor] = field(default_factory=list)

    def add(self, x: torch.Tensor, mask: torch.Tensor | None, grid: Sequence[float],
            per_tensor: bool, gen: torch.Generator) -> None:
        rows = x.detach().reshape(-1, x.shape[-1])
        if mask is not None and mask.numel() == rows.shape[0]:
            rows = rows[mask.reshape(-1).to(rows.device).bool()]
        if rows.shape[0] == 0:
            return
        rows = rows.float()
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
        """The activation quantizer for percentile ``p`` (the config's bits, symmetry, granularity)."""
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
            ratio = float(vals[_quantile_index(vals.numel(), p)]) / max(abs(self.lo), abs(self.hi), 1e-12)
        act.clip_ratio = float(qcfg.a_clip * ratio)
        span = torch.tensor([self.lo, self.hi], dtype=torch.float32)
        act.scale, act.zero = qparams(span, act.bits, act.sym, act.clip_ratio, dim=0)
        return act


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
                 cache: ActCache | None = None):
        super().__init__()
        self.linear = linear
        self.cache = cache or ActCache()
        self.qcfg = qcfg
        self.ratios = weight_clip_ratios(linear.weight, qcfg.w_group_size, grid) \
            if qcfg.quantizes_weights else {}
        self.p_w = 1.0
        self.act: ActQuant | None = None
        self._dq: dict[float, torch.Tensor] = {}

    def weight_for(self, p: float) -> torch.Tensor:
        if not self.qcfg.quantizes_weights:
            return self.linear.weight
        if p not in self._dq:
            w = self.linear.weight
            codes, scale, zero = rtn_weight(w.detach().float(), self.qcfg.w_bits, self.qcfg.w_sym,
                                            self.qcfg.w_group_size, self.qcfg.w_clip * self.ratios[p])
            self._dq[p] = dequantize_weight(codes, scale, zero).to(w.dtype)
        return self._dq[p]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = self.cache(x, self.act)
        return F.linear(x, self.weight_for(self.p_w), self.linear.bias)

    def state_entry(self) -> LinearQuant:
        ratio = self.ratios.get(self.p_w) if self.qcfg.quantizes_weights else None
        clip = None if ratio is None else self.qcfg.w_clip * ratio
        return linear_from_weight(self.linear.weight, self.qcfg, clip_ratio=clip, act=self.act)


@dataclass
class Group:
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
                 linear_names: Sequence[str], coordinates: str = "group"):
        if coordinates not in COORDINATES:
            raise ValueError(f"coordinates must be one of {COORDINATES}, got {coordinates!r}")
        self.coordinates = coordinates
        self.layer = layer
        self.qcfg = qcfg
        self.grid = tuple(grid)
        self.linear_names = list(linear_names)  # local paths of the linears to quantize
        self.groups: list[Group] = []
        self.swapped: dict[str, SearchLinear] = {}
        self.cache = ActCache()

    # -- float pass: targets, groups, activation statistics
    @torch.no_grad()
    def probe(self, calls: Sequence[LayerCall], hidden: Sequence[torch.Tensor],
              masks: Sequence[torch.Tensor | None], seed: int) -> list[torch.Tensor]:
        seen: list[tuple[str, torch.Tensor]] = []
        handles = []
        for name in self.linear_names:
            mod = self.layer.get_submodule(name)
            handles.append(mod.register_forward_pre_hook(
                lambda _m, args, _n=name: seen.append((_n, args[0]))))
        gen = torch.Generator().manual_seed(seed)
        per_tensor = self.qcfg.quantizes_acts and self.qcfg.a_granularity == "per_tensor"
        outs = []
        try:
            for call, h, mask in zip(calls, hidden, masks):
                seen.clear()
                outs.append(layer_output(self.layer, call.with_hidden(h)))
                if not self.groups:
                    for name, x in seen:
                        for g in self.groups:
                            if any(x is y for n, y in seen if n == g.linears[0]):
                                g.linears.append(name)
                                break
                        else:
                            self.groups.append(Group([name]))
                if self.qcfg.quantizes_acts:
                    first = {n: x for n, x in reversed(seen)}
                    for g in self.groups:
                        g.stats.add(first[g.linears[0]], mask, self.grid, per_tensor, gen)
        finally:
            for hd in handles:
                hd.remove()
            seen.clear()
        missing = set(self.linear_names) - {n for g in self.groups for n in g.linears}
        if missing:
            raise RuntimeError(f"linears never called during calibration: {sorted(missing)}")
        return outs

    def swap_in(self) -> None:
        for name in self.linear_names:
            parent, child = _split(name)
            owner = self.layer.get_submodule(parent) if parent else self.layer
            sl = SearchLinear(getattr(owner, child), self.qcfg, self.grid, self.cache)
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

    def coords(self) -> list[tuple[list[Group], str]]:
        """Search coordinates: ``(groups sharing the value, "a" | "w")`` in forward order."""
        units = [[g] for g in self.groups] if self.coordinates == "group" else [list(self.groups)]
        out = []
        for unit in units:
            if self.qcfg.quantizes_acts:
                out.append((unit, "a"))
            if self.qcfg.quantizes_weights:
                out.append((unit, "w"))
        return out

    def set(self, unit: list[Group], kind: str, p: float) -> None:
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
    def get(unit: list[Group], kind: str) -> float:
        return unit[0].p_a if kind == "a" else unit[0].p_w


# ---- the search ----------------------------------------------------------------------------------

def output_error(outs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                 masks: Sequence[torch.Tensor | None]) -> float:
    """Mean squared error over the real tokens' channels."""
    num, den = 0.0, 0
    for o, t, m in zip(outs, targets, masks):
        se = (o.float() - t.float()).pow(2).sum(dim=-1)
        if m is not None and m.shape == se.shape:
            m = m.to(se.device).float()
            num += float((se * m).sum())
            den += int(m.sum()) * o.shape[-1]
        else:
            num += float(se.sum())
            den += se.numel() * o.shape[-1]
    return num / max(den, 1)


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


@torch.no_grad()
def search_block(layers: Sequence[nn.Module], indices: Sequence[int], calls: Sequence[LayerCall],
                 q_in: Sequence[torch.Tensor], f_in: Sequence[torch.Tensor],
                 masks: Sequence[torch.Tensor | None], qcfg: QuantConfig,
                 linear_names: Sequence[Sequence[str]], grid: Sequence[float] = DEFAULT_GRID,
                 passes: int = 1, joint: bool = True, seed: int = 0, coordinates: str = "group",
                 eval_batches: int | None = None) -> BlockResult:
    """Search one block of consecutive layers (see the module doc for the order).

    ``q_in``/``f_in``: the block's input in the quantized/float model, one tensor per batch.
    ``joint=False`` stops after the layer-wise initialization (Eq. 2). ``coordinates``: "group"
    (a value per quantizer group) or "layer" (one activation and one weight value per layer).
    ``eval_batches``: the objective uses the first that many batches (all when None); the
    activation statistics always use every batch. ``q_out`` covers the evaluated batches.
    """
    grid = tuple(grid)
    if 1.0 not in grid:
        grid = (1.0,) + grid
    n = len(layers)
    sls = [SearchLayer(layer, qcfg, grid, names, coordinates)
           for layer, names in zip(layers, linear_names)]
    f_outs: list[list[torch.Tensor]] = []
    h = list(f_in)
    for j, sl in enumerate(sls):
        h = sl.probe(calls, h, masks, seed + 7919 * indices[j])
        f_outs.append(h)
    k = len(calls) if not eval_batches else max(1, min(int(eval_batches), len(calls)))
    calls, q_in, masks = list(calls)[:k], list(q_in)[:k], list(masks)[:k]
    f_outs = [f[:k] for f in f_outs]
    evals = 0

    def run(j0: int, hid: Sequence[torch.Tensor], j1: int) -> list[torch.Tensor]:
        out = list(hid)
        for j in range(j0, j1):
            out = [layer_output(layers[j], c.with_hidden(x)) for c, x in zip(calls, out)]
        return out

    def sweep(sl: SearchLayer, evaluate, err: float) -> float:
        nonlocal evals
        for g, kind in sl.coords():
            best_p = SearchLayer.get(g, kind)
            for p in grid:
                if p == best_p:
                    continue
                cur = SearchLayer.get(g, kind)
                sl.set(g, kind, p)
                e = evaluate()
                evals += 1
                if e < err:
                    err, best_p = e, p
                else:
                    sl.set(g, kind, cur)
            sl.set(g, kind, best_p)
        return err

    try:
        for sl in sls:
            sl.swap_in()
        # 1. layer-wise initialization (Eq. 2)
        prefix: list[list[torch.Tensor]] = []
        hin = list(q_in)
        for j, sl in enumerate(sls):
            def layer_err(j=j, hin=hin):
                return output_error(run(j, hin, j + 1), f_outs[j], masks)
            sweep(sl, layer_err, layer_err())
            evals += 1
            hin = run(j, hin, j + 1)
            prefix.append(hin)
        layerwise_error = output_error(prefix[-1], f_outs[-1], masks)
        err = layerwise_error
        # 2. block-wise coordinate passes (Eq. 3)
        if joint and n > 1:
            for _ in range(passes):
                before = err
                for j, sl in enumerate(sls):
                    start = list(q_in) if j == 0 else prefix[j - 1]

                    def block_err(j=j, start=start):
                        return output_error(run(j, start, n), f_outs[-1], masks)
                    err = sweep(sl, block_err, err)
                    prefix[j] = run(j, start, j + 1)  # later layers are swept after, in order
                if not err < before:
                    break
        entries: dict[str, LinearQuant] = {}
        percentiles: dict[int, dict[str, dict[str, float]]] = {}
        for idx, sl in zip(indices, sls):
            for name, lin in sl.swapped.items():
                entries[f"{idx}.{name}"] = lin.state_entry()
            percentiles[idx] = {g.name: {"a": g.p_a, "w": g.p_w} for g in sl.groups}
        q_out = prefix[-1]
    finally:
        for sl in sls:
            sl.swap_out()
    return BlockResult(layers=list(indices), q_out=q_out, f_out=f_outs[-1],
                       layerwise_error=layerwise_error, block_error=err, evaluations=evals,
                       entries=entries, percentiles=percentiles)


def sequential_search(model: nn.Module, inputs, targets: dict[str, nn.Linear], qcfg: QuantConfig,
                      blocks: Sequence[Sequence[int]], grid: Sequence[float] = DEFAULT_GRID,
                      passes: int = 1, joint: bool = True, seed: int = 0,
                      method: str = "qvlm", coordinates: str = "group",
                      eval_batches: int | None = None) -> tuple[dict[str, LinearQuant], list[dict], dict]:
    """Search every block in order, each fed by the already-quantized previous blocks.

    Runs on the shared loop ``harness.quant.blockwise.run_blockwise`` (``inputs`` from its
    ``part_inputs``), which also propagates each searched block through the simulated model.
    Returns ``(entries by model path, per-block summaries, percentiles by linear path)``.
    """
    from harness.quant.blockwise import run_blockwise

    summaries: list[dict] = []
    percentiles: dict[str, dict[str, float]] = {}

    def process(block):
        t0 = time.perf_counter()
        names = []
        for path in block.paths:
            names.append([n[len(path) + 1:] for n in targets if n.startswith(path + ".")])
        res = search_block(block.layers, block.layer_ids, block.calls,
                           [c.hidden for c in block.calls], [c.hidden for c in block.float_calls],
                           block.masks, qcfg, names, grid, passes, joint, seed, coordinates,
                           eval_batches)
        frag = block.fragment(method, qcfg)
        for key, lq in res.entries.items():
            i, _, local = key.partition(".")
            frag.linears[f"{inputs.path}.{i}.{local}"] = lq
        for i, groups in res.percentiles.items():
            for gname, ps in groups.items():
                for local in gname.split("+"):
                    percentiles[f"{inputs.path}.{i}.{local}"] = dict(ps)
        summaries.append({"layers": list(block.layer_ids), "layerwise_error": res.layerwise_error,
                          "block_error": res.block_error, "evaluations": res.evaluations,
                          "seconds": round(time.perf_counter() - t0, 3),
                          "percentiles": {str(i): g for i, g in res.percentiles.items()}})
        return frag

    merged = run_blockwise(model, inputs, process, blocks=[list(b) for b in blocks],
                           propagate="quantized", track_float=True)
    return dict(merged.linears), summaries, percentiles
