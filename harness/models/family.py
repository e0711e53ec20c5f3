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

from torch import nn

from .layers import language_layers, vision_layers


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
        return language_layers(model)

    def vision_layers(self, model: nn.Module) -> tuple[str, nn.ModuleList]:
        return vision_layers(model)

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

    def scale_groups(self, layer: nn.Module) -> list[ScaleGroup]:
        """The scale groups of one decoder or vision layer (model order)."""
        raise NotImplementedError

    def residual_writers(self, layer: nn.Module) -> list[str]:
        """Linears of a decoder layer whose outputs are added to the residual stream."""
        raise NotImplementedError

    def image_token_id(self, model: nn.Module) -> int | None:
        cfg = model.config
        for key in ("image_token_index", "image_token_id"):
            value = getattr(cfg, key, None)
            if value is not None:
                return int(value)
        return None


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


@register_adapter
class LlavaAdapter(ModelAdapter):
    """LLaVA-1.5 (``LlavaForConditionalGeneration``): a Llama decoder, a CLIP vision tower and a
    two-layer MLP projector; transformers 5 module paths."""

    name = "llava-1.5"
    summary = "LlavaForConditionalGeneration: Llama decoder, CLIP ViT, MLP projector"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return getattr(model.config, "model_type", None) == "llava"

    def embeddings(self, model):
        return self.language_layers(model)[0].rsplit(".", 1)[0] + ".embed_tokens"

    def final_norm(self, model):
        return self.language_layers(model)[0].rsplit(".", 1)[0] + ".norm"

    def lm_head(self, model):
        return "lm_head"

    def projector_writers(self, model):
        names = [n for n, m in model.named_modules()
                 if "multi_modal_projector" in n and isinstance(m, nn.Linear)]
        return names[-1:]

    def scale_groups(self, layer):
        groups: list[ScaleGroup] = []
        if _has(layer, "input_layernorm") and _has(layer, "mlp.gate_proj"):  # Llama decoder
            attn = layer.self_attn
            groups.append(ScaleGroup("input_layernorm",
                                     ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                                     "self_attn"))
            if attn.v_proj.out_features == attn.o_proj.in_features:  # no GQA: v's rows feed o
                groups.append(ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",)))
            groups.append(ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"))
            groups.append(ScaleGroup("mlp.up_proj", ("mlp.down_proj",)))
        elif _has(layer, "layer_norm1") and _has(layer, "mlp.fc1"):  # CLIP encoder layer
            attn = layer.self_attn
            groups.append(ScaleGroup("layer_norm1",
                                     ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                                     "self_attn"))
            if attn.v_proj.out_features == attn.out_proj.in_features:
                groups.append(ScaleGroup("self_attn.v_proj", ("self_attn.out_proj",)))
            # fc2 follows quick_gelu, through which no scale folds
            groups.append(ScaleGroup("layer_norm2", ("mlp.fc1",)))
        else:
            raise UnknownFamilyError(f"{self.name}: no scale groups for a {type(layer).__name__}")
        return groups

    def residual_writers(self, layer):
        return ["self_attn.o_proj", "mlp.down_proj"]
