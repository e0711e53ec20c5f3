"""Static-KV-cache generation for LLaVA-family models (a vision tower + projector + a Llama or
Qwen2 decoder) on real-kernel layers.

The engine reuses the loaded model's vision tower, projector, embeddings, norms, rotary
frequencies and LM head, and runs the decoder's linear layers as ``RealLinear`` modules (q/k/v
and gate/up fused side by side; Qwen2's q/k/v biases ride along in the fused layer). What differs
per family comes from its ``ModelAdapter`` (``harness.models.family``): the language model's config
(heads, grouped-query kv heads, RMSNorm eps, rope theta through the rotary module), the float
modules that turn a picture into embeddings (``vision_children``, ``image_features``: CLIP +
projector, SigLIP + projector + any-res tiles, Qwen's ViT + patch merger), and the rotary positions:
1-D RoPE computed from ``inv_freq``, or Qwen2-VL / Qwen2.5-VL's M-RoPE as per-position cos/sin
tables for the whole static cache (``rope_tables``: the prompt's 3-D positions, then the text
continuation), from which each decode step reads its row (so the step stays graph-capturable). Its forward is written out here rather than taken from
transformers so that it is the same, compile-friendly code for every variant, fp16 included:

* the KV cache is static (``[batch, kv_heads, prompt + new_tokens, head_dim]`` per layer);
* the glue between the matrix products (residual add + RMSNorm, rotary, SiLU-gate) is compiled
  with inductor (``torch.compile``, dynamic shapes, one compile shared by all layers);
* where a layer's chosen kernel takes quantized activations (W4A4/W6A6/W8A8), the op producing
  its input quantizes in the same kernel (``fused``: add+RMSNorm, SiLU*mul, the attention output
  read through its transpose) and hands over fake-quantized values or FP8/INT8 codes + scales;
* the vision encoder + projector, the language prefill and one decode step are each captured as
  a CUDA graph and replayed, so per-token decode time is GPU time, not Python launch time.

Everything degrades to eager PyTorch (CPU tests, or ``compile=False, graphs=False``).

A quantization state reaches the engine whole (``state_blocks`` + ``LlavaEngine(float_params=…)``):
codes, scales and zero points, static and dynamic activation quantizers, each linear's online
``input_transform`` (applied in front of its quantizer: ``online``), and the state's
``float_params`` — norm weights (folded smoothing scales), embeddings and LM head (rotations),
float linear weights and biases, and a tuned vision tower or projector (run from a copy that holds
the state's values; the float model is never edited). Whatever a state holds that the engine
cannot apply — a quantized vision, projector or LM-head linear, a parameter the engine does not
read, an unknown transform — raises ``EngineStateError`` instead of being silently dropped.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F

from ..kernels import fused
from ..kernels import hadamard
from ..kernels import real as real_mod
from ..kernels.online import UnsupportedTransform
from ..models.family import adapter_for
from ..models.layers import language_layers
from .images import image_inputs, images_to


class EngineStateError(ValueError):
    """State content the real-kernel engine cannot apply (it would time a different model)."""

# ---------------------------------------------------------------------------- glue (compiled)


def _rms_norm(x, w, eps: float):
    xf = x.float()
    var = xf.pow(2).mean(-1, keepdim=True)
    return w * (xf * torch.rsqrt(var + eps)).to(x.dtype)


def _add_rms_norm(res, delta, w, eps: float):
    res = res + delta
    return res, _rms_norm(res, w, eps)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(q, k, cos, sin):
    # q [rows, H, D], k [rows, KV, D], cos/sin [rows, 1, D]: transformers' apply_rotary_pos_emb
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _cos_sin(pos, inv_freq, scaling: float, dtype: torch.dtype):
    freqs = pos.float()[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def _silu_mul(gu):
    half = gu.shape[-1] // 2
    return F.silu(gu[..., :half]) * gu[..., half:]


GLUE = {"rms_norm": _rms_norm, "add_rms_norm": _add_rms_norm, "rope": _rope,
        "cos_sin": _cos_sin, "silu_mul": _silu_mul}


@dataclass
class EngineLayer:
    """One decoder layer as the engine runs it: its two norm weights and four (fused) linears."""

    ln1: torch.Tensor
    ln2: torch.Tensor
    qkv: nn.Module
    o: nn.Module
    gate_up: nn.Module
    down: nn.Module


# ---------------------------------------------------------------------------- the engine


class LlavaEngine:
    """Generate with a LLaVA model whose decoder linears are replaced by ``blocks``' modules."""

    def __init__(self, model: nn.Module, blocks: list[EngineLayer], *, compile: bool = False,
                 graphs: bool = False, float_params: dict[str, torch.Tensor] | None = None):
        self.model = model
        self.adapter = adapter_for(model)
        self.blocks = blocks
        lang_path, lang_layers = language_layers(model)
        self.lang = model.get_submodule(lang_path.rsplit(".", 1)[0])
        self.lm_head = model.get_output_embeddings()
        # the float tensors the engine computes with outside the decoder linears: the model's, or
        # the state's where it has them (``float_params``; checked: ``engine_float_params``)
        fp = check_float_params(model, float_params or {})
        own = lambda path, t: t if path not in fp else fp[path].to(device=t.device, dtype=t.dtype)  # noqa: E731
        paths = model_paths(model)
        embed, head = self.lang.embed_tokens.weight, self.lm_head.weight
        if embed is head:  # tied: one parameter, whichever name the state used
            for a, b in ((paths["embed"], paths["head"]), (paths["head"], paths["embed"])):
                if a in fp and b not in fp:
                    fp = {**fp, b: fp[a]}
        self.embed_w = own(paths["embed"], embed)
        self.head_w = own(paths["head"], head)
        hb = getattr(self.lm_head, "bias", None)
        self.head_b = None if hb is None else own(paths["head_bias"], hb)
        self.norm_w = own(paths["norm"], self.lang.norm.weight)
        self.blocks = [replace(b, ln1=own(f"{lang_path}.{i}.input_layernorm.weight", b.ln1),
                               ln2=own(f"{lang_path}.{i}.post_attention_layernorm.weight", b.ln2))
                       for i, b in enumerate(blocks)]
        self.vision = _vision_model(model, fp, paths)
        cfg = self.adapter.text_config(model.config)
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        attn = lang_layers[0].self_attn  # the head size the model computes with (Qwen2.5-VL: hidden / heads)
        self.head_dim = int(getattr(attn, "head_dim", None) or getattr(cfg, "head_dim", None)
                            or cfg.hidden_size // self.n_heads)
        self.hidden = cfg.hidden_size
        self.eps = float(self.lang.norm.variance_epsilon)
        act = getattr(cfg, "hidden_act", "silu")
        if act != "silu":
            raise NotImplementedError(f"the perf engine implements Llama/Qwen2 decoders with SiLU, not {act!r}")
        if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
            raise NotImplementedError("the perf engine implements full causal attention; this model's "
                                      "config enables sliding-window attention")
        rot = self.lang.rotary_emb
        self.inv_freq = rot.inv_freq
        self.rope_scaling = float(getattr(rot, "attention_scaling", 1.0))
        self.image_token = self.adapter.image_token_id(model)
        self.device = self.lm_head.weight.device
        self.dtype = self.lm_head.weight.dtype
        self.compiled = False
        self.glue = dict(GLUE)
        if compile:
            import torch._inductor.config as inductor_config

            if hasattr(inductor_config, "emulate_precision_casts"):
                # round intermediates as eager fp16 does: keeps the engine close to transformers' numbers
                inductor_config.emulate_precision_casts = True
            self.glue = {k: torch.compile(v, dynamic=True) for k, v in GLUE.items()}
            self.compiled = True
        self.use_graphs = graphs and self.device.type == "cuda"
        # fused producers of quantized activations: wherever a layer quantizes its input and the
        # Triton kernels run here (else each layer quantizes its own input, as the simulated model)
        self.fused = fused.use_triton(self.device) and any(
            getattr(m, "act", None) is not None for m in self.linears().values())
        # each online Hadamard (QuaRot's o_proj and down_proj inputs): fused with the quantizer after
        # it in one Triton kernel where that runs (``hadamard``), else eager, as the simulated model
        self.online_impl = {name: hadamard.choice(m, self.device, self.dtype, self.fused)
                            for name, m in self.linears().items() if _online(m)}
        self._online_fused = {id(m) for name, m in self.linears().items()
                              if self.online_impl.get(name) == hadamard.KERNEL}
        self.online_timings: dict = {}  # choose_online's timings per transform width (perf records)
        self.graph_notes: list[str] = []
        self.batch = None

    # -- buffers -------------------------------------------------------------------------------

    def setup(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, new_tokens: int) -> None:
        """Allocate the static cache and input buffers for one batch shape (drops older graphs)."""
        self.release()
        B, T = input_ids.shape
        self.batch, self.prompt_len, self.new_tokens = B, T, new_tokens
        self.max_len = T + new_tokens
        dev, dt = self.device, self.dtype
        self.k_cache = [torch.zeros(B, self.n_kv, self.max_len, self.head_dim, device=dev, dtype=dt)
                        for _ in self.blocks]
        self.v_cache = [torch.zeros_like(k) for k in self.k_cache]
        self.input_ids = input_ids.to(dev).clone()
        # the picture(s): LLaVA-1.5's pixel_values, or the family's dict of image inputs
        self.images = {k: v.clone() for k, v in images_to(image_inputs(pixel_values), dev, dt).items()}
        self.pixel_values = self.images["pixel_values"]
        # multimodal RoPE: per-position cos/sin of the prompt and every later cache slot
        tabs = self.adapter.rope_tables(self.model, self.input_ids, self.images, self.max_len)
        self.rope_tab = None if tabs is None else tuple(t.to(dev, dt).contiguous() for t in tabs)
        img = (input_ids[0] == self.image_token).nonzero().flatten()
        if not bool((input_ids == self.image_token).sum(1).eq(len(img)).all()):
            raise ValueError("every row of the batch must hold the same number of image tokens")
        self.img_pos = img.to(dev)
        self.tok = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.prefill_pos = torch.arange(T, device=dev)
        self.kv_range = torch.arange(self.max_len, device=dev)
        vocab = self.head_w.shape[0]
        self.logits = torch.zeros(B, vocab, device=dev, dtype=torch.float32)
        self.feats = None
        self.graphs: dict[str, torch.cuda.CUDAGraph] = {}

    def release(self) -> None:
        for name in ("k_cache", "v_cache", "graphs", "feats", "logits", "input_ids", "pixel_values", "images",
                     "rope_tab"):
            if hasattr(self, name):
                delattr(self, name)
        self.batch = None

    # -- pieces --------------------------------------------------------------------------------

    def image_features(self, pixel_values) -> torch.Tensor:
        """``[B, image tokens, hidden]``: the family's vision tower + projector in float."""
        return self.adapter.image_features(self.vision, image_inputs(pixel_values)).to(self.dtype)

    def _layers(self, res: torch.Tensor, B: int, T: int, pos: torch.Tensor, decode: bool):
        """The decoder on ``res [B*T, hidden]`` (embeddings); returns the final-normed hidden."""
        g = self.glue
        rows = B * T
        if self.rope_tab is not None:  # per-row positions (M-RoPE): the table's rows at these slots
            cos, sin = (t.index_select(1, pos).reshape(rows, -1) for t in self.rope_tab)
        else:
            cos, sin = g["cos_sin"](pos, self.inv_freq, self.rope_scaling, self.dtype)
        if decode:
            if self.rope_tab is None:
                cos, sin = cos.expand(rows, -1), sin.expand(rows, -1)
            # additive mask built once per step (a boolean one is converted inside every attention call)
            mask = torch.where(self.kv_range <= pos, 0.0, float("-inf")).to(self.dtype)[None, None, None, :]
        elif self.rope_tab is None:
            cos, sin = cos.repeat(B, 1), sin.repeat(B, 1)
        cos, sin = cos[:, None, :], sin[:, None, :]
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        # the layers pick their kernel by row count (RealLinear.forward); the producers must agree
        phase = "decode" if rows <= real_mod.DECODE_MAX_ROWS else "prefill"
        delta = None
        for i, blk in enumerate(self.blocks):
            res, h = self._norm_into(res, delta, blk.ln1, blk.qkv, phase)
            qkv = blk.qkv(h)
            q = qkv[:, : H * D].view(rows, H, D)
            k = qkv[:, H * D: (H + KV) * D].view(rows, KV, D)
            v = qkv[:, (H + KV) * D:].view(rows, KV, D)
            q, k = g["rope"](q, k, cos, sin)
            q = q.view(B, T, H, D).transpose(1, 2)
            k = k.view(B, T, KV, D).transpose(1, 2)
            v = v.view(B, T, KV, D).transpose(1, 2)
            if decode:
                self.k_cache[i].index_copy_(2, pos, k)
                self.v_cache[i].index_copy_(2, pos, v)
                att = F.scaled_dot_product_attention(q, self.k_cache[i], self.v_cache[i], attn_mask=mask,
                                                     enable_gqa=KV != H)
            else:
                self.k_cache[i][:, :, :T].copy_(k)
                self.v_cache[i][:, :, :T].copy_(v)
                att = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=KV != H)
            mode = self._mode(blk.o, phase)
            if mode.kind == "float":  # the layer applies its online transform, if any, itself
                o = blk.o(att.transpose(1, 2).reshape(rows, H * D))
            elif _online(blk.o):  # the transform, then the quantizer (one kernel where it runs)
                o = blk.o(self.online_q(blk.o, att.transpose(1, 2), mode))
            else:
                o = blk.o(fused.rows_q(att.transpose(1, 2), blk.o.act, mode))
            res, h = self._norm_into(res, o, blk.ln2, blk.gate_up, phase)
            gu = blk.gate_up(h)
            mode = self._mode(blk.down, phase)
            if mode.kind == "float":
                delta = blk.down(g["silu_mul"](gu))
            elif _online(blk.down):
                delta = blk.down(self.online_q(blk.down, gu, mode, silu=True))
            else:
                delta = blk.down(fused.silu_mul_q(gu, blk.down.act, mode))
        res = res + delta
        return g["rms_norm"](res, self.norm_w, self.eps)

    def _mode(self, layer, phase: str) -> fused.InputMode:
        if not self.fused or not hasattr(layer, "input_mode"):
            return fused.FLOAT_INPUT
        return layer.input_mode(phase)

    def _norm_into(self, res, delta, w, layer, phase: str):
        """``(res + delta, rms_norm(...) * w)`` as ``layer``'s kernel takes it (delta None: no add)."""
        mode = self._mode(layer, phase)
        g = self.glue
        if mode.kind == "float":
            if delta is None:
                return res, g["rms_norm"](res, w, self.eps)
            return g["add_rms_norm"](res, delta, w, self.eps)
        if _online(layer):  # the transform sits between the norm and the quantizer
            res, h = (res, g["rms_norm"](res, w, self.eps)) if delta is None else g["add_rms_norm"](res, delta, w, self.eps)
            return res, self.online_q(layer, h, mode)
        return fused.add_rms_norm_q(res, delta, w, self.eps, layer.act, mode)

    def online_q(self, layer, x, mode: fused.InputMode, *, silu: bool = False):
        """``layer``'s input as its kernel takes it, for a layer with an online transform: the
        quantizer of ``transform(x)`` (``x``: rows, the attention output's ``[B, T, H, D]`` view, or
        with ``silu`` the gate/up output whose SiLU · up is the input). The fused Triton kernel where
        the engine chose it (``online_impl``), else the eager transform and the row quantizer."""
        if id(layer) in self._online_fused:
            return hadamard.hadamard_q(x, layer.online, layer.act, mode, silu=silu)
        return self._online_eager(layer, x, mode, silu)

    def _online_eager(self, layer, x, mode: fused.InputMode, silu: bool):
        h = self.glue["silu_mul"](x) if silu else x.reshape(-1, layer.in_features)
        return fused.rows_q(layer.transform(h), layer.act, mode)

    def choose_online(self, plan=None, timer=None) -> dict:
        """Per online-transform width, the fused kernel or the eager path, by timing both on inputs
        shaped as each phase produces them (``hadamard.choose``: CUDA-graph replays, the workload's
        ``sum(runs × time)``, fused preferred within ``select``'s 5 % margin). Run after the layers'
        kernels are chosen (their input modes) and before ``capture``. Only where the kernel can run
        and ``QVLM_ONLINE_HADAMARD`` forces nothing; on CUDA, or with ``timer`` (``hadamard.choose``'s;
        the CPU tests inject synthetic timings). ``plan``: ``select_kernels``' (default: decode at the
        batch's rows ``new_tokens`` times, prefill once). Sets ``online_impl`` and returns
        ``online_timings`` (per width: each phase's times, the costs and the choice)."""
        self.online_timings = {}
        cand = {name: m for name, m in self.linears().items() if self.online_impl.get(name) == hadamard.KERNEL}
        if not cand or hadamard.impl() != "auto" or (timer is None and self.device.type != "cuda"):
            return self.online_timings
        if plan is None:
            plan = [("decode", self.batch, float(self.new_tokens)), ("prefill", self.batch * self.prompt_len, 1.0)]
        groups: dict[str, list[str]] = {}
        for name, m in cand.items():
            role = name.rsplit(".", 1)[-1]
            how = {"o": "attention", "down": "silu·up"}.get(role, "rows")
            groups.setdefault(f"n={m.online.n} {how}", []).append(name)
        gen = torch.Generator(device=self.device).manual_seed(0)
        cases = {}
        with torch.no_grad():
            for key, names in groups.items():
                layer = cand[names[0]]
                n, how = layer.online.n, key.split(" ", 1)[1]
                phases = {}
                for ph, rows, _runs in plan:
                    mode = self._mode(layer, ph)
                    if mode.kind == "float":
                        continue
                    if how == "silu·up":
                        x = torch.randn(rows, 2 * n, generator=gen, device=self.device).to(self.dtype)
                    elif how == "attention":
                        H = self.n_heads
                        x = torch.randn(1, H, rows, n // H, generator=gen, device=self.device).to(
                            self.dtype).transpose(1, 2)
                    else:
                        x = torch.randn(rows, n, generator=gen, device=self.device).to(self.dtype)
                    silu = how == "silu·up"
                    phases[ph] = (
                        lambda x=x, m=mode, s=silu, l=layer: hadamard.hadamard_q(x, l.online, l.act, m, silu=s),
                        lambda x=x, m=mode, s=silu, l=layer: self._online_eager(l, x, m, s))
                cases[key] = phases
            self.online_timings = hadamard.choose(cases, plan, timer)
        for key, names in groups.items():
            rec = self.online_timings[key]
            rec["layers"] = len(names)
            pl = hadamard.plan(cand[names[0]].online.n)  # a Plan: every candidate is one the kernel covers
            for ph in rec["phases"].values():  # which form of the split dense stage the fused path ran
                if pl.m > 1:
                    ph["dense"] = hadamard._dense(ph["rows"], pl)
            if rec["choice"] != hadamard.KERNEL:
                why = (f"eager: timed faster ({rec['cost_eager_ms'] * 1e3:.1f} us vs fused "
                       f"{rec['cost_fused_ms'] * 1e3:.1f} us per generate, {key})")
                for name in names:
                    self.online_impl[name] = why
        self._online_fused = {id(m) for name, m in self.linears().items()
                              if self.online_impl.get(name) == hadamard.KERNEL}
        return self.online_timings

    def _vision(self) -> None:
        feats = self.image_features(self.images)
        if self.feats is None:
            self.feats = torch.empty_like(feats)
        self.feats.copy_(feats)

    def _prefill(self) -> None:
        B, T = self.input_ids.shape
        emb = F.embedding(self.input_ids, self.embed_w)
        emb = emb.index_copy(1, self.img_pos, self.feats)
        out = self._layers(emb.reshape(B * T, -1), B, T, self.prefill_pos, decode=False)
        last = out.view(B, T, -1)[:, -1]
        logits = F.linear(last, self.head_w, self.head_b)
        self.logits.copy_(logits.float())
        self.tok.copy_(logits.argmax(-1, keepdim=True))
        self.pos.fill_(T)

    def _decode(self) -> None:
        B = self.tok.shape[0]
        emb = F.embedding(self.tok, self.embed_w).reshape(B, -1)
        out = self._layers(emb, B, 1, self.pos, decode=True)
        logits = F.linear(out, self.head_w, self.head_b)
        self.logits.copy_(logits.float())
        self.tok.copy_(logits.argmax(-1, keepdim=True))
        self.pos.add_(1)

    # -- graphs ----------------------------------------------------------------------------------

    def capture(self, warmup: int = 2) -> None:
        """Run each phase eagerly (compile, autotune), then capture it as a CUDA graph."""
        with torch.no_grad():
            for _ in range(warmup):
                self._vision()
                self._prefill()
                self._decode()
            if not self.use_graphs:
                return
            torch.cuda.synchronize()
            pool = torch.cuda.graph_pool_handle()
            from ..kernels.real import sync_error

            for name, fn in (("vision", self._vision), ("prefill", self._prefill), ("decode", self._decode)):
                bad = sync_error(fn)  # a synchronizing op would break the capture (and the context)
                if bad:
                    self.graph_notes.append(f"{name}: synchronizes, runs eager: {bad}")
                    continue
                g = torch.cuda.CUDAGraph()
                try:
                    with torch.cuda.graph(g, pool=pool):
                        fn()
                    self.graphs[name] = g
                except Exception as exc:  # noqa: BLE001 - fall back to eager for this phase
                    self.graph_notes.append(f"{name}: graph capture failed, eager: {type(exc).__name__}: "
                                            f"{str(exc).splitlines()[0][:160] if str(exc) else ''}")
                    torch.cuda.synchronize()
            torch.cuda.synchronize()

    def run_phase(self, name: str) -> None:
        g = self.graphs.get(name) if self.use_graphs else None
        if g is not None:
            g.replay()
        else:
            with torch.no_grad():
                {"vision": self._vision, "prefill": self._prefill, "decode": self._decode}[name]()

    # -- user-level ------------------------------------------------------------------------------

    def generate(self, n_new: int | None = None) -> torch.Tensor:
        """Greedy tokens ``[B, n_new]`` from the current inputs (EOS ignored)."""
        n_new = self.new_tokens if n_new is None else n_new
        toks = []
        self.run_phase("vision")
        self.run_phase("prefill")
        toks.append(self.tok.clone())
        for _ in range(n_new - 1):
            self.run_phase("decode")
            toks.append(self.tok.clone())
        return torch.cat(toks, dim=1)

    def teacher_forced_logits(self, tokens: list[int]) -> torch.Tensor:
        """Logits after the prompt, then after feeding each of ``tokens``: ``[B, 1 + len, vocab]``."""
        self.run_phase("vision")
        self.run_phase("prefill")
        out = [self.logits.clone()]
        for t in tokens:
            self.tok.fill_(int(t))
            self.run_phase("decode")
            out.append(self.logits.clone())
        return torch.stack(out, dim=1)

    def linears(self) -> dict[str, nn.Module]:
        out = {}
        for i, b in enumerate(self.blocks):
            for k in ("qkv", "o", "gate_up", "down"):
                out[f"layers.{i}.{k}"] = getattr(b, k)
        return out

    def float_tensors(self) -> dict[str, torch.Tensor]:
        """The float tensors outside the decoder linears the engine computes with (memory figures)."""
        out = {"embed_tokens": self.embed_w, "lm_head": self.head_w, "norm": self.norm_w}
        if self.head_b is not None:
            out["lm_head.bias"] = self.head_b
        for i, b in enumerate(self.blocks):
            out[f"layers.{i}.ln1"], out[f"layers.{i}.ln2"] = b.ln1, b.ln2
        return out

    def vision_modules(self) -> list[nn.Module]:
        return [getattr(self.vision, c) for c in self.adapter.vision_children(self.model)]

    def tensors_in_use(self) -> set[int]:
        """``data_ptr`` of every tensor the engine reads (linears, float tensors, vision modules)."""
        ptrs = {t.data_ptr() for t in self.float_tensors().values()} | {self.inv_freq.data_ptr()}
        ptrs |= {t.data_ptr() for t in getattr(self, "rope_tab", None) or ()}
        for m in list(self.linears().values()) + self.vision_modules():
            for t in list(m.parameters()) + list(m.buffers()):
                if t is not None:
                    ptrs.add(t.data_ptr())
        return ptrs


def _online(layer) -> bool:
    return getattr(layer, "input_transform", None) is not None


def online_summary(impl: dict[str, str]) -> dict[str, int]:
    """How many layers apply their online transform each way (``LlavaEngine.online_impl``)."""
    out: dict[str, int] = {}
    for how in impl.values():
        out[how] = out.get(how, 0) + 1
    return out


# ---------------------------------------------------------------------------- building blocks

SIBLINGS = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            "o": ("self_attn.o_proj",),
            "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
            "down": ("mlp.down_proj",)}


class _Concat(nn.Module):
    """Fallback when siblings cannot share one kernel: run them one by one and concatenate."""

    def __init__(self, parts):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.out_features = sum(p.out_features for p in parts)

    def forward(self, x):
        return torch.cat([p(x) for p in self.parts], dim=-1)


def build_blocks(model: nn.Module, make_linear, *, fuse: bool = True) -> list[EngineLayer]:
    """``make_linear(path, nn.Linear-or-None) -> RealLinear`` for every decoder linear.

    q/k/v and gate/up are concatenated into one layer each when their formats agree.
    """
    from ..kernels.real import RealLinear

    lang_path, layers = language_layers(model)
    blocks = []
    for i, layer in enumerate(layers):
        prefix = f"{lang_path}.{i}"
        mods = {}
        for key, names in SIBLINGS.items():
            parts = []
            for n in names:
                path = f"{prefix}.{n}"
                try:
                    lin = model.get_submodule(path)
                except AttributeError:
                    lin = None
                parts.append(make_linear(path, lin))
            if len(parts) == 1:
                mods[key] = parts[0]
            elif fuse and RealLinear.can_concat(parts):
                mods[key] = RealLinear.concat(parts, name=f"{prefix}.{key}")
                del parts
            else:
                mods[key] = _Concat(parts)
        blocks.append(EngineLayer(ln1=layer.input_layernorm.weight,
                                  ln2=layer.post_attention_layernorm.weight,
                            **mods))
    return blocks


# ---------------------------------------------------------------------------- a state, whole

DECODER_LINEARS = tuple(n for names in SIBLINGS.values() for n in names)
NORM_PARAMS = ("input_layernorm.weight", "post_attention_layernorm.weight")


def model_paths(model: nn.Module) -> dict[str, str]:
    """Parameter paths of what the engine reads outside the decoder linears."""
    lang_path, _ = language_layers(model)
    root = lang_path.rsplit(".", 1)[0]
    names = {id(m): n for n, m in model.named_modules()}
    head = names[id(model.get_output_embeddings())]
    inner = model.model
    vision = {c: names[id(getattr(inner, c))] for c in adapter_for(model).vision_children(model)}
    return {"layers": lang_path, "embed": f"{root}.embed_tokens.weight", "norm": f"{root}.norm.weight",
            "head": f"{head}.weight", "head_bias": f"{head}.bias", "vision_children": vision}


def _decoder_entry(path: str, lang_path: str) -> tuple[int, str] | None:
    """``(layer index, rest)`` of a path inside the decoder layers, else None."""
    if not path.startswith(lang_path + "."):
        return None
    idx, _, rest = path[len(lang_path) + 1:].partition(".")
    return (int(idx), rest) if idx.isdigit() else None


def check_float_params(model: nn.Module, float_params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``float_params`` if the engine reads every one of them, else ``EngineStateError``: the
    embeddings, LM head, final norm, the decoder's RMSNorm weights, decoder linear weights and biases
    (``state_blocks`` applies those), and anything in the vision tower or projector."""
    paths = model_paths(model)
    top = {paths["embed"], paths["norm"], paths["head"], paths["head_bias"]}
    bad = []
    for path in float_params:
        if path in top or path.startswith(tuple(p + "." for p in paths["vision_children"].values())):
            continue
        entry = _decoder_entry(path, paths["layers"])
        if entry is not None and (entry[1] in NORM_PARAMS or entry[1].rsplit(".", 1)[0] in DECODER_LINEARS
                                  and entry[1].rsplit(".", 1)[1] in ("weight", "bias")):
            continue
        bad.append(path)
    if bad:
        raise EngineStateError(f"the state's float_params hold {len(bad)} tensor(s) the real-kernel engine does "
                               f"not read, e.g. {bad[:3]}: timing it would measure another model")
    return float_params


def check_state(model: nn.Module, state) -> None:
    """``EngineStateError`` for anything in ``state`` the engine cannot apply (module doc)."""
    if state is None:
        return
    paths = model_paths(model)
    bad = []
    for path, lq in state.linears.items():
        entry = _decoder_entry(path, paths["layers"])
        if entry is None or entry[1] not in DECODER_LINEARS:
            bad.append(f"{path}: a state entry outside the decoder's linears (the engine runs the vision tower, "
                       f"projector and LM head in float from float_params only)")
            continue
        if lq.codes is not None and f"{path}.weight" in state.float_params:
            bad.append(f"{path}: a float weight in float_params and codes: one of them would be ignored")
        if lq.codes is None and lq.weight is not None and f"{path}.weight" in state.float_params:
            bad.append(f"{path}: two float weights (the entry's and float_params')")
    if bad:
        raise EngineStateError(f"state of {state.method!r}: " + "; ".join(bad[:3])
                               + (f"; and {len(bad) - 3} more" if len(bad) > 3 else ""))
    check_float_params(model, state.float_params)


def state_blocks(model: nn.Module, state, *, device, dtype, fuse: bool = True) -> list[EngineLayer]:
    """The decoder's deployed layers for ``state`` (None: the float model): codes, scales, zero
    points, activation quantizers and online transforms of its entries, and its float weights and
    biases for the decoder linears. Checks the whole state first (``check_state``); pass
    ``state.float_params`` to ``LlavaEngine`` for the rest."""
    from ..kernels.real import RealLinear
    from ..quant.state import LinearQuant

    check_state(model, state)
    fp = {} if state is None else state.float_params

    def make(path, lin):
        lq = None if state is None else state.linears.get(path)
        if lq is None:
            if lin is None:
                raise ValueError(f"{path}: neither in the state nor in the model")
            lq = LinearQuant(bits=16)
        try:
            return RealLinear.from_quant(lq, lin, device=device, dtype=dtype, name=path,
                                         weight=fp.get(f"{path}.weight"), bias=fp.get(f"{path}.bias"))
        except UnsupportedTransform as exc:
            raise EngineStateError(f"{path}: {exc}") from None
    return build_blocks(model, make, fuse=fuse)


def _load_into(module: nn.Module, values: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``module`` holding ``values`` (paths relative to it)."""
    new = copy.deepcopy(module)
    with torch.no_grad():
        for name, value in values.items():
            p = new.get_parameter(name)
            p.copy_(value.to(device=p.device, dtype=p.dtype))
    return new


def _vision_model(model: nn.Module, fp: dict, paths: dict):
    """The vision tower and projector the engine runs (the family's ``vision_children`` of
    ``model.model``): the model's own, or copies that hold the state's values (the float model
    stays as it is for other variants)."""
    inner = model.model
    over = {}
    for attr, path in paths["vision_children"].items():
        pre = path + "."
        vals = {k[len(pre):]: v for k, v in fp.items() if k.startswith(pre)}
        if vals:
            over[attr] = _load_into(getattr(inner, attr), vals)
    if not over:
        return inner
    shell = copy.copy(inner)  # the same modules but the overridden ones
    object.__setattr__(shell, "_modules", {**inner._modules, **over})
    return shell
