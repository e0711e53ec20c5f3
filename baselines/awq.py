"""AWQ (Lin et al., 2023): activation-aware per-channel weight scaling, then weight clipping.

Per transformer layer, following mit-han-lab/llm-awq and AutoAWQ (0.2.x):

1. The inputs of every linear and of the modules inspected below are captured from one float
   forward pass of the layer (the layer's inputs come from the float model by default,
   ``propagate="float"``, as in both reference implementations).
2. Scale search per module group: ``s = mean|x|^α`` over real tokens (``duo_scaling`` divides by
   ``w_mean^(1-α)`` as AutoAWQ's default does), normalised by ``sqrt(max s · min s)``, for
   ``α = i / n_grid``, ``i = 0 … n_grid-1`` (AutoAWQ's grid: 0, 0.05, …, 0.95); the α with the
   least mean squared output error of the inspected module, computed with ``Q(W·s)/s`` for the
   group's weights, wins. Groups for Llama layers: q/k/v after ``input_layernorm`` (inspect the
   attention), o after v (only when v's outputs match o's inputs: no GQA), gate/up after
   ``post_attention_layernorm`` (inspect the MLP), down after up. For CLIP vision layers: q/k/v
   after ``layer_norm1``, out_proj after v_proj, fc1 after ``layer_norm2``; fc2 follows
   quick_gelu, through which no scale can be folded, so it is only clipped. All groups of a
   layer are searched on the float layer and its float inputs, then applied together.
3. Folding: the preceding norm's weight (and bias) or the preceding linear's output rows (and
   bias) are divided by ``s``, the group's weight columns multiplied by it. Changed norm
   weights and biases are stored in ``QuantState.float_params``; the scaled weights are what
   get quantized into codes.
4. Clipping search per linear except q/k (AutoAWQ's rule: their errors go through the q·k
   product): per output row and group, ``max|w|`` shrunk by ``1 - i/n_grid`` for
   ``i < max_shrink · n_grid``, minimizing the group's output error on up to ``clip_n_tokens``
   sampled (scaled) input tokens; the weight is clamped to the best range, then rounded.

Activations (A<16), ``act_aware=True`` by default: scaling moves quantization difficulty from
weights onto activations (``x/s`` is what the activation quantizer sees), so a search that
ignores the activation quantizer can pick scales that are good for weights and bad for the
layer. With it on, the scale search evaluates ``Q_a(x/s) · Q(W·s)ᵀ`` (the deployed computation)
and the clip search uses ``Q_a(x/s)`` as inputs. Per-tensor static activation ranges are
approximated during the search by each batch's range; the final static ranges are set by the
engine's rule shared by every method (``harness.quant.ranges``: from the model as the state
leaves it, so they see the scaled inputs). ``state.meta["act_aware"]`` records whether it was in
effect.

Projector and lm_head linears (when ``parts`` asks for them) have no foldable predecessor: they
get the clipping search alone, on inputs from a full forward pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn
from torch.func import functional_call

from harness.models.capture import LayerCall, layer_output
from harness.models.family import ScaleGroup, scale_groups_of
from harness.models.layers import part_of
from harness.quant.blockwise import Block, part_inputs, run_blockwise
from harness.quant.capture import linear_inputs, token_rows, watch_inputs
from harness.quant.build import act_quantizer, linear_from_weight, target_linears
from harness.quant.config import QuantConfig
from harness.quant.quantizer import dequantize_weight, fake_quant, qparams, rtn_weight
from harness.quant.simulated import quantize_activation
from harness.quant.state import ActQuant, QuantState
from harness.quant.transforms import FloatEdit
from harness.quant.ties import RTOL, improves
from harness.registry import Method, register_method

AVOID_CLIP = ("q_", "k_", "query", "key", "Wqkv")

# The scale search's error for one call: ``error(i, float_out, candidate_out) -> (num, den)``, i the
# call's index; the loss of a candidate is ``Σ num / Σ den`` over the calls. ``None``: AWQ's mean
# squared error over real tokens (``_masked_sq``). MBQ passes modality-weighted errors.
ScaleError = Callable[[int, torch.Tensor, torch.Tensor], tuple[float, float]]


# ---- small pieces -------------------------------------------------------------------------------

def pseudo_quant(w: torch.Tensor, qcfg: QuantConfig) -> torch.Tensor:
    """``dequant(quant(w))`` with the scheme's weight quantizer (identity at 16 bits)."""
    if not qcfg.quantizes_weights:
        return w
    codes, scale, zero = rtn_weight(w, qcfg.w_bits, qcfg.w_sym, qcfg.w_group_size, qcfg.w_clip)
    return dequantize_weight(codes, scale, zero).to(w.dtype)


def act_fake(x: torch.Tensor, act: ActQuant) -> torch.Tensor:
    """The activation quantizer as used inside the searches (static per-tensor: this batch's range)."""
    if act.granularity == "per_token" or act.scale is not None:
        return quantize_activation(x, act)
    return fake_quant(x.reshape(1, -1), act.bits, act.sym, act.clip_ratio, dim=-1).reshape(x.shape)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _masked_sq(a: torch.Tensor, b: torch.Tensor, mask) -> tuple[float, int]:
    d = token_rows((a - b).float(), mask)
    return float(d.pow(2).sum()), d.numel()


def _sample_rows(xs: list[torch.Tensor], masks, n_tokens: int) -> torch.Tensor:
    """Every ``step``-th real token over the concatenation of ``xs`` (AutoAWQ's sampling)."""
    rows = [token_rows(x, m) for x, m in zip(xs, masks)]
    total = sum(r.shape[0] for r in rows)
    step = max(1, total // n_tokens)
    out, offset = [], 0
    for r in rows:
        first = (-offset) % step
        out.append(r[first::step])
        offset += r.shape[0]
    return torch.cat(out, 0)


def search_clip(w: torch.Tensor, x: torch.Tensor, qcfg: QuantConfig, n_grid: int = 20,
                max_shrink: float = 0.5, row_chunk: int = 1024) -> torch.Tensor:
    """Best ``max|w|`` per (row, group) ``[out, n_groups]`` for inputs ``x`` [tokens, in]."""
    out_f, in_f = w.shape
    gs = qcfg.w_group_size if qcfg.w_group_size and qcfg.w_group_size < in_f else in_f
    ng = in_f // gs
    xg = x.float().reshape(-1, ng, gs).transpose(0, 1)  # [ng, T, gs]
    best_all = []
    for r0 in range(0, out_f, row_chunk):
        wc = w[r0:r0 + row_chunk].float().reshape(-1, ng, gs)  # [co, ng, gs]
        org_max = wc.abs().amax(dim=-1, keepdim=True)  # [co, ng, 1]
        best = org_max.clone()
        min_err = torch.full_like(org_max, float("inf"))
        wt = wc.transpose(0, 1)  # [ng, co, gs]
        org_out = torch.bmm(xg, wt.transpose(1, 2))  # [ng, T, co]
        for i_s in range(int(max_shrink * n_grid)):
            max_val = org_max * (1 - i_s / n_grid)
            cur = torch.clamp(wc, -max_val, max_val)
            s, z = qparams(cur, qcfg.w_bits, qcfg.w_sym, qcfg.w_clip, dim=-1)
            q = torch.clamp(torch.round(cur / s) + z, 0, 2 ** qcfg.w_bits - 1)
            qw = ((q - z) * s).transpose(0, 1)  # [ng, co, gs]
            cur_out = torch.bmm(xg, qw.transpose(1, 2))
            err = (cur_out - org_out).pow(2).mean(dim=1).transpose(0, 1).unsqueeze(-1)  # [co, ng, 1]
            better = err < min_err * (1 - RTOL)  # harness.quant.ties: earlier (less clipping) wins near-ties
            min_err = torch.where(better, err, min_err)
            best = torch.where(better, max_val, best)
        best_all.append(best.squeeze(-1))
    return torch.cat(best_all, 0)


def apply_clip(w: torch.Tensor, max_val: torch.Tensor) -> torch.Tensor:
    out_f, in_f = w.shape
    ng = max_val.shape[1]
    mv = max_val.to(w.dtype).unsqueeze(-1)
    return torch.clamp(w.reshape(out_f, ng, -1), -mv, mv).reshape(out_f, in_f)


# ---- one layer ----------------------------------------------------------------------------------

def _capture(layer: nn.Module, calls: list[LayerCall], linears: list[str], modules: list[str]):
    lin_in: dict[str, list] = {n: [] for n in linears}
    mod_calls: dict[str, list] = {m: [] for m in modules}
    handles = [layer.get_submodule(m).register_forward_pre_hook(
        lambda _m, args, kwargs, _n=m: mod_calls[_n].append((tuple(args), dict(kwargs))),
        with_kwargs=True) for m in modules]
    try:
        with torch.no_grad(), watch_inputs(layer, linears, lambda n, x, _m: lin_in[n].append(x)):
            for c in calls:
                layer_output(layer, c)
    finally:
        for h in handles:
            h.remove()
    return lin_in, mod_calls


def _group_scales(x_mean, w_mean, ratio, duo):
    if duo:
        scales = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    else:
        scales = x_mean.pow(ratio).clamp(min=1e-4).view(-1)
    scales = scales / (scales.max() * scales.min()).sqrt()
    scales[torch.isinf(scales)] = 1
    scales[torch.isnan(scales)] = 1
    return scales


def search_scale(layer: nn.Module, group: ScaleGroup, lin_in, mod_calls, masks, qcfg: QuantConfig,
                 opts: dict, act: ActQuant | None,
                 error: ScaleError | None = None) -> tuple[torch.Tensor, float, list[float]]:
    """AWQ's grid search for one group: (best scales, best α, loss per α). ``error``: the
    output error per call (default: mean squared error over real tokens)."""
    xs = lin_in[group.linears[0]]
    lins = [layer.get_submodule(n) for n in group.linears]
    # per-channel mean |x| over real tokens (float32 sums, as AutoAWQ), back in the input dtype
    total = sum(token_rows(x, m).shape[0] for x, m in zip(xs, masks))
    x_sum = sum(token_rows(x, m).abs().float().sum(0) for x, m in zip(xs, masks))
    x_mean = (x_sum / total).to(xs[0].dtype)
    w_mean = None
    if opts["duo_scaling"]:
        weight = torch.cat([lin.weight for lin in lins], 0)
        gs = qcfg.w_group_size or weight.shape[1]
        wv = weight.reshape(-1, gs).abs()
        w_mean = (wv / (wv.amax(dim=1, keepdim=True) + 1e-6)).reshape(weight.shape).mean(0)
    if group.inspect is None:
        inspect = lins[0]
        prefix = ""
        runs = [((x,), {}) for x in xs]
    else:
        inspect = layer.get_submodule(group.inspect)
        prefix = group.inspect + "."
        runs = mod_calls[group.inspect]
    rel = [n[len(prefix):] + "." if prefix else "" for n in group.linears]
    with torch.no_grad():
        fp_out = [_first(inspect(*a, **k)) for a, k in runs]
    best, best_ratio, best_err, history = None, -1.0, float("inf"), []
    for i in range(opts["n_grid"]):
        ratio = i / opts["n_grid"]
        scales = _group_scales(x_mean, w_mean, ratio, opts["duo_scaling"])
        sv = scales.view(1, -1)
        overrides = {f"{r}weight": pseudo_quant(lin.weight * sv, qcfg) / sv for r, lin in zip(rel, lins)}
        handles = []
        if act is not None:
            for lin in lins:
                handles.append(lin.register_forward_pre_hook(
                    lambda _m, args, _s=sv: (act_fake(args[0] / _s, act) * _s,) + tuple(args[1:])))
        try:
            num, den = 0.0, 0
            with torch.no_grad():
                for i, ((a, k), ref, m) in enumerate(zip(runs, fp_out, masks)):
                    out = _first(functional_call(inspect, overrides, a, k))
                    s_num, s_den = _masked_sq(ref, out, m) if error is None else error(i, ref, out)
                    num += s_num
                    den += s_den
        finally:
            for h in handles:
                h.remove()
        loss = num / den
        history.append(loss)
        if improves(loss, best_err):  # near-ties keep the smaller α
            best_err, best_ratio, best = loss, ratio, scales.clone()
    if best is None:
        raise RuntimeError(f"AWQ scale search for {group.key} found no finite loss: {history}")
    return best.detach(), best_ratio, history


def awq_layer(layer: nn.Module, prefix: str, calls: list[LayerCall], masks, qcfg: QuantConfig,
              opts: dict, method: str = "awq",
              error_for: Callable[[ScaleGroup], ScaleError | None] | None = None) -> tuple[QuantState, dict]:
    """AWQ for one transformer layer: its fragment (full paths) and what was chosen.
    ``error_for(group)``: the scale search's error for a group (None: AWQ's)."""
    act = act_quantizer(qcfg) if (qcfg.quantizes_acts and opts["act_aware"]) else None
    groups = scale_groups_of(layer)
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    inspect = sorted({g.inspect for g in groups if g.inspect})
    lin_in, mod_calls = _capture(layer, calls, list(linears), inspect)
    info = {"ratio": {}, "scales": {}, "clip": {}}
    found = []
    for g in groups:
        error = error_for(g) if error_for is not None else None
        scales, ratio, _ = search_scale(layer, g, lin_in, mod_calls, masks, qcfg, opts, act, error)
        found.append((g, scales))
        info["ratio"][g.key] = ratio
        info["scales"][g.key] = scales.float().cpu()
    # fold all scales (a linear can be scaled on both sides: v by q/k/v's and o's scales)
    edit = FloatEdit(layer)
    x_div: dict[str, torch.Tensor] = {}
    for g, s in found:
        edit.scale_group("", g, s)
        for n in g.linears:
            x_div[n] = s
    new = edit.cast()
    # clipping on the scaled weights and inputs (x/s, through the act quantizer if act-aware)
    weights = {n: new.get(f"{n}.weight", lin.weight.detach()) for n, lin in linears.items()}
    if opts["apply_clip"] and qcfg.quantizes_weights:
        for n in linears:
            if any(a in n for a in AVOID_CLIP):
                continue
            xs = lin_in[n]
            if n in x_div:
                xs = [x / x_div[n].to(x.dtype) for x in xs]
            if act is not None:
                xs = [act_fake(x, act) for x in xs]
            sample = _sample_rows(xs, masks, opts["clip_n_tokens"])
            max_val = search_clip(weights[n], sample, qcfg, opts["clip_n_grid"], opts["clip_max_shrink"])
            info["clip"][n] = max_val.cpu()
            weights[n] = apply_clip(weights[n], max_val)
    frag = QuantState(method=method, config=qcfg)
    for n, lin in linears.items():
        # activation quantizers are set when quantize() ends (ranges: the engine's), so that
        # a quantized stream (propagate="quantized") carries quantized weights only
        lq = linear_from_weight(weights[n], qcfg)
        if lq.codes is None and f"{n}.weight" in new:
            lq.weight = weights[n].detach().cpu()
        frag.linears[f"{prefix}.{n}"] = lq
    for path, value in new.items():
        owner = path.rsplit(".", 1)[0]
        if owner in linears and path.endswith(".weight"):
            continue  # carried by the linear's codes (or float override)
        frag.float_params[f"{prefix}.{path}"] = value.detach().cpu()
    return frag, info


# ---- the method ---------------------------------------------------------------------------------

@register_method
class AWQ(Method):
    name = "awq"
    summary = "AWQ: activation-aware per-channel scaling folded into norms/linears, then clipping"
    needs_calibration = True

    @dataclass
    class Options:
        n_grid: int = 20
        duo_scaling: bool = False  # True: AutoAWQ's default s = x_mean^α / w_mean^(1-α)
        act_aware: bool = True  # with A<16, both searches include the activation quantizer
        apply_clip: bool = True
        clip_n_grid: int = 20
        clip_max_shrink: float = 0.5
        clip_n_tokens: int = 512
        propagate: Literal["float", "quantized"] = "float"  # layer inputs from the float model (llm-awq, AutoAWQ)

    def scale_error(self, part: str, path: str) -> Callable[[ScaleGroup], ScaleError | None] | None:
        """The scale search's error per group of the layer at ``path`` (None: AWQ's, for every
        layer). A subclass's hook: MBQ weights vision and text tokens here."""
        return None

    def _loose(self, model, names, batches, state, qcfg) -> None:
        """Projector / lm_head: clip search on inputs from a full forward, then round."""
        targets = {n: model.get_submodule(n) for n in names}
        rows: dict[str, list] = {n: [] for n in names}
        linear_inputs(model, names, batches, lambda n, x, m: rows[n].append((x, m)), state=state)
        act = act_quantizer(qcfg) if (qcfg.quantizes_acts and self.options["act_aware"]) else None
        for n in names:
            w = targets[n].weight.detach()
            if self.options["apply_clip"] and qcfg.quantizes_weights and rows[n]:
                xs = [x if act is None else act_fake(x, act) for x, _ in rows[n]]
                sample = _sample_rows(xs, [m for _, m in rows[n]], self.options["clip_n_tokens"])
                w = apply_clip(w, search_clip(w, sample, qcfg, self.options["clip_n_grid"],
                                              self.options["clip_max_shrink"]))
            state.linears[n] = linear_from_weight(w, qcfg)

    def quantize(self, lm, qcfg: QuantConfig, calib) -> QuantState:
        t0 = time.perf_counter()
        model = lm.model
        o = self.options
        act_aware = bool(o["act_aware"] and qcfg.quantizes_acts)
        if qcfg.is_float:
            return QuantState(method=self.name, config=qcfg, meta={"options": dict(o)})
        if calib is None:
            raise ValueError("awq needs calibration data")
        targets = target_linears(model, qcfg)
        batches = list(calib.inputs())
        state = QuantState(method=self.name, config=qcfg)
        ratios: dict[str, dict] = {}
        timings = {}
        for part in [p for p in ("vision", "projector", "language", "lm_head") if p in qcfg.parts]:
            tp = time.perf_counter()
            if part in ("vision", "language"):
                inputs = part_inputs(model, part, batches,
                                     state=state if o["propagate"] == "quantized" else None)

                def process(block: Block):
                    frag = QuantState(method=self.name, config=qcfg)
                    for path, layer in zip(block.paths, block.layers):
                        f, info = awq_layer(layer, path, block.calls, block.masks, qcfg, o, self.name,
                                            error_for=self.scale_error(part, path))
                        frag.linears.update(f.linears)
                        frag.float_params.update(f.float_params)
                        ratios[path] = info["ratio"]
                    return frag
                frag = run_blockwise(model, inputs, process, propagate=o["propagate"])
                state.linears.update({n: lq for n, lq in frag.linears.items() if n in targets})
                state.float_params.update(frag.float_params)
            else:
                names = [n for n in targets if part_of(n) == part]
                self._loose(model, names, batches, state, qcfg)
            timings[part] = round(time.perf_counter() - tp, 3)
        state.linears = {n: state.linears[n] for n in targets}
        for lq in state.linears.values():
            lq.act = act_quantizer(qcfg)
        state.meta.update(options=dict(o), act_aware=act_aware, alpha=ratios, part_s=timings,
                          quantize_s=time.perf_counter() - t0)
        return state
