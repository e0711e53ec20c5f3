"""Visual encoder optimization (VEO): Q-VLM §3.

Fine-tunes the vision encoder's float weights, before the language model is quantized, with

    L = L_reg + λ1·L_ent + λ2·L_err

* ``L_reg``: the model's autoregressive loss on the calibration answers (the batches' ``labels``),
  float model.
* ``L_ent``: Σ_k w_k · D(k, k+1), the cross-layer dependency of Eq. 4 between consecutive
  language layers' outputs (the CDM estimator of ``dependency.py``, differentiable through the
  soft assignment; per-token scales held constant), on ``samples`` random real-token positions
  per step. ``w_k = ‖∂E^(n)/∂X^(k)‖`` is the Jacobian norm of the final-output error with respect
  to layer k's output in the quantized model, averaged over the calibration set once before
  training and normalized to sum to 1 (held constant during training).
* ``L_err``: ``e(X^v_q, X^v_r) + η·e(X^(n)_q, X^(n)_r)`` with ``e(a, b) = Σ(a−b)² / Σb²`` (relative
  squared error over real tokens). ``X^v`` is the vision feature the projector reads;
  ``X^v_q`` is that feature in the quantized model (vision linears fake-quantized when the scheme
  quantizes the vision part) passed through the scheme's activation quantizer, as a quantized
  consumer reads it (per token, also when the scheme's activations are per-tensor: no static
  range is calibrated for this feature). ``X^(n)`` is the model's output logits.

The quantized model used by ``L_err`` and the Jacobian weights is round-to-nearest at the
scheme's bits (p = 1.0: the percentile search comes after VEO), with a straight-through estimator
for activation rounding so gradients reach the encoder. Only the vision tower's parameters train;
everything else is frozen, and the model is restored exactly afterwards (the optimized weights
are returned, for ``QuantState.float_params``). Half-precision towers train in float32 (master
weights) and are cast back.

Defaults (the paper gives none): AdamW, lr 1e-5, no weight decay, λ1 = 0.1, λ2 = 1.0, η = 1.0,
10 epochs over the calibration batches (64 pairs in batches of 8), batch order shuffled per epoch
with the seed.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from harness.models.layers import language_layers, part_of
from harness.quant.build import act_quantizer, target_linears
from harness.quant.ranges import fill_static_ranges, rule_for
from harness.quant.config import QuantConfig
from harness.quant.quantizer import dequantize_weight, rtn_weight
from harness.quant.simulated import quantize_activation
from harness.quant.state import ActQuant, LinearQuant, QuantState

from .search import ActCache
from .dependency import PositionSampler, code_units, conditional_entropy, joint_distribution, \
    level_range, soft_assign


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
    micro_batch: int | None = None
    jacobian_batches: int | None = None  # batches for the Jacobian weights (None: all)
    report: bool = True  # evaluate the loss terms on the calibration set before and after
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def ste_quant(x: torch.Tensor, act: ActQuant | None) -> torch.Tensor:
    """Fake-quantize ``x`` forward, identity backward (straight-through)."""
    if act is None:
        return x
    return x + (quantize_activation(x, act) - x).detach()


class DualLinear(nn.Module):
    """A linear that computes in float, or as the quantized model (STE on activation rounding).

    The quantized weight is round-to-nearest at the config's bits and clip, computed on the
    weight's device with the same functions ``linear_from_weight`` uses.
    """

    def __init__(self, linear: nn.Linear, qcfg: QuantConfig, act: ActQuant | None, flags: dict,
                 cache: ActCache):
        super().__init__()
        self.linear = linear
        self.act = act
        self.cache = cache
        w = linear.weight.detach()
        if qcfg.quantizes_weights:
            codes, scale, zero = rtn_weight(w.float(), qcfg.w_bits, qcfg.w_sym, qcfg.w_group_size,
                                            qcfg.w_clip)
            w = dequantize_weight(codes, scale, zero).to(w.dtype)
        self.register_buffer("wq", w, persistent=False)
        self.flags = flags

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.flags["quant"]:
            return self.linear(x)
        return F.linear(self.cache(x, self.act) if self.act is not None else x, self.wq,
                        self.linear.bias)


def _rel_err(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    se = (a.float() - b.float()).pow(2).sum(dim=-1)
    ref = b.detach().float().pow(2).sum(dim=-1)
    if mask is not None and mask.shape == se.shape:
        m = mask.to(se.device).float()
        return (se * m).sum() / (ref * m).sum().clamp_min(1e-12)
    return se.sum() / ref.sum().clamp_min(1e-12)


class VEO:
    """One VEO run on a model (see the module doc). ``run()`` returns the optimized parameters."""

    def __init__(self, model: nn.Module, qcfg: QuantConfig, batches: Sequence[dict],
                 cfg: VEOConfig):
        self.model = model
        self.qcfg = qcfg
        self.batches = list(batches)
        self.cfg = cfg
        _, self.layers = language_layers(model)
        self.vision_params = {n: p for n, p in model.named_parameters() if part_of(n) == "vision"}
        if not self.vision_params:
            raise ValueError("the model has no vision tower parameters to optimize")
        self.projector = next(m for n, m in model.named_modules()
                              if n.endswith("multi_modal_projector"))
        self.bits = qcfg.a_bits if qcfg.quantizes_acts else 8
        self.sym = qcfg.a_sym if qcfg.quantizes_acts else True
        self.v_act = act_quantizer(qcfg)
        if self.v_act is not None and self.v_act.granularity != "per_token":
            self.v_act = ActQuant(bits=qcfg.a_bits, sym=qcfg.a_sym, clip_ratio=qcfg.a_clip)
        self.flags = {"quant": False, "capture": False}
        self.cache = ActCache(ste_quant)  # q/k/v (gate/up) share one quantized input
        self.hidden: list[torch.Tensor] = []
        self.vfeat: list[torch.Tensor] = []

    # -- model plumbing ---------------------------------------------------------------------------
    @contextmanager
    def prepared(self):
        """Swap in dual linears, hooks, trainable float32 tower; undo everything on exit."""
        model = self.model
        saved = {n: p.detach().clone() for n, p in self.vision_params.items()}
        grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
        acts = QuantState("qvlm-veo", self.qcfg)
        for name in target_linears(model, self.qcfg):
            acts.linears[name] = LinearQuant(bits=16, act=act_quantizer(self.qcfg))
        # the straight-through model's static ranges: the engine's rule, from the float model
        fill_static_ranges(model, acts, [{k: v for k, v in b.items() if k != "labels"}
                                         for b in self.batches], rule_for(self.qcfg))
        replaced = {}
        handles = []
        try:
            for p in model.parameters():
                p.requires_grad_(False)
            for n, p in self.vision_params.items():
                if p.dtype != torch.float32:
                    p.data = p.data.float()
                p.requires_grad_(True)
            for name, lq in acts.linears.items():
                parent, _, child = name.rpartition(".")
                owner = model.get_submodule(parent)
                lin = getattr(owner, child)
                setattr(owner, child, DualLinear(lin, self.qcfg, lq.act, self.flags, self.cache))
                replaced[name] = lin

            def layer_hook(_m, _args, out):
                if self.flags["capture"]:
                    self.hidden.append(out[0] if isinstance(out, (tuple, list)) else out)

            def proj_hook(mod, args):
                x = args[0]
                if self.flags["capture"]:
                    self.vfeat.append(x)
                w = next(mod.parameters())
                return (x.to(w.dtype),) + tuple(args[1:])

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
        self.flags["quant"] = quant
        self.flags["capture"] = True
        self.hidden, self.vfeat = [], []
        inputs = {k: v for k, v in batch.items() if k != "labels" or labels}
        try:
            out = self.model(**inputs, use_cache=False)
        finally:
            self.flags["capture"] = False
            self.flags["quant"] = False
            self.cache.clear()
        return out, self.hidden, self.vfeat[0] if self.vfeat else None

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
        return (weights.to(deps.device) * deps).sum()

    def terms(self, batch: dict, weights: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        mask = batch.get("attention_mask")
        out_r, hid_r, xv_r = self._forward(batch, quant=False, labels=True)
        out_q, _, xv_q = self._forward(batch, quant=True)
        l_ent = self.entropy_term(hid_r, mask, weights, seed)
        l_err = self.cfg.eta * _rel_err(out_q.logits, out_r.logits, mask)
        if xv_r is not None:
            l_err = l_err + _rel_err(ste_quant(xv_q, self.v_act), xv_r)
        return {"reg": out_r.loss, "ent": l_ent, "err": l_err}

    def total(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        return t["reg"] + self.cfg.lambda1 * t["ent"] + self.cfg.lambda2 * t["err"]

    def jacobian_weights(self) -> torch.Tensor:
        """Mean over batches of ‖∂E^(n)/∂X^(k)‖ for k = 0..n-2, normalized to sum 1."""
        n = len(self.layers)
        if n < 2:
            return torch.ones(1)
        acc = torch.zeros(n - 1, dtype=torch.float64)
        for batch in self.batches[: self.cfg.jacobian_batches or len(self.batches)]:
            sq = torch.zeros(n - 1, dtype=torch.float64)
            for chunk, frac in _chunks(batch, self.cfg.micro_batch):
                with torch.no_grad():
                    out_r, _, _ = self._forward(chunk, quant=False)
                out_q, hid_q, _ = self._forward(chunk, quant=True)
                err = frac * _rel_err(out_q.logits, out_r.logits, chunk.get("attention_mask"))
                used = hid_q[: n - 1]
                if not all(h.requires_grad for h in used):
                    raise RuntimeError("language layer outputs do not depend on the vision encoder")
                grads = torch.autograd.grad(err, used, allow_unused=True)
                for k, g in enumerate(grads):
                    if g is not None:
                        sq[k] += float(g.float().pow(2).sum())
                del out_r, out_q, hid_q, grads
            acc += sq.sqrt()
        total = acc.sum()
        return (acc / total if total > 0 else torch.full_like(acc, 1.0 / len(acc))).float()

    @torch.no_grad()
    def evaluate(self, weights: torch.Tensor) -> dict[str, float]:
        """Mean loss terms over the calibration set, fixed entropy positions (seed + 1)."""
        sums: dict[str, float] = {}
        for b, batch in enumerate(self.batches):
            for chunk, frac in _chunks(batch, self.cfg.micro_batch):
                t = self.terms(chunk, weights, self.cfg.seed + 1 + b)
                t["total"] = self.total(t)
                for k, v in t.items():
                    sums[k] = sums.get(k, 0.0) + frac * float(v)
        return {k: v / len(self.batches) for k, v in sums.items()}

    # -- training ---------------------------------------------------------------------------------
    def run(self) -> tuple[dict[str, torch.Tensor], dict]:
        cfg = self.cfg
        if cfg.optimizer != "adamw":
            raise ValueError(f"unknown VEO optimizer {cfg.optimizer!r}; valid: adamw")
        gen = torch.Generator().manual_seed(cfg.seed)
        with self.prepared():
            params = list(self.vision_params.values())
            weights = self.jacobian_weights()
            before = self.evaluate(weights) if cfg.report else None
            opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
            step = 0
            for _epoch in range(cfg.epochs):
                for bi in torch.randperm(len(self.batches), generator=gen).tolist():
                    batch = self.batches[bi]
                    opt.zero_grad(set_to_none=True)
                    for chunk, frac in _chunks(batch, cfg.micro_batch):
                        t = self.terms(chunk, weights, cfg.seed + 1000 + step)
                        (self.total(t) * frac).backward()
                    opt.step()
                    step += 1
            after = self.evaluate(weights) if cfg.report else None
            changed = {}
            for n, p in self.vision_params.items():
                changed[n] = p.detach().clone()
        # prepared() restored the model; keep only the parameters that moved, in the model's dtype
        out = {}
        for n, p in self.vision_params.items():
            new = changed[n].to(p.dtype)
            if not torch.equal(new, p.detach()):
                out[n] = new.cpu()
        info = {"config": cfg.to_dict(), "steps": step, "jacobian_weights": weights.tolist(),
                "before": before, "after": after, "params_changed": len(out),
                "batch_size": int(self.batches[0]["input_ids"].shape[0]) if self.batches else 0}
        return out, info


def _chunks(batch: dict, micro: int | None):
    n = int(batch["input_ids"].shape[0])
    if not micro or micro >= n:
        yield batch, 1.0
        return
    for s in range(0, n, micro):
        e = min(n, s + micro)
        yield {k: v[s:e] for k, v in batch.items()}, (e - s) / n


def optimize_vision_encoder(model: nn.Module, qcfg: QuantConfig, batches: Sequence[dict],
                            cfg: VEOConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """Run VEO; the model is left exactly as it was. Returns ``(param path -> tensor, info)``."""
    return VEO(model, qcfg, batches, cfg).run()
