"""Visual encoder optimization (VEO): Q-VLM §3.

Fine-tunes the vision encoder's float weights, before the language model is quantized, with

    L = L_reg + λ1·L_ent + λ2·L_err

* ``L_reg`` (paper): the model's autoregressive loss on the calibration answers (the batches'
  ``labels``), float model (``harness.quant.answers.lm_output``, shared with MBQ).
* ``L_ent`` (paper): Σ_k w_k · D(k, k+1), the cross-layer dependency of Eq. 4 between consecutive
  language layers' outputs (the CDM estimator of ``dependency.py``, differentiable through the
  soft assignment; per-token scales held constant), on ``samples`` random real-token positions
  per step. ``w_k = ‖∂E^(n)/∂X^(k)‖`` is the Jacobian norm of the final-output error with respect
  to layer k's output in the quantized model, averaged over the calibration set once before
  training and normalized to sum to 1 (held constant during training). Half-precision models
  backpropagate it with loss scaling (``jacobian_norms``), so it is never silently uniform.
* ``L_err`` (paper): ``e(X^v_q, X^v_r) + η·e(X^(n)_q, X^(n)_r)`` with ``e(a, b) = Σ(a−b)² / Σb²``
  (relative squared error over real tokens). ``X^(n)`` is the model's output logits.
  ``X^v`` (ours: the paper names the vision output without saying where it is measured) is where
  the quantizer first touches the visual tokens: their rows at the input of the first quantized
  language linear (layer 0's q/k/v projections), ``X^v_r`` in the float model, ``X^v_q`` in the
  quantized model *through that linear's activation quantizer* (its static range when per-tensor,
  filled by the engine's rule for round-to-nearest). The quantizer is differentiated exactly (rounding has zero
  derivative; the per-token scale ``max|x_t|`` is differentiated), not through a
  straight-through estimator: with an identity backward, ``X^v_q − X^v_r`` would have zero
  gradient whenever the tower itself is float. So the term pulls the visual tokens towards
  values the quantizer represents well (onto its levels, away from outliers that stretch a
  token's range).

The quantized model used by ``L_err`` and the Jacobian weights is round-to-nearest at the
scheme's bits (p = 1.0: the percentile search comes after VEO), with a straight-through estimator
for the activation rounding *inside* the model so gradients reach the encoder through it. Its
weights are held as integer codes and dequantized per call (1 byte per weight instead of a second
half-precision copy). Only the vision tower's parameters train; everything else is frozen, and the
model is restored exactly afterwards (the optimized weights are returned, for
``QuantState.float_params``). Half-precision towers train in float32 (master weights) and are cast
back.

Memory (``micro_batch``): batches are split into chunks whose losses are weighted by their share
of the batch; "auto" uses the whole batch on the CPU and, on a GPU, measures the peak of a
one-sequence step and takes the largest chunk that fits the free memory (``auto_micro_batch``).

Defaults (the paper gives none but epochs and batch): AdamW, lr 1e-5, no weight decay,
λ1 = 0.1, λ2 = 1.0, η = 1.0, 10 epochs over the calibration batches (64 pairs in batches of 8),
batch order shuffled per epoch with the seed.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from harness.models.batch_rows import batch_size, select_rows
from harness.models.family import adapter_for
from harness.models.layers import language_layers, part_of
from harness.quant.answers import lm_output
from harness.quant.build import rtn_state
from harness.quant.config import QuantConfig
from harness.quant.quantizer import expand_groups, rtn_weight
from harness.quant.ranges import fill_static_ranges, rule_for
from harness.quant.simulated import quantize_activation
from harness.quant.state import ActQuant

from .dependency import PositionSampler, code_units, conditional_entropy, joint_distribution, \
    level_range, soft_assign
from .search import ActCache

JACOBIAN_FALLBACKS = ("error", "uniform")
AUTO_HEADROOM = 0.85  # share of the free GPU memory the auto micro-batch may plan to use


class JacobianWeightsError(RuntimeError):
    """The Jacobian weights of L_ent could not be computed (zero or non-finite gradients)."""


@dataclass
class VEOConfig:
    epochs: int = 10
    lr: float = 1e-5
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    lambda1: float = 0.1
    lambda2: float = 1.0
    eta: float = 1.0
    tau: float = 0.01
    samples: int = 16384
    micro_batch: int | str | None = "auto"  # int, None (whole batch) or "auto"
    jacobian_batches: int | None = None  # batches for the Jacobian weights (None: all)
    jacobian_fallback: str = "error"  # "error": fail the cell; "uniform": proceed, recorded loudly
    report: bool = True  # evaluate the loss terms on the calibration set before and after
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def ste_quant(x: torch.Tensor, act: ActQuant | None) -> torch.Tensor:
    """Fake-quantize ``x`` forward, identity backward (straight-through)."""
    if act is None:
        return x
    return x + (quantize_activation(x, act) - x).detach()


class _CodesLinear(torch.autograd.Function):
    """``x @ dequant(codes).T + b`` that keeps only the codes for backward (frozen weight)."""

    @staticmethod
    def forward(ctx, x, codes, scale, zero, bias):
        w = _dequant(codes, scale, zero, x.dtype)
        ctx.save_for_backward(codes, scale, zero)
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad):
        codes, scale, zero = ctx.saved_tensors
        w = _dequant(codes, scale, zero, grad.dtype)
        return grad @ w, None, None, None, None


def _dequant(codes, scale, zero, dtype):
    in_f = codes.shape[1]
    return ((codes.float() - expand_groups(zero, in_f)) * expand_groups(scale, in_f)).to(dtype)


class DualLinear(nn.Module):
    """A linear that computes in float, or as the quantized model (STE on activation rounding).

    The quantized weight is round-to-nearest at the config's bits and clip (the functions
    ``linear_from_weight`` uses): held as codes on the weight's device for frozen (language)
    linears; recomputed from the current weight, straight-through, for trained (vision) ones.
    """

    def __init__(self, linear: nn.Linear, qcfg: QuantConfig, act: ActQuant | None, flags: dict,
                 cache: ActCache, name: str, seen: dict):
        super().__init__()
        self.linear = linear
        self.act = act
        self.cache = cache
        self.name = name
        self.seen = seen  # name -> input of this call, when the VEO run asks for it
        self.qcfg = qcfg
        codes = scale = zero = None
        if qcfg.quantizes_weights:
            codes, scale, zero = rtn_weight(linear.weight.detach().float(), qcfg.w_bits, qcfg.w_sym,
                                            qcfg.w_group_size, qcfg.w_clip)
        self.register_buffer("codes", codes, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("zero", zero, persistent=False)
        self.flags = flags

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.name in self.seen and self.seen[self.name] is None:
            self.seen[self.name] = x
        if not self.flags["quant"]:
            return self.linear(x)
        xq = self.cache(x, self.act) if self.act is not None else x
        w = self.linear.weight
        if self.codes is None:
            return F.linear(xq, w, self.linear.bias)
        if w.requires_grad:  # a trained (vision) linear: its current weight, rounded, STE
            codes, scale, zero = rtn_weight(w.detach().float(), self.qcfg.w_bits, self.qcfg.w_sym,
                                            self.qcfg.w_group_size, self.qcfg.w_clip)
            w = w + (_dequant(codes, scale, zero, w.dtype) - w).detach()
            return F.linear(xq, w, self.linear.bias)
        return _CodesLinear.apply(xq, self.codes, self.scale, self.zero, self.linear.bias)


def _rel_err(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    a, b = _wide(a), _wide(b)
    se = (a - b).pow(2).sum(dim=-1)
    ref = b.detach().pow(2).sum(dim=-1)
    if mask is not None and mask.shape == se.shape:
        m = mask.to(se.device, se.dtype)
        return (se * m).sum() / (ref * m).sum().clamp_min(1e-12)
    return se.sum() / ref.sum().clamp_min(1e-12)


def _wide(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _chunks(batch: dict, micro: int | None, image_token: int | None):
    n = batch_size(batch)
    if not micro or micro >= n:
        yield batch, 1.0
        return
    for s in range(0, n, micro):
        e = min(n, s + micro)
        yield select_rows(batch, s, e, image_token), (e - s) / n


class VEO:
    """One VEO run on a model (see the module doc). ``run()`` returns the optimized parameters."""

    def __init__(self, model: nn.Module, qcfg: QuantConfig, batches: Sequence[dict],
                 cfg: VEOConfig):
        if cfg.jacobian_fallback not in JACOBIAN_FALLBACKS:
            raise ValueError(f"veo_jacobian_fallback must be one of {JACOBIAN_FALLBACKS}, "
                             f"got {cfg.jacobian_fallback!r}")
        self.model = model
        self.qcfg = qcfg
        self.batches = list(batches)
        self.cfg = cfg
        self.lang_path, self.layers = language_layers(model)
        self.vision_params = {n: p for n, p in model.named_parameters() if part_of(n) == "vision"}
        if not self.vision_params:
            raise ValueError("the model has no vision tower parameters to optimize")
        self.projector = model.get_submodule(adapter_for(model).projector(model))
        config = model.config
        self.image_token = getattr(config, "image_token_id", None)
        if self.image_token is None:
            self.image_token = getattr(config, "image_token_index", None)
        self.bits = qcfg.a_bits if qcfg.quantizes_acts else 8
        self.sym = qcfg.a_sym if qcfg.quantizes_acts else True
        self.flags = {"quant": False, "capture": False}
        self.cache = ActCache(ste_quant)  # q/k/v (gate/up) share one quantized input
        self.hidden: list[torch.Tensor] = []
        self.seen: dict[str, torch.Tensor | None] = {}
        self.xv_name: str | None = None  # the first quantized language linear
        self.xv_act: ActQuant | None = None
        self.micro: int | None = None
        self.memory: dict = {}

    # -- model plumbing ---------------------------------------------------------------------------
    def _acts(self) -> dict[str, ActQuant | None]:
        """The round-to-nearest model's activation quantizers; static ranges as the engine fills
        them for round-to-nearest (its default rule, ``harness.quant.ranges``)."""
        state = rtn_state(self.model, self.qcfg, "qvlm-veo")
        fill_static_ranges(self.model, state, [{k: v for k, v in b.items() if k != "labels"}
                                               for b in self.batches], rule_for(self.qcfg))
        return {name: lq.act for name, lq in state.linears.items()}

    @contextmanager
    def prepared(self):
        """Swap in dual linears, hooks, trainable float32 tower; undo everything on exit."""
        model = self.model
        saved = {n: p.detach().clone() for n, p in self.vision_params.items()}
        grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
        acts = self._acts()
        lang = [n for n in acts if n.startswith(self.lang_path + ".")]
        self.xv_name = lang[0] if lang else None
        self.xv_act = acts.get(self.xv_name) if self.xv_name else None
        replaced = {}
        handles = []
        try:
            for p in model.parameters():
                p.requires_grad_(False)
            for n, p in self.vision_params.items():
                if p.dtype != torch.float32 and p.dtype != torch.float64:
                    p.data = p.data.float()
                p.requires_grad_(True)
            for name, act in acts.items():
                parent, _, child = name.rpartition(".")
                owner = model.get_submodule(parent)
                lin = getattr(owner, child)
                setattr(owner, child, DualLinear(lin, self.qcfg, act, self.flags, self.cache, name,
                                                 self.seen))
                replaced[name] = lin

            def layer_hook(_m, _args, out):
                if self.flags["capture"]:
                    self.hidden.append(out[0] if isinstance(out, (tuple, list)) else out)

            def proj_hook(mod, args):
                w = next(mod.parameters())
                return (args[0].to(w.dtype),) + tuple(args[1:])

            handles = [layer.register_forward_hook(layer_hook) for layer in self.layers]
            handles.append(self.projector.register_forward_pre_hook(proj_hook))
            yield
        finally:
            for h in handles:
                h.remove()
            for name, lin in replaced.items():
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, lin)
            for n, p in self.vision_params.items():
                p.data = saved[n]  # our clone, in the original dtype and values
            for n, p in model.named_parameters():
                p.requires_grad_(grad_flags[n])

    def _forward(self, batch: dict, quant: bool, labels: bool = False):
        """One forward pass: ``(output, layer outputs, input rows of the first quantized language
        linear at the visual tokens or None)``."""
        self.flags["quant"] = quant
        self.flags["capture"] = True
        self.hidden = []
        self.seen.clear()
        if self.xv_name is not None:
            self.seen[self.xv_name] = None
        try:
            out = lm_output(self.model, batch, labels=labels)  # with labels: .loss is L_reg
        finally:
            self.flags["capture"] = False
            self.flags["quant"] = False
            self.cache.clear()
        xv = self.seen.get(self.xv_name) if self.xv_name else None
        self.seen.clear()
        if xv is not None:
            ids = batch["input_ids"]
            if self.image_token is None or tuple(xv.shape[:2]) != tuple(ids.shape):
                xv = None
            else:
                rows = ids == self.image_token
                xv = xv[rows.to(xv.device)] if bool(rows.any()) else None
        return out, self.hidden, xv

    # -- loss terms -------------------------------------------------------------------------------
    def entropy_term(self, hidden: Sequence[torch.Tensor], mask: torch.Tensor,
                     weights: torch.Tensor, gen_seed: int) -> torch.Tensor:
        if len(hidden) < 2:
            return hidden[0].new_zeros(()).float() if hidden else torch.zeros(())
        if mask is None or mask.shape != hidden[0].shape[:2]:
            mask = torch.ones(hidden[0].shape[:2])
        sampler = PositionSampler([mask], hidden[0].shape[-1], self.cfg.samples, gen_seed)
        lo, hi = level_range(self.bits, self.sym)
        assign = []
        for h in hidden:
            u, _, _ = code_units(h, self.bits, self.sym)
            assign.append(soft_assign(u.reshape(-1)[sampler.index[0].to(u.device)], lo, hi,
                                      self.cfg.tau))
        deps = torch.stack([conditional_entropy(joint_distribution(a, b))
                            for a, b in zip(assign[:-1], assign[1:])])
        return (weights.to(deps.device, deps.dtype) * deps).sum()

    def vision_error(self, xv_q: torch.Tensor | None, xv_r: torch.Tensor | None) -> torch.Tensor | None:
        """``e(X^v_q, X^v_r)``: the visual tokens through the first language linear's activation
        quantizer, differentiated exactly (no straight-through estimator)."""
        if xv_q is None or xv_r is None:
            return None
        xq = quantize_activation(xv_q, self.xv_act) if self.xv_act is not None else xv_q
        return _rel_err(xq, xv_r)

    def terms(self, batch: dict, weights: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        mask = batch.get("attention_mask")
        out_r, hid_r, xv_r = self._forward(batch, quant=False, labels=True)
        out_q, _, xv_q = self._forward(batch, quant=True)
        l_ent = self.entropy_term(hid_r, mask, weights, seed)
        err_out = _rel_err(out_q.logits, out_r.logits, mask)
        err_v = self.vision_error(xv_q, xv_r)
        if err_v is None:
            err_v = err_out.new_zeros(())
        return {"reg": out_r.loss, "ent": l_ent, "err": err_v + self.cfg.eta * err_out,
                "err_vision": err_v, "err_output": err_out}

    def total(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        return t["reg"] + self.cfg.lambda1 * t["ent"] + self.cfg.lambda2 * t["err"]

    # -- Jacobian weights of L_ent ------------------------------------------------------------------
    def jacobian_norms(self, chunk: dict, frac: float) -> tuple[torch.Tensor, dict]:
        """Squared norms of ∂E^(n)/∂X^(k), k = 0..n-2, for one chunk, in float64.

        The gradient of E^(n) (a relative error summed over every logit) is tiny per element, so
        in half precision it underflows to zero: we compute ∂E/∂logits in float32 and
        backpropagate it scaled by a power of two that makes its largest element 1 (loss scaling),
        halving the scale while anything overflows, and divide the squares by the scale again.
        """
        n = len(self.layers)
        with torch.no_grad():
            out_r, _, _ = self._forward(chunk, quant=False)
        out_q, hid_q, _ = self._forward(chunk, quant=True)
        used = hid_q[: n - 1]
        if not all(h.requires_grad for h in used):
            raise RuntimeError("language layer outputs do not depend on the vision encoder")
        logits = out_q.logits
        with torch.enable_grad():
            leaf = _wide(logits.detach()).requires_grad_(True)
            err = frac * _rel_err(leaf, out_r.logits, chunk.get("attention_mask"))
            (g,) = torch.autograd.grad(err, leaf)
        del out_r
        gmax = float(g.abs().max())
        info = {"loss_scale": None, "retries": 0}
        sq = torch.zeros(n - 1, dtype=torch.float64)
        if not math.isfinite(gmax) or gmax == 0.0:
            info["problem"] = f"d error / d logits is {'zero' if gmax == 0.0 else 'not finite'}"
            return sq, info
        half = logits.dtype in (torch.float16, torch.bfloat16)
        exp = -math.floor(math.log2(gmax)) if half else 0
        for attempt in range(24):
            scale = 2.0 ** exp
            grads = torch.autograd.grad(logits, used, grad_outputs=(g * scale).to(logits.dtype),
                                        retain_graph=True, allow_unused=True)
            vals = [float(_wide(x).pow(2).sum()) if x is not None else 0.0 for x in grads]
            if all(math.isfinite(v) for v in vals):
                sq = torch.tensor(vals, dtype=torch.float64) / scale ** 2
                info.update(loss_scale=scale, retries=attempt)
                break
            if not half:
                info["problem"] = "non-finite gradients in full precision"
                break
            exp -= 4
        else:
            info["problem"] = "non-finite gradients at every loss scale tried"
        del grads, out_q, hid_q, used, logits
        return sq, info

    def jacobian_weights(self) -> tuple[torch.Tensor, dict]:
        """Mean over batches of ‖∂E^(n)/∂X^(k)‖ for k = 0..n-2, normalized to sum 1, and a report.

        Zero or non-finite norms fail (``jacobian_fallback="error"``) or give uniform weights
        recorded under ``fallback`` (``"uniform"``)."""
        n = len(self.layers)
        if n < 2:
            return torch.ones(1), {"fallback": None}
        acc = torch.zeros(n - 1, dtype=torch.float64)
        scales, problems = [], []
        for batch in self.batches[: self.cfg.jacobian_batches or len(self.batches)]:
            sq = torch.zeros(n - 1, dtype=torch.float64)
            for chunk, frac in _chunks(batch, self.micro, self.image_token):
                s, info = self.jacobian_norms(chunk, frac)
                sq += s
                if info.get("loss_scale") is not None:
                    scales.append(info["loss_scale"])
                if "problem" in info:
                    problems.append(info["problem"])
            acc += sq.sqrt()
        total = float(acc.sum())
        report = {"loss_scale": [min(scales), max(scales)] if scales else None,
                  "norms": acc.tolist(), "fallback": None}
        if total > 0 and math.isfinite(total) and not problems:
            return (acc / total).float(), report
        reason = "; ".join(sorted(set(problems))) or f"summed norm {total}"
        if self.cfg.jacobian_fallback == "error":
            raise JacobianWeightsError(
                f"VEO's Jacobian weights could not be computed ({reason}); L_ent would weight "
                "every layer alike, a different method. Set veo_jacobian_fallback: uniform to "
                "run anyway (recorded in the state's meta).")
        report["fallback"] = f"uniform weights: {reason}"
        return torch.full((n - 1,), 1.0 / (n - 1)), report

    @torch.no_grad()
    def evaluate(self, weights: torch.Tensor) -> dict[str, float]:
        """Mean loss terms over the calibration set, fixed entropy positions (seed + 1)."""
        sums: dict[str, float] = {}
        for b, batch in enumerate(self.batches):
            for chunk, frac in _chunks(batch, self.micro, self.image_token):
                t = self.terms(chunk, weights, self.cfg.seed + 1 + b)
                t["total"] = self.total(t)
                for k, v in t.items():
                    sums[k] = sums.get(k, 0.0) + frac * float(v)
        return {k: v / len(self.batches) for k, v in sums.items()}

    # -- memory -------------------------------------------------------------------------------------
    def auto_micro_batch(self, weights: torch.Tensor) -> int | None:
        """Chunk size for ``micro_batch="auto"``: the whole batch on the CPU; on a GPU the largest
        chunk whose predicted peak (a measured one-sequence step, times the chunk size) fits
        ``AUTO_HEADROOM`` of the memory free after that step."""
        device = next(iter(self.vision_params.values())).device
        size = batch_size(self.batches[0])
        if device.type != "cuda" or size <= 1:
            self.memory = {"micro_batch": "whole batch", "device": device.type}
            return None
        one = select_rows(self.batches[0], 0, 1, self.image_token)
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        self.total(self.terms(one, weights, self.cfg.seed)).backward()
        torch.cuda.synchronize(device)
        per_seq = torch.cuda.max_memory_allocated(device) - base
        for p in self.vision_params.values():
            p.grad = None
        torch.cuda.empty_cache()
        free, _total = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        micro = max(1, min(size, int(AUTO_HEADROOM * free // max(per_seq, 1))))
        self.memory = {"micro_batch": micro, "step_peak_gib_per_sequence": round(per_seq / 2 ** 30, 3),
                       "free_gib": round(free / 2 ** 30, 2)}
        return None if micro >= size else micro

    # -- training ---------------------------------------------------------------------------------
    def run(self) -> tuple[dict[str, torch.Tensor], dict]:
        cfg = self.cfg
        if cfg.optimizer != "adamw":
            raise ValueError(f"unknown VEO optimizer {cfg.optimizer!r}; valid: adamw")
        gen = torch.Generator().manual_seed(cfg.seed)
        with self.prepared():
            params = list(self.vision_params.values())
            if cfg.micro_batch == "auto":
                self.micro = None
                probe = torch.ones(max(len(self.layers) - 1, 1)) / max(len(self.layers) - 1, 1)
                self.micro = self.auto_micro_batch(probe)
            else:
                self.micro = int(cfg.micro_batch) if cfg.micro_batch else None
                self.memory = {"micro_batch": self.micro or "whole batch"}
            weights, jac = self.jacobian_weights()
            before = self.evaluate(weights) if cfg.report else None
            opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
            step = 0
            for _epoch in range(cfg.epochs):
                for bi in torch.randperm(len(self.batches), generator=gen).tolist():
                    batch = self.batches[bi]
                    opt.zero_grad(set_to_none=True)
                    for chunk, frac in _chunks(batch, self.micro, self.image_token):
                        t = self.terms(chunk, weights, cfg.seed + 1000 + step)
                        (self.total(t) * frac).backward()
                    opt.step()
                    step += 1
            after = self.evaluate(weights) if cfg.report else None
            changed = {n: p.detach().clone() for n, p in self.vision_params.items()}
        # prepared() restored the model; keep only the parameters that moved, in the model's dtype
        out = {}
        for n, p in self.vision_params.items():
            new = changed[n].to(p.dtype)
            if not torch.equal(new, p.detach()):
                out[n] = new.cpu()
        info = {"config": cfg.to_dict(), "steps": step, "jacobian_weights": weights.tolist(),
                "jacobian": jac, "fallback": jac.get("fallback"), "memory": self.memory,
                "vision_term_at": self.xv_name, "before": before, "after": after,
                "params_changed": len(out),
                "batch_size": int(self.batches[0]["input_ids"].shape[0]) if self.batches else 0}
        return out, info


def optimize_vision_encoder(model: nn.Module, qcfg: QuantConfig, batches: Sequence[dict],
                            cfg: VEOConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """Run VEO; the model is left exactly as it was. Returns ``(param path -> tensor, info)``.

    On the CPU it runs single-threaded: its backward passes reduce in an order that depends on
    the thread count, and although each difference is at the float64 ulp, the trained tower and
    then some answers differed between 1 and 2 threads (docs/benchmarks/scale.md). One thread
    makes the state the same on every machine and thread count."""
    device = next(model.parameters()).device
    if device.type != "cpu":
        return VEO(model, qcfg, batches, cfg).run()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return VEO(model, qcfg, batches, cfg).run()
    finally:
        torch.set_num_threads(threads)
