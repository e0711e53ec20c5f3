"""A model folder in Hugging Face format with random weights, for systems runs of the real suite.

Load time, memory, quantization cost and evaluation throughput depend on shapes, not on weight
values, so a LLaVA-1.5-7B/13B-shaped folder with random weights lets the whole suite (loading,
calibration, every method, lm-eval) run where the Hub is unreachable. The processor is
llava-hf's: the Llama-2 SentencePiece tokenizer with ``<image>`` (32000) and ``<pad>`` (32001)
added, a CLIP image processor at the vision tower's resolution, and the LLaVA-1.5 chat template.
"""

from __future__ import annotations

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


def bench_folder(arch: str, shape: str, tokenizer_dir: str | Path, *, dtype: str, device: str) -> tuple[Path, float]:
    """The benchmark scripts' model folder under /tmp (``shape``: "full" or "tiny") and the
    seconds it took to build; the GPU cache is emptied afterwards."""
    import time

    t0 = time.perf_counter()
    folder = save_random_llava(arch, Path("/tmp") / f"random-{arch}-{shape}", tokenizer_dir, dtype=dtype,
                               device=device, overrides=TINY_OVERRIDES if shape == "tiny" else None)
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
    return folder, round(time.perf_counter() - t0, 2)


def add_bench_folder_args(ap) -> None:
    """The command-line arguments every benchmark built on ``bench_folder`` takes (argparse)."""
    ap.add_argument("--arch", default="llava-1.5-7b")
    ap.add_argument("--shape", choices=["full", "tiny"], default="full")
    ap.add_argument("--tokenizer", required=True, help="folder with the Llama-2 tokenizer.model")
    ap.add_argument("--data-dir", required=True, help="folder with scienceqa_img/test.parquet")
    ap.add_argument("--device", default="cuda")
