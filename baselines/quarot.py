"""QuaRot (Ashkboos et al., NeurIPS 2024): rotate the language model's residual stream by a
randomized Hadamard matrix, add online Hadamards before ``o_proj`` and ``down_proj``, then
quantize the rotated weights with RTN (``quarot``) or GPTQ (``quarot+gptq``).

Outlier channels make W4A4 collapse: a few residual-stream channels carry activations 10-100×
the others, so a per-tensor (or per-token) 4-bit range spends its levels on them. An orthogonal
``Q`` spreads every channel over all of them (``x Q`` has the same norm, far lighter tails), and
because RMSNorm is rotation invariant, ``Q`` can be folded into the weights offline. Steps, all
in float64 (``harness.quant.transforms.FloatEdit``), on the language model only:

1. Fuse each RMSNorm's weight into the linears that read it (``input_layernorm`` → q/k/v,
   ``post_attention_layernorm`` → gate/up, the final norm → ``lm_head``); the norms become ones,
   so ``RMSNorm(x Q) = RMSNorm(x) Q``.
2. Rotate the residual stream by ``Q = diag(s) · H`` (``s``: ±1 from the ``seed`` option,
   ``H`` the normalised Hadamard matrix of the hidden size): token embeddings ``E ← E Q``; every
   reader (q, k, v, gate, up, ``lm_head``) ``W ← W Q``; every writer (``o_proj``, ``down_proj``
   and the projector's last linear — image features enter the residual stream too)
   ``W ← Qᵀ W``, its bias ``b ← Qᵀ b``.
3. Online Hadamards in front of the two writers: ``W ← W H`` offline and ``x ← x H`` at run
   time, before the activation quantizer (``LinearQuant.input_transform = "hadamard"``). For
   ``down_proj`` that is the paper's full online Hadamard over the intermediate size (11008 =
   344 · 32 in LLaVA-1.5-7B, Paley I over GF(7³) where the paper tabulates a 172 · 64; 768 =
   12 · 64 here: Sylvester × Paley, ``transforms.hadamard_factors``).
   For ``o_proj`` the paper applies a per-head Hadamard to v's output rows offline plus a
   Hadamard across heads online; their product is one Hadamard over the full hidden size, which
   is what ``o_proj``'s activation quantizer sees. The per-head half exists so the *V cache* is
   stored rotated; the KV cache is not quantized in this harness, so the full Hadamard is applied
   online at ``o_proj``'s input instead — the same quantizer input (exactly the same matrix when
   heads and head size are powers of two: Sylvester's ``H_a ⊗ H_b = H_ab``), ``v_proj``'s
   weights left unrotated.
4. Weights: the inner quantizer (``rtn_state`` or ``baselines.gptq.GPTQ``) runs on the model
   with the edit applied (``transforms.edited``), so RTN rounds and GPTQ's Hessians are built
   from the rotated weights and inputs (GPTQ's stream applies the online Hadamards: every linear
   it replaces by a fake-quantized one keeps its transform). ``FloatEdit.to_state`` then puts
   the rotated float parameters (embeddings, norms, ``lm_head`` and projector unless quantized)
   into ``float_params`` and the online transforms onto each linear's ``input_transform``.
   Activation quantizers are the scheme's (``act_quantizer``), as for every baseline; static
   ranges come from the engine's rule (``harness.quant.ranges``), which sees the rotated
   inputs because online transforms are a linear's first pre-hook.

What is exact: steps 1-3 leave the float model's function unchanged up to round-off (float64
round-off in the tests: the bundled model with images, and a LLaVA-1.5-7B-shaped decoder
layer, hidden 4096 and intermediate 11008); only quantization then differs.

Deliberately left out:

* KV-cache quantization (QuaRot's K-cache Hadamard after RoPE and V per-head rotation): the
  harness does not quantize the KV cache.
* Learned rotations (SpinQuant, Liu et al. 2024), which would replace the random Hadamard by a
  trained orthogonal ``Q``; only the ``seed`` of the random signs is an option.
* The vision tower: CLIP's LayerNorm subtracts the mean, which a rotation does not commute
  with unless the stream is mean-centred (QuaRot's OPT path); its linears, if ``parts``
  quantizes them, get the inner quantizer unrotated (``meta["rotated"]`` lists what was).
  The projector's first linear reads CLIP features and is not rotated either.
* QuaRot's weight-clipping search (``--w_clip``, a per-channel MSE search of the weight range)
  and its 8-bit ``down_proj`` option: the rows stay comparable with ``rtn`` and ``gptq``, the
  rotation being the only difference (``act_clip_search: true`` adds the engine's
  activation-clipping search as for every baseline).
* The reference mean-centres the token embeddings also for Llama models; with RMSNorm that is
  not function-preserving, and it is not done here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from baselines.gptq import GPTQ
from harness.models.family import ModelAdapter, adapter_for
from harness.models.layers import select_linears
from harness.quant.build import rtn_state
from harness.quant.config import QuantConfig
from harness.quant.state import QuantState
from harness.quant.transforms import FloatEdit, edited, hadamard_factors, random_signs
from harness.registry import Method, register_method


def rotate_layer(edit: FloatEdit, prefix: str, layer: nn.Module, signs: torch.Tensor,
                 adapter: ModelAdapter) -> None:
    """QuaRot on one decoder layer at path ``prefix`` (module doc, steps 1-3): its norms fused
    into their readers, readers ``W Q``, residual writers ``Qᵀ W`` with an online Hadamard."""
    dot = f"{prefix}." if prefix else ""
    readers = []
    for g in adapter.scale_groups(layer):
        if g.after_norm:
            names = [f"{dot}{n}" for n in g.linears]
            edit.fuse_norm(f"{dot}{g.prev}", names)
            readers += names
    for n in readers:
        edit.rotate_reader(n, signs)
    for n in adapter.residual_writers(layer):
        edit.rotate_writer(f"{dot}{n}", signs)
        edit.online_hadamard(f"{dot}{n}")


def quarot_edit(model: nn.Module, seed: int = 0) -> FloatEdit:
    """QuaRot's function-preserving float transform of ``model``'s language side (module doc,
    steps 1-3): fused norms, the residual stream rotated by ``diag(random_signs(seed)) · H``,
    online Hadamards in front of each layer's residual writers."""
    ad = adapter_for(model)
    prefix, layers = ad.language_layers(model)
    emb, head, final = ad.embeddings(model), ad.lm_head(model), ad.final_norm(model)
    emb_w, head_w = model.get_parameter(f"{emb}.weight"), model.get_parameter(f"{head}.weight")
    if emb_w is head_w or emb_w.data_ptr() == head_w.data_ptr():
        raise ValueError("quarot: tied embeddings and lm_head cannot take E·Q and W·Q with one "
                         "tensor (untie them first)")
    signs = random_signs(emb_w.shape[1], seed)
    edit = FloatEdit(model)
    edit.rotate_embedding(emb, signs)
    for w in ad.projector_writers(model):  # image features join the stream
        edit.rotate_writer(w, signs)
    for i, layer in enumerate(layers):
        rotate_layer(edit, f"{prefix}.{i}", layer, signs, ad)
    edit.fuse_norm(final, [head])
    edit.rotate_reader(head, signs)
    return edit


def _rotates(qcfg: QuantConfig) -> bool:
    return not qcfg.is_float and "language" in qcfg.parts


@register_method
class QuaRot(Method):
    name = "quarot"
    summary = "QuaRot: randomized-Hadamard rotation of the residual stream + online Hadamards, RTN weights"
    needs_calibration = False

    @dataclass
    class Options:
        seed: int = 0  # the random ±1 signs of Q = diag(s)·H

    inner = "rtn"

    def inner_state(self, lm, qcfg: QuantConfig, calib) -> QuantState:
        """The weights' quantizer, run on the (temporarily) rotated model."""
        return rtn_state(lm.model, qcfg, self.name)

    def quantize(self, lm, qcfg: QuantConfig, calib) -> QuantState:
        t0 = time.perf_counter()
        model = lm.model
        seed = int(self.options["seed"])
        if not _rotates(qcfg):  # nothing of the language model is quantized: nothing to rotate for
            state = self.inner_state(lm, qcfg, calib)
            state.method = self.name
            state.meta.update(options=dict(self.options), inner=self.inner, rotated=[],
                              online_hadamard=[], quantize_s=time.perf_counter() - t0)
            return state
        edit = quarot_edit(model, seed)
        with edited(model, edit):
            state = self.inner_state(lm, qcfg, calib)
        state.method = self.name
        edit.to_state(state)
        ad = adapter_for(model)
        hidden = model.get_parameter(f"{ad.embeddings(model)}.weight").shape[1]
        widths = {hidden} | {model.get_submodule(n).in_features for n in edit.online}
        writers = ad.projector_writers(model)
        state.meta.update(
            options=dict(self.options), inner=self.inner, seed=seed,
            rotated=[ad.embeddings(model), ad.language_layers(model)[0], ad.final_norm(model),
                     ad.lm_head(model), *writers],
            not_rotated=[n for n, _ in model.named_modules() if n.endswith("vision_tower")][:1]
            + [n for n in select_linears(model, ["projector"]) if n not in writers],
            vision_linears=("inner quantizer, unrotated" if "vision" in qcfg.parts else "not quantized"),
            online_hadamard=sorted(edit.online),
            hadamard_factors={str(n): list(hadamard_factors(n)) for n in sorted(widths)},
            quantize_s=time.perf_counter() - t0)
        return state


@register_method
class QuaRotGPTQ(QuaRot):
    name = "quarot+gptq"
    summary = "QuaRot rotation + online Hadamards, GPTQ weights on the rotated model"
    needs_calibration = True

    @dataclass
    class Options(GPTQ.Options):  # GPTQ's options (baselines/gptq.py) and QuaRot's seed
        seed: int = 0

    inner = "gptq"

    def inner_state(self, lm, qcfg: QuantConfig, calib) -> QuantState:
        opts = {k: v for k, v in self.options.items() if k != "seed"}
        state = GPTQ(**opts).quantize(lm, qcfg, calib)
        state.meta = {k: v for k, v in state.meta.items() if k != "options"}
        return state
