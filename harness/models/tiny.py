"""Build small LLaVA-architecture checkpoints offline.

Real LLaVA weights cannot be downloaded on the machines this project runs on, so tests and the
bundled default model use checkpoints built here: a real ``LlavaForConditionalGeneration``
(CLIP vision tower, projector, Llama decoder) with a word-level tokenizer and a ``LlavaProcessor``
carrying LLaVA-1.5's conversation format. They are saved in Hugging Face format and loaded by the
same code path as ``llava-hf`` checkpoints.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

# LLaVA-1.5's prompt format ("USER: <image>\n{prompt} ASSISTANT:"), as llava-hf's processor renders it.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}"
    "{% if message['role'] == 'user' %} {% else %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
# Words every tiny vocabulary needs: the chat template, option letters, digits, punctuation.
BASE_WORDS = (
    ["USER", "ASSISTANT", "Context", "Answer", "answer", "The", "the", "is", "with", "option's",
     "letter", "from", "given", "choices", "directly", "question", "using", "a", "single", "word",
     "or", "phrase", "When", "provided", "information", "insufficient", "respond", "Unanswerable",
     "unanswerable", "yes", "no", "Yes", "No"]
    + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    + [str(d) for d in range(0, 21)]
    + list(".,:;?!'\"()-/")
)

_WORD_RE = re.compile(r"\w+|[^\w\s]")


def words_in(texts: Iterable[str]) -> list[str]:
    """The word-level tokens a text corpus needs (same split as the tokenizer's pre-tokenizer)."""
    seen: dict[str, None] = {}
    for text in texts:
        for w in _WORD_RE.findall(text):
            seen.setdefault(w, None)
    return list(seen)


@dataclass
class TinyLlavaSpec:
    """Shape of a tiny LLaVA. Defaults make a ~1M-parameter model that runs in milliseconds on CPU."""

    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    vision_intermediate: int = 128
    image_size: int = 32
    patch_size: int = 8
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 4
    text_intermediate: int = 128
    max_positions: int = 512
    extra_words: list[str] = field(default_factory=list)
    seed: int = 0


def build_tokenizer(words: Iterable[str], special: Iterable[str] = (), *, eos_token: str = "</s>",
                    named: dict[str, str] | None = None):
    """A word-level fast tokenizer; LLaVA's special tokens (and a family's ``special`` ones) are
    atomic and left padding is the default. ``named``: extra special tokens the processor reads
    as tokenizer attributes (InternVL's ``context_image_token``...)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys(SPECIAL_TOKENS + list(special) + list((named or {}).values())))
    vocab: dict[str, int] = {t: i for i, t in enumerate(specials)}
    for w in list(BASE_WORDS) + list(words):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    kwargs = {"extra_special_tokens": dict(named)} if named else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token=eos_token,
        pad_token="<pad>",
        padding_side="left",
        **kwargs,
    )


def build_tiny_llava(out_dir: str | Path, spec: TinyLlavaSpec | None = None,
                     dtype: torch.dtype | None = None) -> Path:
    """Create a randomly initialised tiny LLaVA (model + processor) in ``out_dir`` and return the path.
    ``dtype``: the weights' stored dtype (default float32; the bundled models are float16)."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    spec = spec or TinyLlavaSpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec.extra_words)
    vocab_size = len(tokenizer)
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        vocab_size=vocab_size,
        max_position_embeddings=spec.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    n_patches = (spec.image_size // spec.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=n_patches,  # "default" strategy drops CLS: one token per patch
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(spec.seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    if dtype is not None:
        model.to(dtype)
        model.config.dtype = str(dtype).removeprefix("torch.")
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
        image_token="<image>",
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


# ---- the other families (harness.models.family): tiny random folders, built offline ---------------

# Chat formats as the families' Hub processors render one user turn with an image (the tiny
# folders stand in for them; a real checkpoint brings its own template).
CHATML_IMAGE_TEMPLATE = (  # LLaVA-OneVision (Qwen2 chat): image token, then the text
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN2_VL_TEMPLATE = (  # Qwen2-VL / Qwen2.5-VL: default system turn, vision_start/pad/end
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
INTERNVL_TEMPLATE = (  # InternVL3 -hf: <IMG_CONTEXT> (expanded to <img>...</img>) on its own line
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<IMG_CONTEXT>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT_WORDS = ["user", "assistant", "system", "You", "are", "helpful", "\n"]

TINY_FAMILIES = ("llava-1.5", "llava-next", "llava-onevision", "qwen2.5-vl", "internvl3")


def _llama(spec: TinyLlavaSpec, tok, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=spec.text_hidden, intermediate_size=spec.text_intermediate,
                       num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
                       num_key_value_heads=spec.text_kv_heads, vocab_size=len(tok),
                       max_position_embeddings=spec.max_positions, pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       tie_word_embeddings=False, **kw)


def _qwen2_text(spec: TinyLlavaSpec, tok, cls=None, **kw):
    from transformers import Qwen2Config

    return (cls or Qwen2Config)(
        hidden_size=spec.text_hidden, intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
        num_key_value_heads=max(1, spec.text_heads // 2),  # grouped-query attention, as Qwen2
        vocab_size=len(tok), max_position_embeddings=spec.max_positions,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False, **kw)


def _vision_kw(spec: TinyLlavaSpec) -> dict:
    return dict(hidden_size=spec.vision_hidden, intermediate_size=spec.vision_intermediate,
                num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads)


def _pinpoints(spec: TinyLlavaSpec) -> list[list[int]]:
    s = spec.image_size
    return [[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s]]


def _save(out: Path, model, processor, tok) -> Path:
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_tiny_family(family: str, out_dir: str | Path, spec: TinyLlavaSpec | None = None) -> Path:
    """A randomly initialised tiny model of ``family`` (one of ``TINY_FAMILIES``) with its
    family's processor (image processor, a word-level tokenizer with the special tokens the
    processor needs, a chat template in the family's format), saved in Hugging Face format so
    that ``harness.models.loading.load_model`` loads it like a Hub checkpoint."""
    import transformers as T

    from .loading import image_only_processor

    spec = spec or TinyLlavaSpec()
    if family == "llava-1.5":
        return build_tiny_llava(out_dir, spec)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec.seed)
    s, p = spec.image_size, spec.patch_size
    words = CHAT_WORDS + list(spec.extra_words)
    if family == "llava-next":
        tok = build_tokenizer(words)
        config = T.LlavaNextConfig(
            vision_config=T.CLIPVisionConfig(**_vision_kw(spec), image_size=s, patch_size=p,
                                             projection_dim=spec.vision_hidden, hidden_act="quick_gelu"),
            text_config=_llama(spec, tok), image_token_index=tok.convert_tokens_to_ids("<image>"),
            image_grid_pinpoints=_pinpoints(spec), vision_feature_select_strategy="default",
            vision_feature_layer=-2, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
        model = T.LlavaNextForConditionalGeneration(config).eval()
        processor = T.LlavaNextProcessor(
            image_processor=T.LlavaNextImageProcessor(
                size={"shortest_edge": s}, crop_size={"height": s, "width": s},
                image_grid_pinpoints=_pinpoints(spec)),
            tokenizer=tok, patch_size=p, vision_feature_select_strategy="default",
            num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE, image_token="<image>")
    elif family == "llava-onevision":
        tok = build_tokenizer(words, ["<|im_start|>", "<|im_end|>", "<video>"], eos_token="<|im_end|>")
        config = T.LlavaOnevisionConfig(
            vision_config=T.SiglipVisionConfig(**_vision_kw(spec), image_size=s, patch_size=p,
                                               vision_use_head=False),
            text_config=_qwen2_text(spec, tok), image_token_index=tok.convert_tokens_to_ids("<image>"),
            video_token_index=tok.convert_tokens_to_ids("<video>"),
            image_grid_pinpoints=_pinpoints(spec), vision_feature_select_strategy="full",
            vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9",
            pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
        model = T.LlavaOnevisionForConditionalGeneration(config).eval()
        processor = image_only_processor(T.LlavaOnevisionProcessor)(
            image_processor=T.LlavaOnevisionImageProcessor(
                size={"height": s, "width": s}, image_grid_pinpoints=_pinpoints(spec)),
            tokenizer=tok, num_image_tokens=(s // p) ** 2, vision_feature_select_strategy="full",
            chat_template=CHATML_IMAGE_TEMPLATE, image_token="<image>", video_token="<video>",
            vision_aspect_ratio="anyres_max_9")
    elif family == "qwen2.5-vl":
        special = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                   "<|image_pad|>", "<|video_pad|>"]
        tok = build_tokenizer(words, special, eos_token="<|im_end|>")
        head_dim = spec.text_hidden // spec.text_heads
        third = head_dim // 2 // 3
        mrope = [head_dim // 2 - 2 * third, third, third]  # temporal, height, width halves
        merge = 2
        config = T.Qwen2_5_VLConfig(
            vision_config=dict(depth=spec.vision_layers, hidden_size=spec.vision_hidden,
                               intermediate_size=spec.vision_intermediate, num_heads=spec.vision_heads,
                               out_hidden_size=spec.text_hidden, patch_size=p, spatial_merge_size=merge,
                               temporal_patch_size=2, window_size=p * merge,  # one merged unit per window
                               fullatt_block_indexes=[spec.vision_layers - 1]),
            text_config=dict(**_qwen2_text(spec, tok).to_dict() | {"model_type": "qwen2_5_vl_text"},
                             rope_scaling={"type": "mrope", "mrope_section": mrope}),
            image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
            video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
            vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
            vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
            pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
        model = T.Qwen2_5_VLForConditionalGeneration(config).eval()
        processor = image_only_processor(T.Qwen2_5_VLProcessor)(
            image_processor=T.Qwen2VLImageProcessor(
                patch_size=p, merge_size=merge, temporal_patch_size=2,
                min_pixels=s * s, max_pixels=4 * s * s),  # dynamic resolution: 4 to 16 tokens
            tokenizer=tok, chat_template=QWEN2_VL_TEMPLATE)
    elif family == "internvl3":
        named = {"start_image_token": "<img>", "end_image_token": "</img>",
                 "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
        tok = build_tokenizer(words, ["<|im_start|>", "<|im_end|>"], eos_token="<|im_end|>", named=named)
        config = T.InternVLConfig(
            vision_config=T.InternVLVisionConfig(**_vision_kw(spec), image_size=[s, s], patch_size=[p, p],
                                                 use_qk_norm=False, layer_scale_init_value=0.1),
            text_config=_qwen2_text(spec, tok), image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
            downsample_ratio=0.5, vision_feature_layer=-1, vision_feature_select_strategy="default",
            projector_hidden_act="gelu", pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
        model = T.InternVLForConditionalGeneration(config).eval()
        processor = image_only_processor(T.InternVLProcessor)(
            image_processor=T.GotOcr2ImageProcessor(
                size={"height": s, "width": s}, crop_to_patches=True, min_patches=1, max_patches=4),
            tokenizer=tok, image_seq_length=(s // p) ** 2 // 4, chat_template=INTERNVL_TEMPLATE)
    else:
        raise ValueError(f"no tiny builder for family {family!r}; valid: {', '.join(TINY_FAMILIES)}")
    return _save(out, model, processor, tok)
