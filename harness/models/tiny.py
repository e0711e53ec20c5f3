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


def build_tokenizer(words: Iterable[str]):
    """A word-level fast tokenizer; LLaVA's special tokens are atomic and left padding is the default."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for w in list(BASE_WORDS) + list(words):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="left",
    )


def build_tiny_llava(out_dir: str | Path, spec: TinyLlavaSpec | None = None) -> Path:
    """Create a randomly initialised tiny LLaVA (model + processor) in ``out_dir`` and return the path."""
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
