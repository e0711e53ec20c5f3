"""A model folder in Hugging Face format with random weights, for systems runs of the real suite.

Load time, memory, quantization cost and evaluation throughput depend on shapes, not on weight
values, so a 7B/13B-shaped folder with random weights lets the whole suite (loading, calibration,
every method, lm-eval) run where the Hub is unreachable. Two families:

* LLaVA-1.5 (``llava-1.5-7b``, ``llava-1.5-13b``): llava-hf's processor, the Llama-2
  SentencePiece tokenizer (from a local folder) with ``<image>`` (32000) and ``<pad>`` (32001)
  added, a CLIP image processor at the vision tower's resolution, the LLaVA-1.5 chat template.
* Qwen2.5-VL (``qwen2.5-vl-7b``): ``Qwen2_5_VLProcessor`` with a tokenizer in Qwen2's schema
  built here, offline (``qwen2_tokenizer``: byte-level BPE with Qwen2's pre-tokenizer, trained on
  the project's docs, its vocabulary padded to Qwen2's 151,643 regular tokens so the 22 special
  tokens sit at Qwen2's ids, ``<|image_pad|>`` = 151655), a Qwen2-VL image processor with
  lmms-eval's pixel bounds (256 to 2048 visual tokens; the harness puts these on any Qwen-geometry
  processor when it loads one, ``Qwen2VLAdapter.processor_kwargs``) and Qwen2-VL's chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def build_processor(tokenizer_dir: str | Path, image_size: int, patch_size: int):
    """llava-hf's processor from a folder holding the Llama-2 ``tokenizer.model``."""
    from transformers import CLIPImageProcessor, LlamaTokenizer, LlavaProcessor

    from ..models.tiny import LLAVA_CHAT_TEMPLATE

    tok = LlamaTokenizer.from_pretrained(str(tokenizer_dir))
    tok.add_tokens(["<image>"], special_tokens=True)
    tok.add_special_tokens({"pad_token": "<pad>"})
    image = CLIPImageProcessor(size={"shortest_edge": image_size},
                               crop_size={"height": image_size, "width": image_size})
    return LlavaProcessor(image_processor=image, tokenizer=tok, patch_size=patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=LLAVA_CHAT_TEMPLATE, image_token="<image>")


def save_random_llava(arch: str, out: str | Path, tokenizer_dir: str | Path, *, dtype: str = "fp16",
                      device: str = "cuda", seed: int = 0, overrides: dict | None = None) -> Path:
    """Write ``out`` (config, random weights in ``dtype``, processor) for a shipped architecture
    (``harness/perf/configs``: llava-1.5-7b, llava-1.5-13b); ``overrides`` shrink it for tests."""
    from .arch import build_random_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lm = build_random_model(arch, dtype=dtype, device=device, seed=seed, overrides=overrides)
    cfg = lm.model.config
    processor = build_processor(tokenizer_dir, cfg.vision_config.image_size, cfg.vision_config.patch_size)
    tok = processor.tokenizer
    if tok.convert_tokens_to_ids("<image>") != cfg.image_token_index:
        raise ValueError(f"the tokenizer puts <image> at {tok.convert_tokens_to_ids('<image>')}, "
                         f"the architecture expects {cfg.image_token_index}")
    cfg.pad_token_id = cfg.text_config.pad_token_id = tok.pad_token_id
    lm.model.generation_config.pad_token_id = tok.pad_token_id
    lm.model.generation_config.eos_token_id = tok.eos_token_id
    with torch.no_grad():
        lm.model.save_pretrained(out)
    processor.save_pretrained(out)
    del lm
    return out


# A tiny variant of the shipped architectures for smoke runs on a CPU: the same classes and
# wiring, a few thousand times fewer parameters.
TINY_OVERRIDES = {
    "text_config": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4),
    "vision_config": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, image_size=28, patch_size=14, projection_dim=32),
    "image_seq_length": 4,
}


# Qwen2's special tokens in id order from 151643 (``<|endoftext|>``) on, as Qwen2.5-VL's
# tokenizer has them: the ``<|...|>`` ones special, tool-call and fill-in-the-middle markers not.
QWEN2_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
QWEN2_OTHER_ADDED = ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                     "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")
QWEN2_REGULAR_TOKENS = 151643  # regular (BPE) tokens of Qwen2's vocabulary: specials start here
QWEN2_BPE_VOCAB = 8192  # what the byte-level BPE is trained up to (a small corpus may stop short)
# Qwen2's pre-tokenizer split (transformers' tokenization_qwen2.PRETOKENIZE_REGEX, tiktoken's cl100k)
PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                     r"""\s*[\r\n]+|\s+(?!\S)|\s+""")


def _tokenizer_corpus() -> list[str]:
    """English technical prose that ships with the project (README and docs), sorted by path:
    the same text, hence the same merges, wherever the same commit builds the folder."""
    root = Path(__file__).resolve().parents[2]
    files = [root / "README.md"] + sorted((root / "docs").rglob("*.md"))
    return [f.read_text(encoding="utf-8") for f in files if f.is_file()]


def qwen2_tokenizer(corpus: list[str] | None = None, *, bpe_vocab: int = QWEN2_BPE_VOCAB):
    """A ``Qwen2Tokenizer`` built offline in Qwen2's schema: NFC, Qwen2's pre-tokenizer regex and
    byte-level BPE (its merges trained here on ``corpus``, default the project's docs), the
    vocabulary padded with unreachable ``<|reserved_N|>`` tokens to Qwen2's 151,643 regular ones,
    then Qwen2's 22 added tokens at their ids (``<|im_end|>`` 151645 the end of a turn and eos,
    ``<|endoftext|>`` 151643 the pad token, ``<|image_pad|>`` 151655). Prompts get real token
    ids and plausible counts: a small BPE splits English into somewhat more tokens than Qwen2's
    own 151k merges do."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=bpe_vocab, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    bpe.train_from_iterator(corpus if corpus is not None else _tokenizer_corpus(), trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab, merges = dict(model["vocab"]), [tuple(m) for m in model["merges"]]
    if len(vocab) > QWEN2_REGULAR_TOKENS:
        raise ValueError(f"trained {len(vocab)} tokens, more than Qwen2's {QWEN2_REGULAR_TOKENS} regular ones")
    for i in range(len(vocab), QWEN2_REGULAR_TOKENS):
        vocab[f"<|reserved_{i}|>"] = i
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None,
                         eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN2_SPECIAL_TOKENS]
                   + [AddedToken(t, special=False, normalized=False) for t in QWEN2_OTHER_ADDED])
    tok.eos_token = "<|im_end|>"  # the Instruct model's end of turn
    tok.padding_side = "left"
    ids = tok.convert_tokens_to_ids(list(QWEN2_SPECIAL_TOKENS + QWEN2_OTHER_ADDED))
    if ids != list(range(QWEN2_REGULAR_TOKENS, QWEN2_REGULAR_TOKENS + len(ids))):
        raise ValueError(f"Qwen2's added tokens landed at {ids[:3]}..., not from {QWEN2_REGULAR_TOKENS} on")
    return tok


def qwen_pixel_bounds(vision_config) -> tuple[int, int]:
    """``(min_pixels, max_pixels)`` of the folder's image processor: lmms-eval's 256 to 2048
    visual tokens for Qwen's own geometry (patch 14 x merge 2 = 28 px per token, what
    ``Qwen2VLAdapter.processor_kwargs`` sets on load anyway), 4 to 16 tokens for a shrunken one."""
    from ..models.family import Qwen2VLAdapter

    unit = vision_config.patch_size * vision_config.spatial_merge_size
    lo, hi = Qwen2VLAdapter.LMMS_EVAL_TOKENS if unit == 28 else (4, 16)
    return lo * unit * unit, hi * unit * unit


def build_qwen_processor(vision_config, tokenizer=None):
    """Qwen2.5-VL's processor (image part only: the harness asks one picture per question) with
    the offline Qwen2 tokenizer, a Qwen2-VL image processor at the tower's geometry and bounds,
    and Qwen2-VL's chat template (default system turn, ``<|vision_start|><|image_pad|><|vision_end|>``
    before the text)."""
    import transformers as T

    from ..models.loading import image_only_processor
    from ..models.tiny import QWEN2_VL_TEMPLATE

    lo, hi = qwen_pixel_bounds(vision_config)
    image = T.Qwen2VLImageProcessor(patch_size=vision_config.patch_size,
                                    merge_size=vision_config.spatial_merge_size,
                                    temporal_patch_size=vision_config.temporal_patch_size,
                                    min_pixels=lo, max_pixels=hi)
    return image_only_processor(T.Qwen2_5_VLProcessor)(
        image_processor=image, tokenizer=tokenizer or qwen2_tokenizer(), chat_template=QWEN2_VL_TEMPLATE)


def save_random_qwen(arch: str, out: str | Path, *, dtype: str = "bf16", device: str = "cuda", seed: int = 0,
                     overrides: dict | None = None) -> Path:
    """Write ``out`` (config, random weights in ``dtype``, processor) for a shipped Qwen2.5-VL
    architecture (``qwen2.5-vl-7b``); ``overrides`` shrink it for tests. No tokenizer folder is
    needed: the Qwen2 tokenizer is built here (``qwen2_tokenizer``)."""
    from .arch import arch_config, build_random_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = arch_config(arch, overrides)
    processor = build_qwen_processor(cfg.vision_config)  # first: seconds, where the weights take a minute
    tok = processor.tokenizer
    for key, token in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                       ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")):
        if tok.convert_tokens_to_ids(token) != getattr(cfg, key):
            raise ValueError(f"the tokenizer puts {token} at {tok.convert_tokens_to_ids(token)}, "
                             f"the architecture expects {getattr(cfg, key)}")
    if len(tok) > cfg.text_config.vocab_size:
        raise ValueError(f"{len(tok)} tokens do not fit the model's vocabulary of {cfg.text_config.vocab_size}")
    lm = build_random_model(arch, dtype=dtype, device=device, seed=seed, overrides=overrides)
    cfg = lm.model.config
    endoftext = tok.convert_tokens_to_ids("<|endoftext|>")
    cfg.pad_token_id = cfg.text_config.pad_token_id = tok.pad_token_id
    gen = lm.model.generation_config  # as Qwen2.5-VL-Instruct's generation_config.json
    gen.pad_token_id, gen.bos_token_id = tok.pad_token_id, endoftext
    gen.eos_token_id = [tok.eos_token_id, endoftext]
    with torch.no_grad():
        lm.model.save_pretrained(out)
    processor.save_pretrained(out)
    del lm
    return out


# Qwen2.5-VL shrunk the same way: a Qwen2 decoder with grouped-query attention (4 heads, 2 kv
# heads, head_dim 16: M-RoPE sections 2/3/3 of its 8 frequencies), a two-block ViT with one
# window-attention and one full-attention block, 8 px patches (16 px per merged token, so the
# folder's own 4 to 16 token bounds hold, not lmms-eval's). Qwen2's vocabulary stays: the
# tokenizer's special ids are above 151k.
TINY_OVERRIDES_QWEN = {
    "text_config": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_window_layers=2,
                        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                         "mrope_section": [2, 3, 3]}),
    "vision_config": dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                          patch_size=8, window_size=32, fullatt_block_indexes=[1]),
}


def arch_model_type(arch: str) -> str:
    """The ``model_type`` of a shipped architecture (its config file), without building it."""
    from .arch import architectures

    archs = architectures()
    if arch not in archs:
        raise KeyError(f"unknown architecture {arch!r}; shipped: {', '.join(archs)}")
    return json.loads(archs[arch].read_text())["model_type"]


def save_random_folder(arch: str, out: str | Path, tokenizer_dir: str | Path | None = None, *,
                       tiny: bool = False, dtype: str = "fp16", device: str = "cuda", seed: int = 0) -> Path:
    """A random-weight folder of any family built here: LLaVA-1.5 (needs ``tokenizer_dir``, the
    Llama-2 ``tokenizer.model``) or Qwen2.5-VL (its tokenizer is built offline); ``tiny``: the
    family's tiny overrides."""
    kind = arch_model_type(arch)
    if kind == "llava":
        if tokenizer_dir is None:
            raise ValueError(f"{arch}: --tokenizer (a folder with the Llama-2 tokenizer.model) is required")
        return save_random_llava(arch, out, tokenizer_dir, dtype=dtype, device=device, seed=seed,
                                 overrides=TINY_OVERRIDES if tiny else None)
    if kind == "qwen2_5_vl":
        return save_random_qwen(arch, out, dtype=dtype, device=device, seed=seed,
                                overrides=TINY_OVERRIDES_QWEN if tiny else None)
    raise ValueError(f"{arch}: no random-folder builder for model_type {kind!r} (llava, qwen2_5_vl)")


def bench_folder(arch: str, shape: str, tokenizer_dir: str | Path | None, *, dtype: str,
                 device: str) -> tuple[Path, float]:
    """The benchmark scripts' model folder under /tmp (``shape``: "full" or "tiny") and the
    seconds it took to build; the GPU cache is emptied afterwards."""
    import time

    t0 = time.perf_counter()
    folder = save_random_folder(arch, Path("/tmp") / f"random-{arch}-{shape}", tokenizer_dir,
                                tiny=shape == "tiny", dtype=dtype, device=device)
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
    return folder, round(time.perf_counter() - t0, 2)


def add_bench_folder_args(ap) -> None:
    """The command-line arguments every benchmark built on ``bench_folder`` takes (argparse)."""
    ap.add_argument("--arch", default="llava-1.5-7b")
    ap.add_argument("--shape", choices=["full", "tiny"], default="full")
    ap.add_argument("--tokenizer", default=None,
                    help="folder with the Llama-2 tokenizer.model (LLaVA archs; Qwen2.5-VL builds its own)")
    ap.add_argument("--data-dir", required=True, help="folder with scienceqa_img/test.parquet")
    ap.add_argument("--device", default="cuda")
