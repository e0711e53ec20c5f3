"""MBQ (Li et al., CVPR 2025): AWQ's scale search with vision and text tokens weighted by their
gradient-based sensitivity ("Modality-Balanced Quantization", thu-nics/MBQ).

What thu-nics/MBQ's code does (``qmllm/methods/mbq/quantize/pre_quant.py`` ``run_mbq`` with
``reweight=True``, the setting of every config it ships), and how this file follows it:

1. Sensitivities (``GradCacheHook`` there, ``gradient_sensitivity`` here). The float model runs on
   the calibration set one sample at a time; the loss is the model's language-modelling loss on
   the answers (``labels``; -100 on prompt and image tokens). A backward hook on every decoder
   layer's ``o_proj`` and ``down_proj`` (the linears that write the residual stream) takes the
   gradient of the loss with respect to the linear's *output*; per sample, the mean ``|grad|``
   over all channels of the vision tokens and of the answer tokens (their ``caption_mask`` is
   ``labels != -100``); then the mean of those per-sample means over the samples.
2. Weights, per layer: ``r = mean|g|_vision / mean|g|_text`` for attention (from o_proj) and for
   the MLP (from down_proj), floored at the median of that ratio over the layers:
   ``r_l = max(r_l, median_l r)``. Text tokens weigh 1, vision tokens ``r``; the attention ratio
   serves the q/k/v and o scale groups, the MLP ratio gate/up and down.
3. Scale search (``auto_scale.py`` / ``auto_scale_wa.py`` ``_search_module_scale``): AWQ's grid
   (s = mean|x|^α, α = 0, 0.05, …, 0.95) with its output error replaced by, ``loss_mode="mae"``
   (their configs' choice), ``(Σ_text |Δ| + r·Σ_vision |Δ|) / (n_text + n_vision)`` over the
   elements of the answer and vision tokens, or, ``"mse"``, ``mean_text Δ² + r·mean_vision Δ²``.
   Prompt tokens are in neither mask, so they do not count. With activations quantized (their
   ``auto_scale_wa``) the search runs through the activation quantizer, as our AWQ's
   ``act_aware`` does.

Options beyond their code: ``loss="sq"`` is AWQ's own squared error with the same per-token
weights, ``(Σ_text Δ² + r·Σ_vision Δ²) / (n_text + n_vision)``, and ``text_tokens="all"`` counts
every real non-image token as text (prompt included); with both and ``vision_weight=1.0`` (a
fixed ratio instead of the gradients) the objective is AWQ's, and so are the scales and codes
(tests/test_mbq.py). Everything else (grid, folding, clipping, float-propagated layer inputs) is
``baselines/awq.py``'s: MBQ's code does no weight clipping (neither does its AWQ); ours keeps
AWQ's clipping search so that ``mbq − awq`` in the table isolates the modality weighting
(``apply_clip=False`` matches their code). The vision tower's layers (when ``parts`` has them)
see image tokens only, so they get plain AWQ; so do the projector and lm_head. Left out: their
``distort`` option (quantized-stream inputs; off in every shipped config) and a GPTQ variant
(their code has none).

Half-precision models: the loss is multiplied by 2^10 before the backward pass (loss scaling; the
ratios do not depend on it) so the per-layer gradients do not underflow; their code backpropagates
the fp16 loss as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

from baselines.awq import AWQ, ScaleError
from harness.models.family import ScaleGroup, adapter_for
from harness.quant.answers import answer_mask, lm_output
from harness.quant.capture import batch_mask, image_token_mask, token_rows
from harness.quant.config import QuantConfig
from harness.quant.state import QuantState
from harness.registry import register_method

HALF_LOSS_SCALE = 2.0 ** 10


# ---- which tokens are which -----------------------------------------------------------------------

@dataclass
class Modalities:
    """Per calibration batch, ``[batch, seq]`` bool masks of the vision and the text tokens."""

    vision: list[torch.Tensor]
    text: list[torch.Tensor]

    @classmethod
    def of(cls, batches: list[dict], image_token_id: int | None, text_tokens: str) -> "Modalities":
        vision, text = [], []
        for b in batches:
            real = batch_mask(b)
            if real is None:
                real = torch.ones_like(b["input_ids"], dtype=torch.bool)
            vis = (image_token_mask(b, image_token_id) if image_token_id is not None
                   else torch.zeros_like(real)) & real
            txt = answer_mask(b) if text_tokens == "answer" else real
            vision.append(vis)
            text.append(txt & real & ~vis)
        return cls(vision, text)

    @property
    def n_vision(self) -> int:
        return int(sum(int(v.sum()) for v in self.vision))

    @property
    def n_text(self) -> int:
        return int(sum(int(t.sum()) for t in self.text))


# ---- 1. sensitivities -----------------------------------------------------------------------------

def gradient_sensitivity(model: nn.Module, batches: list[dict], text_tokens: str = "answer",
                         loss_scale: float | None = None) -> dict[str, dict[str, float]]:
    """``{writer path: {"vision": ḡ_v, "text": ḡ_t, "samples_vision": n, "samples_text": n}}`` for
    every residual writer (o_proj, down_proj) of every language layer: the mean over calibration
    samples of the mean ``|∂L/∂y|`` over that sample's vision (text) tokens and all channels, y
    the writer's output, L the float model's language-modelling loss on the sample's answers.
    Samples without tokens of a modality do not enter its mean (MBQ's code assumes both)."""
    adapter = adapter_for(model)
    lang_path, layers = adapter.language_layers(model)
    names = [f"{lang_path}.{i}.{w}" for i, layer in enumerate(layers)
             for w in adapter.residual_writers(layer)]
    if loss_scale is None:
        dtype = next(model.parameters()).dtype
        loss_scale = HALF_LOSS_SCALE if dtype in (torch.float16, torch.bfloat16) else 1.0
    modal = Modalities.of(batches, adapter.image_token_id(model), text_tokens)
    outs: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(_m, _args, out):
            outs[name] = out
        return hook

    def track(_m, args, kwargs):  # the language stream carries gradients from layer 0 on
        if args:
            return (args[0].detach().requires_grad_(True),) + tuple(args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = kwargs["hidden_states"].detach().requires_grad_(True)
        return args, kwargs

    sums = {n: {"vision": 0.0, "text": 0.0, "samples_vision": 0, "samples_text": 0} for n in names}
    handles = [model.get_submodule(n).register_forward_hook(keep(n)) for n in names]
    handles.append(layers[0].register_forward_pre_hook(track, with_kwargs=True))
    try:
        with torch.enable_grad():
            for batch, vis_b, txt_b in zip(batches, modal.vision, modal.text):
                # one pass per batch: sample i's outputs reach only its own loss terms, so its own
                # loss's gradient is the batch loss's times (answer tokens in the batch) / (its
                # answer tokens) — per-sample gradients without splitting a family's image inputs
                counts = answer_mask(batch).sum(dim=1)
                if not bool(counts.any()):
                    continue  # no answer, no loss
                outs.clear()
                loss = lm_output(model, batch, labels=True).loss
                grads = torch.autograd.grad(loss * loss_scale, [outs[n] for n in names])
                total = float(counts.sum())
                for n, g_b in zip(names, grads):
                    for i in range(int(g_b.shape[0])):
                        if not int(counts[i]):
                            continue
                        g = g_b[i].double() * (total / float(counts[i]))  # [seq, channels]
                        if not bool(torch.isfinite(g).all()):
                            raise FloatingPointError(f"non-finite gradient at {n} (loss scale {loss_scale})")
                        vis, txt = vis_b[i], txt_b[i]
                        for kind, m in (("vision", vis), ("text", txt)):
                            if bool(m.any()):
                                sums[n][kind] += float(g[m.to(g.device)].abs().mean()) / loss_scale
                                sums[n][f"samples_{kind}"] += 1
                del grads, loss
    finally:
        for h in handles:
            h.remove()
        outs.clear()
    for s in sums.values():
        for kind in ("vision", "text"):
            s[kind] = s[kind] / s[f"samples_{kind}"] if s[f"samples_{kind}"] else float("nan")
    return sums


# ---- 2. weights -----------------------------------------------------------------------------------

def modality_ratios(sens: dict[str, dict[str, float]], median_floor: bool = True
                    ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]], dict[str, float]]:
    """From ``gradient_sensitivity``: ``(ratio, raw, median)`` with ``raw[layer][module] =
    ḡ_vision / ḡ_text`` per layer path and writer module (``self_attn``, ``mlp``),
    ``median[module]`` over the layers, and ``ratio = max(raw, median)`` (MBQ's floor) or raw."""
    raw: dict[str, dict[str, float]] = {}
    for name, s in sens.items():
        layer, _, writer = name.rpartition(".")  # ".../layers.3.self_attn", "o_proj"
        layer, _, module = layer.rpartition(".")
        if not s["text"] > 0:
            raise ValueError(f"MBQ: zero or undefined text-token gradient at {name}: {s}")
        raw.setdefault(layer, {})[module] = s["vision"] / s["text"]
    modules = sorted({m for r in raw.values() for m in r})
    median = {m: float(np.median([r[m] for r in raw.values() if m in r])) for m in modules}
    ratio = {layer: {m: (max(v, median[m]) if median_floor else v) for m, v in r.items()}
             for layer, r in raw.items()}
    return ratio, raw, median


# ---- 3. the weighted error ------------------------------------------------------------------------

LOSSES = ("mae", "mse", "sq")


def modality_error(modal: Modalities, ratio: float, loss: str) -> ScaleError:
    """The scale search's error for one group (``baselines.awq.ScaleError``): text tokens weigh 1,
    vision tokens ``ratio``; other tokens do not count. ``loss`` (per element Δ of the inspected
    module's output): ``mae`` ``(Σ_t|Δ| + r·Σ_v|Δ|) / (n_t + n_v)``; ``mse``
    ``Σ_tΔ²/n_t + r·Σ_vΔ²/n_v``; ``sq`` ``(Σ_tΔ² + r·Σ_vΔ²) / (n_t + n_v)`` (n: elements)."""
    if loss not in LOSSES:
        raise ValueError(f"MBQ loss must be one of {LOSSES}, got {loss!r}")
    n_t, n_v = modal.n_text, modal.n_vision
    keep, weights, dens = [], [], []
    for vis, txt in zip(modal.vision, modal.text):
        k = vis | txt
        v = vis[k]
        if loss == "mse":
            w = torch.where(v, ratio / n_v if n_v else 0.0, 1.0 / n_t if n_t else 0.0)
            dens.append(float(k.sum()) / (n_t + n_v))  # Σ over calls: 1 (× channels below)
        else:
            w = torch.where(v, float(ratio), 1.0)
            dens.append(float(k.sum()))
        keep.append(k)
        weights.append(w.float())

    def error(i: int, ref: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
        d = token_rows((ref - out).float(), keep[i])
        w = weights[i].to(d.device)[:, None]
        e = d.abs() if loss == "mae" else d.pow(2)
        return float((e * w).sum()), dens[i] * d.shape[-1]
    return error


# ---- the method -----------------------------------------------------------------------------------

@dataclass
class _Plan:
    modal: Modalities
    ratio: dict[str, dict[str, float]] | None  # per language layer path and module; None: fixed
    fixed: float | None
    loss: str
    info: dict = field(default_factory=dict)

    def error_for(self, path: str):
        def for_group(group: ScaleGroup) -> ScaleError:
            module = group.linears[0].split(".")[0]  # self_attn.* / mlp.*: the writer's module
            if self.ratio is None:
                r = self.fixed
            else:
                try:
                    r = self.ratio[path][module]
                except KeyError:
                    raise KeyError(f"MBQ: no sensitivity ratio for {path} {module} "
                                   f"(group {group.key})") from None
            return modality_error(self.modal, r, self.loss)
        return for_group


@register_method
class MBQ(AWQ):
    name = "mbq"
    summary = ("MBQ: AWQ's scale search, vision vs text tokens weighted by the LM loss's gradient "
               "ratio per layer")
    needs_calibration = True

    @dataclass
    class Options(AWQ.Options):
        loss: Literal["mae", "mse", "sq"] = "mae"  # MBQ's configs: mae; sq: AWQ's squared error
        text_tokens: Literal["answer", "all"] = "answer"  # answer: labels != -100 (MBQ's code)
        vision_weight: float | None = None  # None: from gradients; a number: this ratio everywhere
        median_floor: bool = True  # r_l = max(r_l, median over layers), as MBQ's code

    _plan: _Plan | None = None

    def _prepare(self, model: nn.Module, batches: list[dict]) -> _Plan:
        o = self.options
        modal = Modalities.of(batches, adapter_for(model).image_token_id(model), o["text_tokens"])
        info = {"loss": o["loss"], "text_tokens": o["text_tokens"],
                "tokens": {"vision": modal.n_vision, "text": modal.n_text}}
        if modal.n_text == 0:
            raise ValueError(f"MBQ: the calibration set has no {o['text_tokens']} text tokens")
        if o["vision_weight"] is not None:
            info["vision_weight"] = float(o["vision_weight"])
            return _Plan(modal, None, float(o["vision_weight"]), o["loss"], info)
        if modal.n_vision == 0:  # text-only calibration: nothing to balance
            info["note"] = "no image tokens in the calibration set: text tokens only"
            return _Plan(modal, None, 1.0, o["loss"], info)
        sens = gradient_sensitivity(model, batches, o["text_tokens"])
        ratio, raw, median = modality_ratios(sens, o["median_floor"])
        info.update(ratio=ratio, raw_ratio=raw, median=median,
                    grad={n: {k: s[k] for k in ("vision", "text")} for n, s in sens.items()})
        return _Plan(modal, ratio, None, o["loss"], info)

    def scale_error(self, part: str, path: str):
        if part != "language" or self._plan is None:
            return None  # vision tower: image tokens only, plain AWQ
        return self._plan.error_for(path)

    def quantize(self, lm, qcfg: QuantConfig, calib) -> QuantState:
        if qcfg.is_float or calib is None or "language" not in qcfg.parts:
            return super().quantize(lm, qcfg, calib)
        self._plan = self._prepare(lm.model, list(calib.batches))
        try:
            state = super().quantize(lm, qcfg, calib)
        finally:
            plan, self._plan = self._plan, None
        state.meta["mbq"] = plan.info
        return state
