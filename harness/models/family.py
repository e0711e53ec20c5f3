"""What a method needs to know about a model family, in one adapter per family.

Methods ask the adapter (``adapter_for(model)``), never a class name, so a method written once runs
on every family an adapter exists for: where the decoder and vision layers are, which norm or
linear feeds which linears (the *scale groups* through which a per-channel scale folds exactly),
which linears read and write the language model's residual stream (what a rotation must touch),
and which token id marks image features.

A new family is one more ``ModelAdapter`` subclass registered with ``@register_adapter``; an
unknown family is an error naming the ones there are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .parts import part_of as part_by_name


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that read the output of one module ``prev`` (a norm, or a linear whose output rows
    feed them directly): a per-input-channel scale ``s`` folds exactly as ``prev / s`` and
    ``linear.weight * s``. ``inspect`` is the module whose output error measures the group
    (``None``: the single linear itself). Paths are local to the transformer layer."""

    prev: str
    linears: tuple[str, ...]
    inspect: str | None = None

    @property
    def key(self) -> str:
        return "+".join(n.split(".")[-1] for n in self.linears)

    @property
    def after_norm(self) -> bool:
        """True when ``prev`` is a norm (the groups SmoothQuant smooths and QuaRot's norm fusion
        covers), False when it is a linear (v → o, up → down)."""
        return "norm" in self.prev.split(".")[-1]


class UnknownFamilyError(ValueError):
    pass


def _module_list(model: nn.Module, must_contain: str) -> tuple[str, nn.ModuleList]:
    """The shortest ``*<must_contain>*layers`` module list: the name-based rule, located by module
    path and type rather than by attribute chains, so it follows the model through transformers'
    refactorings (``model.language_model.layers`` in v5, ``language_model.model.layers`` before)."""
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and must_contain in n and n.endswith("layers")]
    if not found:
        raise ValueError(f"no transformer layer list under a module named like '*{must_contain}*' "
                         f"in {type(model).__name__}")
    return min(found, key=lambda nm: len(nm[0]))


def language_layers_by_name(model: nn.Module) -> tuple[str, nn.ModuleList]:
    return _module_list(model, "language_model")


def vision_layers_by_name(model: nn.Module) -> tuple[str, nn.ModuleList]:
    return _module_list(model, "vision_tower")


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


class ModelAdapter:
    """Where a family keeps its parts. Subclasses set ``name`` and override what differs."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether ``model`` is of this family; looks at ``model.config`` only, so that a
        family is known from a config before any weight is loaded (``adapter_for_config``)."""
        raise NotImplementedError

    # -- layers -----------------------------------------------------------------------------------
    def language_layers(self, model: nn.Module) -> tuple[str, nn.ModuleList]:
        return language_layers_by_name(model)

    def vision_layers(self, model: nn.Module) -> tuple[str, nn.ModuleList]:
        return vision_layers_by_name(model)

    def part_of(self, name: str) -> str | None:
        """Which quantizable part (``harness.models.parts.PARTS``) the linear at ``name`` belongs
        to; the path rules of ``parts.part_of`` unless a family's paths need its own."""
        return part_by_name(name)

    def processor_kwargs(self, config) -> dict:
        """Settings the evaluation protocol puts on the family's processor over the checkpoint's
        saved ones (docs/protocols.md, "Model families"); none unless a family needs them."""
        return {}

    def text_position_ids(self, model: nn.Module) -> bool:
        """Whether a batch may carry plain 1-D ``position_ids`` (real tokens counted, left
        padding skipped). False for multimodal RoPE (Qwen2-VL's M-RoPE): the model computes its
        3-D positions from the input ids and image grid, and given 1-D ones would use them."""
        return True

    def layer_kwargs_vary(self, model: nn.Module, part: str) -> bool:
        """Whether the layers of ``part`` ("language" | "vision") receive different keyword
        arguments (Qwen2.5-VL's vision blocks: window attention in most, full attention in
        some), so block-wise methods must capture every layer's own, not reuse the first's."""
        return False

    # -- the language model's residual stream -----------------------------------------------------
    def embeddings(self, model: nn.Module) -> str:
        """Path of the token embedding (writes the residual stream)."""
        raise NotImplementedError

    def final_norm(self, model: nn.Module) -> str:
        raise NotImplementedError

    def lm_head(self, model: nn.Module) -> str:
        raise NotImplementedError

    def projector_writers(self, model: nn.Module) -> list[str]:
        """Linears whose outputs become language-model input embeddings (image features)."""
        raise NotImplementedError

    def projector(self, model: nn.Module) -> str:
        """Path of the module that maps vision features to language-model embeddings (its input
        is the vision encoder's output): ``multi_modal_projector`` unless a family says otherwise."""
        found = [n for n, _ in model.named_modules() if n.split(".")[-1] == "multi_modal_projector"]
        if not found:
            raise ValueError(f"{self.name}: no multi_modal_projector in {type(model).__name__}")
        return min(found, key=len)

    def scale_groups(self, layer: nn.Module) -> list[ScaleGroup]:
        """The scale groups of one decoder or vision layer (model order)."""
        raise NotImplementedError

    def residual_writers(self, layer: nn.Module) -> list[str]:
        """Linears of a decoder layer whose outputs are added to the residual stream."""
        raise NotImplementedError

    def tied_lm_head(self, model: nn.Module) -> bool:
        """Whether ``lm_head`` shares its weight with the token embedding (small Qwen2 decoders:
        Qwen2.5-VL-3B, InternVL3-1B/2B): a transform of one is a transform of the other, so a
        rotation must untie them (or treat them as one)."""
        head = model.get_submodule(self.lm_head(model))
        emb = model.get_submodule(self.embeddings(model))
        return head.weight is emb.weight

    def image_token_id(self, model: nn.Module) -> int | None:
        cfg = model.config
        for key in ("image_token_index", "image_token_id"):
            value = getattr(cfg, key, None)
            if value is not None:
                return int(value)
        return None

    def image_tokens(self, model: nn.Module, processor, image) -> int:
        """How many language-model positions (image features) one picture becomes, as this
        family's processor expands it (fixed for LLaVA-1.5, resolution-dependent for the others)."""
        from ..prompting import chat_prompt

        enc = processor(images=[image], text=[chat_prompt(processor, "x")], return_tensors="pt")
        return int((enc["input_ids"] == self.image_token_id(model)).sum())


    # -- what the real-kernel perf engine (harness/perf/engine.py) asks of a family ----------------
    # One synthetic picture per prompt, its vision features, the model's forward inputs and the
    # rotary tables: what differs per family outside the decoder linears.

    def text_config(self, config):
        """The language model's config (hidden size, heads, kv heads, RMSNorm eps, rope)."""
        return config.text_config

    def vision_children(self, model: nn.Module) -> tuple[str, ...]:
        """Names of the children of ``model.model`` the perf engine runs in float to turn pixels
        into language-model embeddings (a state's float values for them are applied to copies)."""
        return ("vision_tower", "multi_modal_projector")

    def synthetic_image(self, config, generator, image_size: int | None = None) -> tuple[dict, int]:
        """``(image inputs, image tokens)`` of one random normalised picture for a systems
        benchmark: the tensors the model's forward takes besides ``input_ids`` (batch of one,
        leading dimension per image) and how many image-token positions the prompt must hold.
        LLaVA-1.5: one ``image_size`` square, one token per patch (plus CLS for ``full``)."""
        vc = config.vision_config
        side = vc.image_size
        if image_size not in (None, side):
            raise ValueError(f"{self.name}: the image is {side} px (fixed); got image_size={image_size}")
        n = (side // vc.patch_size) ** 2
        if getattr(config, "vision_feature_select_strategy", "default") == "full":
            n += 1
        pix = torch.randn(1, 3, side, side, generator=generator)
        return {"pixel_values": pix}, n

    def forward_inputs(self, model: nn.Module, input_ids: torch.Tensor, image_inputs: dict) -> dict:
        """Keyword arguments of ``model(...)`` for a prompt (or a prompt and greedy tokens
        appended after it) holding the picture(s) of ``image_inputs``."""
        return {"input_ids": input_ids, **image_inputs}

    def image_features(self, inner: nn.Module, image_inputs: dict) -> torch.Tensor:
        """The language-model embeddings of the pictures, ``[batch, image tokens, hidden]``, as
        the model merges them at the image-token positions (``inner``: ``model.model`` or a copy
        holding a state's vision values)."""
        cfg = inner.config
        out = inner.get_image_features(**image_inputs, vision_feature_layer=cfg.vision_feature_layer,
                                       vision_feature_select_strategy=cfg.vision_feature_select_strategy)
        return _stack_features(out)

    def rope_tables(self, model: nn.Module, input_ids: torch.Tensor, image_inputs: dict,
                    max_len: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-position rotary ``(cos, sin)`` ``[batch, max_len, head_dim]`` (float32) for a prompt
        ``input_ids`` followed by ``max_len - T`` generated tokens, where positions are not simply
        0, 1, 2, ... (multimodal RoPE); None for 1-D RoPE (the engine computes it from the
        rotary module's ``inv_freq``)."""
        return None


def _stack_features(out) -> torch.Tensor:
    """``get_image_features``' output (a tensor, a ``pooler_output`` or per-image pieces) as one
    ``[batch, tokens, hidden]`` tensor."""
    if hasattr(out, "pooler_output"):
        out = out.pooler_output
    if isinstance(out, (list, tuple)):
        out = torch.stack(list(out))
    return out


_ADAPTERS: list[type[ModelAdapter]] = []


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    _ADAPTERS.append(cls)
    return cls


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter of ``model``'s family, or an error naming the families there are."""
    for cls in _ADAPTERS:
        if cls.matches(model):
            return cls()
    names = ", ".join(c.name for c in _ADAPTERS)
    raise UnknownFamilyError(
        f"no model adapter for {type(model).__name__} (model_type "
        f"{getattr(model.config, 'model_type', '?')!r}); supported families: {names}. Add a "
        "ModelAdapter subclass in harness/models/family.py (see LlavaAdapter) to support it.")


def adapter_for_config(config) -> ModelAdapter:
    """The adapter for a model with this transformers config, before the model exists (an
    adapter's ``matches`` looks at ``model.config`` only); the same error as ``adapter_for``."""
    from types import SimpleNamespace

    shell = SimpleNamespace(config=config)
    for cls in _ADAPTERS:
        if cls.matches(shell):
            return cls()
    raise UnknownFamilyError(
        f"no model adapter for model_type {getattr(config, 'model_type', '?')!r} "
        f"({', '.join(getattr(config, 'architectures', None) or []) or 'no architectures'}); supported "
        f"families: {', '.join(c.name for c in _ADAPTERS)}. Add a ModelAdapter subclass in "
        "harness/models/family.py (see LlavaAdapter) to support it.")


def scale_groups_of(layer: nn.Module) -> list[ScaleGroup]:
    """The scale groups of a transformer layer, from the first adapter that knows its type
    (for code that holds a layer, not the model)."""
    for cls in _ADAPTERS:
        try:
            return cls().scale_groups(layer)
        except UnknownFamilyError:
            continue
    raise UnknownFamilyError(f"no adapter knows the scale groups of a {type(layer).__name__}; "
                             f"families: {', '.join(c.name for c in _ADAPTERS)}")


def available_families() -> dict[str, str]:
    return {c.name: c.summary for c in _ADAPTERS}


# ---- scale groups by layer structure (shared by the families whose layers share it) -------------

def _attn_groups(layer, norm: str, attn: str, q: str, k: str, v: str, o: str) -> list[ScaleGroup]:
    groups = [ScaleGroup(norm, (f"{attn}.{q}", f"{attn}.{k}", f"{attn}.{v}"), attn)]
    a = layer.get_submodule(attn)
    if getattr(a, v).out_features == getattr(a, o).in_features:  # no GQA: v's rows feed o
        groups.append(ScaleGroup(f"{attn}.{v}", (f"{attn}.{o}",)))
    return groups


def decoder_groups(layer) -> list[ScaleGroup] | None:
    """Llama / Qwen2 decoder layer (q/k/v biases in Qwen2 are outputs: they do not move)."""
    if not (_has(layer, "input_layernorm") and _has(layer, "mlp.gate_proj")):
        return None
    return (_attn_groups(layer, "input_layernorm", "self_attn", "q_proj", "k_proj", "v_proj", "o_proj")
            + [ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
               ScaleGroup("mlp.up_proj", ("mlp.down_proj",))])


def clip_groups(layer) -> list[ScaleGroup] | None:
    """CLIP / SigLIP encoder layer; fc2 follows a GELU, through which no scale folds."""
    if not (_has(layer, "layer_norm1") and _has(layer, "mlp.fc1")):
        return None
    return (_attn_groups(layer, "layer_norm1", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj")
            + [ScaleGroup("layer_norm2", ("mlp.fc1",))])


def qwen_vision_groups(layer) -> list[ScaleGroup] | None:
    """Qwen2-VL / Qwen2.5-VL vision block: a fused ``attn.qkv`` (so no v → proj group: a scale
    would have to divide v's third of qkv's rows only), then a GELU MLP (Qwen2-VL: fc1/fc2) or
    a gated one with biases (Qwen2.5-VL: gate/up/down, where up's rows feed down)."""
    if not (_has(layer, "norm1") and _has(layer, "attn.qkv")):
        return None
    groups = [ScaleGroup("norm1", ("attn.qkv",), "attn")]
    if _has(layer, "mlp.gate_proj"):
        groups += [ScaleGroup("norm2", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
                   ScaleGroup("mlp.up_proj", ("mlp.down_proj",))]
    else:
        groups.append(ScaleGroup("norm2", ("mlp.fc1",)))
    return groups


def internvl_vision_groups(layer) -> list[ScaleGroup] | None:
    """InternViT layer: the attention output is multiplied by ``lambda_1`` after
    ``projection_layer`` (a per-channel output scale: the v → projection fold is unaffected);
    q/k norms, where present, act on q/k's outputs, not their inputs."""
    if not (_has(layer, "layernorm_before") and _has(layer, "attention.q_proj")):
        return None
    return (_attn_groups(layer, "layernorm_before", "attention", "q_proj", "k_proj", "v_proj",
                         "projection_layer")
            + [ScaleGroup("layernorm_after", ("mlp.fc1",))])


class _LlavaLike(ModelAdapter):
    """A ``model.language_model`` decoder with ``embed_tokens``/``norm``, an untied-or-tied
    ``lm_head`` and a ``multi_modal_projector`` whose last linear writes image features."""

    LAYER_GROUPS: ClassVar[tuple] = (decoder_groups, clip_groups)
    MODEL_TYPES: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return getattr(model.config, "model_type", None) in cls.MODEL_TYPES

    def embeddings(self, model):
        return self.language_layers(model)[0].rsplit(".", 1)[0] + ".embed_tokens"

    def final_norm(self, model):
        return self.language_layers(model)[0].rsplit(".", 1)[0] + ".norm"

    def lm_head(self, model):
        return "lm_head"

    def projector_writers(self, model):
        names = [n for n, m in model.named_modules()
                 if self.part_of(n) == "projector" and isinstance(m, nn.Linear)]
        return names[-1:]

    def scale_groups(self, layer):
        for find in self.LAYER_GROUPS:
            groups = find(layer)
            if groups is not None:
                return groups
        raise UnknownFamilyError(f"{self.name}: no scale groups for a {type(layer).__name__}")

    def residual_writers(self, layer):
        return ["self_attn.o_proj", "mlp.down_proj"]


@register_adapter
class LlavaAdapter(_LlavaLike):
    """LLaVA-1.5 (``LlavaForConditionalGeneration``): a Llama decoder, a CLIP vision tower and a
    two-layer MLP projector; transformers 5 module paths."""

    name = "llava-1.5"
    summary = "LlavaForConditionalGeneration: Llama decoder, CLIP ViT, MLP projector"
    MODEL_TYPES = ("llava",)


@register_adapter
class LlavaNextAdapter(_LlavaLike):
    """LLaVA-NeXT / llava-v1.6 (``LlavaNextForConditionalGeneration``): LLaVA-1.5's parts, with
    any-resolution tiling (a base view plus tiles from ``image_grid_pinpoints``, and a learned
    ``image_newline`` row separator), so a picture's token count depends on its size."""

    name = "llava-next"
    summary = "LlavaNextForConditionalGeneration (llava-v1.6): Llama/Mistral decoder, CLIP ViT, any-res tiles"
    MODEL_TYPES = ("llava_next",)

    def synthetic_image(self, config, generator, image_size=None):
        raise NotImplementedError(f"{self.name}: the perf engine has no synthetic picture for its any-res "
                                  "tiles yet (ModelAdapter.synthetic_image; see LlavaOnevisionAdapter's)")


@register_adapter
class LlavaOnevisionAdapter(_LlavaLike):
    """LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): a Qwen2 decoder (q/k/v
    biases, grouped-query attention), a SigLIP vision tower, any-resolution tiles."""

    name = "llava-onevision"
    summary = "LlavaOnevisionForConditionalGeneration: Qwen2 decoder, SigLIP ViT, any-res tiles"
    MODEL_TYPES = ("llava_onevision",)

    def synthetic_image(self, config, generator, image_size=None):
        """One ``image_size`` square picture (default: the vision tower's resolution, 384 px for
        SigLIP-so400m): the base view plus its any-resolution tiles (``image_grid_pinpoints``),
        ``[1, tiles + 1, 3, S, S]``, and the tokens the processor expands it to (base features,
        unpadded tile features, one ``image_newline`` per tile row; ``anyres_max_N`` pooling)."""
        import math

        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches
        from transformers.image_processing_utils import select_best_resolution

        vc = config.vision_config
        S, side = vc.image_size, image_size or vc.image_size
        pins = config.image_grid_pinpoints
        n_patches = image_size_to_num_patches((side, side), pins, S)
        per = S // vc.patch_size  # features per side of one view
        bh, bw = select_best_resolution((side, side), pins)
        # as LlavaOnevisionProcessor._get_number_of_features (square picture: no unpadding)
        cur_h, cur_w = per * (bh // S), per * (bw // S)
        if 1.0 > cur_w / cur_h:  # the picture's aspect (1) against the grid's: unpad the longer side
            cur_h -= (cur_h - int(round(side * (cur_w / side), 7))) // 2 * 2
        else:
            cur_w -= (cur_w - int(round(side * (cur_h / side), 7))) // 2 * 2
        unpadded, newline = cur_h * cur_w, cur_h
        max_n = int(getattr(config, "vision_aspect_ratio", "anyres_max_9").strip("anyres_max_"))
        ratio = math.sqrt(cur_h * cur_w / (max_n * per ** 2))
        if ratio > 1.1:
            unpadded, newline = int(cur_h // ratio) * int(cur_w // ratio), int(cur_h // ratio)
        n = per * per + unpadded + newline
        pix = torch.randn(1, n_patches, 3, S, S, generator=generator)
        return {"pixel_values": pix, "image_sizes": torch.tensor([[side, side]])}, n

    def image_features(self, inner, image_inputs):
        cfg = inner.config
        out = inner.get_image_features(**image_inputs, vision_feature_layer=cfg.vision_feature_layer,
                                       vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                       vision_aspect_ratio=cfg.vision_aspect_ratio)
        return _stack_features(out)


@register_adapter
class Qwen2VLAdapter(_LlavaLike):
    """Qwen2-VL / Qwen2.5-VL (``Qwen2VLForConditionalGeneration``,
    ``Qwen2_5_VLForConditionalGeneration``): a Qwen2 decoder with multimodal RoPE (3-D
    positions), a native-resolution ViT whose layers are ``model.visual.blocks`` (fused qkv;
    Qwen2.5-VL: RMSNorm, gated MLP, window attention) and a patch merger
    ``model.visual.merger`` (2×2 patches → one token) as the projector."""

    name = "qwen2.5-vl"
    summary = "Qwen2_5_VL/Qwen2VLForConditionalGeneration: Qwen2 decoder (M-RoPE), native-res ViT, patch merger"
    LAYER_GROUPS = (decoder_groups, qwen_vision_groups)
    MODEL_TYPES = ("qwen2_5_vl", "qwen2_vl")

    def vision_layers(self, model):
        found = [(n, m) for n, m in model.named_modules()
                 if isinstance(m, nn.ModuleList) and n.split(".")[-2:] == ["visual", "blocks"]]
        if not found:
            raise ValueError(f"no visual.blocks in {type(model).__name__}")
        return found[0]

    def projector(self, model):
        return self.vision_layers(model)[0].rsplit(".", 1)[0] + ".merger"

    # lmms-eval's qwen2_5_vl model: min_pixels 256·28², max_pixels 1,605,632 = 2048·28² (the Hub
    # processor's own bounds are 4·28² and 16384·28²), i.e. 256 to 2048 visual tokens
    LMMS_EVAL_TOKENS = (256, 2048)

    def processor_kwargs(self, config):
        vc = getattr(config, "vision_config", None)
        unit = getattr(vc, "patch_size", 0) * getattr(vc, "spatial_merge_size", 0)
        if unit != 28:  # only Qwen's own geometry (tiny test folders keep their small bounds)
            return {}
        lo, hi = self.LMMS_EVAL_TOKENS
        return {"min_pixels": lo * unit * unit, "max_pixels": hi * unit * unit}

    def text_position_ids(self, model):
        return False

    def layer_kwargs_vary(self, model, part):
        vc = getattr(model.config, "vision_config", None)
        full = list(getattr(vc, "fullatt_block_indexes", None) or [])
        depth = getattr(vc, "depth", 0)
        # Qwen2.5-VL: window attention except in fullatt_block_indexes (Qwen2-VL has none)
        return part == "vision" and bool(full) and len(full) < depth

    # the perf engine: M-RoPE positions, native-resolution patches

    PERF_IMAGE_UNITS = 24  # merged tokens per side of the default picture: 576 image tokens, as LLaVA-1.5

    def vision_children(self, model):
        return ("visual",)  # the ViT and its patch merger (``visual.merger``, the projector)

    def synthetic_image(self, config, generator, image_size=None):
        """One square picture of ``image_size`` px (a multiple of patch x merge, 28 for Qwen;
        default ``PERF_IMAGE_UNITS`` merged tokens per side: 672 px, 576 tokens), as the
        processor hands it to the model: flattened patches ``[t*h*w, 3*temporal*patch*patch]``
        (a still picture repeats over the temporal patch) and ``image_grid_thw`` ``[[1, h, w]]``."""
        vc = config.vision_config
        p, m, tp = vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size
        unit = p * m
        side = image_size or self.PERF_IMAGE_UNITS * unit
        if side % unit:
            raise ValueError(f"{self.name}: image_size {side} is not a multiple of patch x merge = {unit}")
        g = side // p
        in_ch = getattr(vc, "in_channels", None) or getattr(vc, "in_chans", 3)
        pix = torch.randn(g * g, in_ch * tp * p * p, generator=generator)
        return {"pixel_values": pix, "image_grid_thw": torch.tensor([[1, g, g]])}, g * g // (m * m)

    def forward_inputs(self, model, input_ids, image_inputs):
        # transformers 5 computes the 3-D positions only when told which tokens are image tokens
        mm = (input_ids == self.image_token_id(model)).to(torch.int64)
        return {"input_ids": input_ids, "mm_token_type_ids": mm, **image_inputs}

    def image_features(self, inner, image_inputs):
        out = inner.get_image_features(image_inputs["pixel_values"], image_inputs["image_grid_thw"])
        return _stack_features(out)

    def rope_tables(self, model, input_ids, image_inputs, max_len):
        """M-RoPE: the model's own 3-D positions of the prompt (``get_rope_index``: temporal,
        height, width for image tokens, text after the picture continuing from its largest
        position), then generated tokens at ``t + rope_deltas`` in all three sections; its rotary
        module turns them into cos/sin merged by ``mrope_section``."""
        inner = model.model
        kw = self.forward_inputs(model, input_ids, image_inputs)
        pos, deltas = inner.get_rope_index(input_ids, mm_token_type_ids=kw["mm_token_type_ids"],
                                           image_grid_thw=image_inputs.get("image_grid_thw"))
        B, T = input_ids.shape
        nxt = torch.arange(T, max_len, device=pos.device)[None, :] + deltas.to(pos.device)  # [B, new]
        pos = torch.cat([pos, nxt[None].expand(3, B, -1)], dim=-1)
        rot = inner.language_model.rotary_emb
        probe = torch.empty(0, dtype=torch.float32, device=pos.device)
        cos, sin = rot(probe, pos)
        return cos.float(), sin.float()


@register_adapter
class InternVLAdapter(_LlavaLike):
    """InternVL3 in transformers' own classes (``InternVLForConditionalGeneration``; the
    ``OpenGVLab/InternVL3-*-hf`` checkpoints): a Qwen2 decoder, an InternViT vision tower whose
    layers are ``vision_tower.encoder.layer`` (layer scales ``lambda_1/2``), pixel shuffle
    (½ downsampling) and a LayerNorm + MLP projector."""

    name = "internvl3"
    summary = "InternVLForConditionalGeneration (InternVL3 -hf): Qwen2 decoder, InternViT, pixel-shuffle MLP projector"
    LAYER_GROUPS = (decoder_groups, internvl_vision_groups)
    MODEL_TYPES = ("internvl",)

    def synthetic_image(self, config, generator, image_size=None):
        raise NotImplementedError(f"{self.name}: the perf engine has no synthetic picture for its tiles and "
                                  "pixel shuffle yet (ModelAdapter.synthetic_image)")

    def vision_layers(self, model):
        found = [(n, m) for n, m in model.named_modules()
                 if isinstance(m, nn.ModuleList) and n.endswith("vision_tower.encoder.layer")]
        if not found:
            raise ValueError(f"no vision_tower.encoder.layer in {type(model).__name__}")
        return found[0]
