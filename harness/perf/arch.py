"""Models for systems benchmarking: architecture names built with random weights, or real checkpoints.

``llava-1.5-7b`` and ``llava-1.5-13b`` are the shapes of ``llava-hf/llava-1.5-{7b,13b}-hf``,
``qwen2.5-vl-7b`` of ``Qwen/Qwen2.5-VL-7B-Instruct`` and ``llava-onevision-7b`` of
``llava-hf/llava-onevision-qwen2-7b-ov-hf``, shipped as config files in ``harness/perf/configs``. Kernels, latency and memory depend on shapes, not on
weight values, so a random-weight model is a faithful systems stand-in (accuracy is meaningless on
it and is never measured here). Anything else goes through ``harness.models.loading.load_model``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..models.loading import LoadedModel, load_model, to_torch_dtype

ARCH_DIR = Path(__file__).resolve().parent / "configs"


def architectures() -> dict[str, Path]:
    """Architecture names shipped with the project -> their config file."""
    return {p.stem: p for p in sorted(ARCH_DIR.glob("*.json"))}


def arch_config(name: str, overrides: dict | None = None, **text_overrides):
    """The transformers config (``LlavaConfig``, ``Qwen2_5_VLConfig``, ...: the file's
    ``model_type``) of a shipped architecture, shrunk for tests or smoke runs by ``overrides``
    (top-level keys; ``text_config``/``vision_config`` dicts merge into the shipped ones) or by
    ``text_overrides`` (keys of the language model's config)."""
    from transformers import AutoConfig

    archs = architectures()
    if name not in archs:
        raise KeyError(f"unknown architecture {name!r}; shipped: {', '.join(archs)}")
    raw = json.loads(archs[name].read_text())
    raw = {k: v for k, v in raw.items() if not k.startswith("_")}
    for key, value in (overrides or {}).items():
        if key in ("text_config", "vision_config"):
            raw[key].update(value)
        else:
            raw[key] = value
    raw["text_config"].update(text_overrides)
    return AutoConfig.for_model(raw.pop("model_type"), **raw)


def build_random_model(name: str, *, dtype: str | torch.dtype = "fp16", device: str = "cuda",
                       seed: int = 0, overrides: dict | None = None, **text_overrides) -> LoadedModel:
    """A randomly initialised model of a shipped architecture (its config's ``architectures``
    class), built directly on ``device``."""
    import transformers

    config = arch_config(name, overrides, **text_overrides)
    model_class = getattr(transformers, config.architectures[0])
    torch_dtype = to_torch_dtype(dtype)
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        with torch.device(device):
            model = model_class(config)
    finally:
        torch.set_default_dtype(prev)
    model = model.to(dtype=torch_dtype).eval()
    return LoadedModel(name=name, path=f"arch:{name} (random weights)", model=model, processor=None,
                       dtype=torch_dtype, device=str(device))


def load_for_perf(name_or_path: str, *, dtype: str | torch.dtype = "fp16", device: str = "cuda",
                  seed: int = 0) -> LoadedModel:
    """An architecture name -> random weights; anything else -> ``load_model`` (bundled, folder, Hub)."""
    if name_or_path in architectures():
        return build_random_model(name_or_path, dtype=dtype, device=device, seed=seed)
    return load_model(name_or_path, dtype=dtype, device=device)
