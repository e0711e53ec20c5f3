"""Shared fixtures: a tiny random LLaVA built offline, calibration data for it, the shared samples."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton kernels (harness/perf) are checked on CPU-only machines through Triton's interpreter; it
# must be chosen before they are defined. Only tests that ask for it run them
# (harness.perf.triton_kernels.interpret_on_cpu); elsewhere the CPU paths stay in torch.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# tiny models: one thread is faster than two and immune to a busy second core
torch.set_num_threads(1)


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test when this clone has no ../shared."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (a user's clone has no ../shared/data)")
    return path


@pytest.fixture(scope="session")
def tiny_llava_path(tmp_path_factory) -> Path:
    from harness.models.tiny import TinyLlavaSpec, build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"), TinyLlavaSpec(seed=0))


@pytest.fixture()
def tiny_lm(tiny_llava_path):
    """A fresh float32 tiny LLaVA on CPU (function scope: tests may quantize it)."""
    from harness.models.loading import load_model

    return load_model(str(tiny_llava_path), dtype="fp32", device="cpu")


def make_pairs(n: int, seed: int = 0):
    """Deterministic (image, prompt, answer) triples with varied images and prompts."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    words = ["yes", "no", "A", "B", "the", "is", "red", "blue", "2", "3"]
    pairs = []
    for i in range(n):
        img = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        prompt = " ".join(rng.choice(words, size=int(rng.integers(3, 9))))
        pairs.append((img, prompt, str(rng.choice(["yes", "no", "A", "B"]))))
    return pairs


@pytest.fixture()
def tiny_calib(tiny_lm):
    from harness.calibration import encode_pairs

    return encode_pairs(tiny_lm, make_pairs(16), batch_size=8, source={"kind": "random-test-pairs"})
