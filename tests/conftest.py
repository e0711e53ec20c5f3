"""Shared fixtures: a tiny random LLaVA built offline, calibration data for it, the shared samples,
the method registry restored around tests that register methods, one torch thread per module."""

from __future__ import annotations

import os
from contextlib import contextmanager
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
# (harness.kernels.triton_matmul.interpret_on_cpu); elsewhere the CPU paths stay in torch.
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
def heldout(tiny_lm):
    """Encoded batches of other pairs than ``tiny_calib``'s, for output errors off the calibration set."""
    from harness.calibration import encode_pairs

    return list(encode_pairs(tiny_lm, make_pairs(16, seed=7), batch_size=8).inputs())


def output_error(lm, state, batches) -> float:
    """Mean squared error of the logits on real tokens, quantized vs float."""
    from harness.quant.simulated import applied

    def logits():
        with torch.no_grad():
            return [lm.model(**b, use_cache=False).logits for b in batches]

    ref = logits()
    with applied(lm.model, state):
        got = logits()
    num = sum(((r - q) ** 2)[b["attention_mask"].bool()].sum() for r, q, b in zip(ref, got, batches))
    den = sum(int(b["attention_mask"].sum()) for b in batches)
    return float(num / den)


def linear_inputs(model, names, run) -> dict[str, list[torch.Tensor]]:
    """The inputs each named linear receives while ``run()`` executes, in float64."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, _n=n: seen[_n].append(args[0].detach().double())) for n in names]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return seen


def symmetric_static_scale(xs, bits: int, masks=None, clip: float = 1.0) -> float:
    """The textbook symmetric per-tensor scale, ``clip * max|x| / (2**(bits-1) - 1)``, in float64
    over every row of ``xs`` or, with ``masks`` (one per tensor), over the rows they mark."""
    rows = [x.reshape(-1, x.shape[-1]) if m is None else x.reshape(-1, x.shape[-1])[m.reshape(-1).bool()]
            for x, m in zip(xs, masks if masks is not None else [None] * len(xs))]
    return clip * max(float(r.abs().max()) for r in rows) / (2 ** (bits - 1) - 1)


def assert_first_vision_ranges(lm, calib, state, bits):
    """The static ranges of the vision tower's first q/k/v: nothing quantized runs before them, so
    their input is the same in every stream a rule could pick (float, quantized weights, quantized
    activations) once the state's float transforms are applied; all image tokens are real. The
    scale must be the textbook one of that input, recomputed here in float64."""
    from dataclasses import replace

    from harness.quant.simulated import applied
    from harness.quant.state import QuantState

    first = [n for n in state.linears if ".layers.0.self_attn." in n and "vision_tower" in n
             and n.endswith(("q_proj", "k_proj", "v_proj"))]
    assert len(first) == 3
    acts_off = QuantState(state.method, state.config,
                          {n: replace(lq, act=None) for n, lq in state.linears.items()}, state.float_params)
    with applied(lm.model, acts_off):
        seen = linear_inputs(lm.model, first, lambda: [lm.model(**b, use_cache=False) for b in calib.inputs()])
    for n in first:
        assert float(state.linears[n].act.scale) == pytest.approx(symmetric_static_scale(seen[n], bits), rel=1e-5), n


@pytest.fixture()
def tiny_calib(tiny_lm):
    from harness.calibration import encode_pairs

    return encode_pairs(tiny_lm, make_pairs(16), batch_size=8, source={"kind": "random-test-pairs"})


@contextmanager
def registry_restored():
    """The method registry as it was, after the block: methods a test registers leave with it."""
    from harness import registry

    registry.discover()  # in-tree methods belong to the snapshot, not to the test
    saved, discovered = dict(registry._REGISTRY), registry._discovered
    broken = dict(getattr(registry, "_BROKEN", {}))  # modules that failed to import, where tracked
    try:
        yield registry
    finally:
        registry._REGISTRY.clear()
        registry._REGISTRY.update(saved)
        registry._discovered = discovered
        if hasattr(registry, "_BROKEN"):
            registry._BROKEN.clear()
            registry._BROKEN.update(broken)


@pytest.fixture()
def isolated_registry():
    """For tests that register methods (decorator, plain call, entry points, ``exec``)."""
    with registry_restored() as registry:
        yield registry


@pytest.fixture(autouse=True)
def _no_registry_leak(request):
    """Fails a test that leaves a method registered that neither the tree nor an installed entry
    point provides: such a test must use ``isolated_registry``."""
    from harness import registry

    before = set(registry._REGISTRY)
    yield
    added = {n: cls for n, cls in registry._REGISTRY.items() if n not in before
             and cls.__module__.split(".")[0] not in registry.IN_TREE_PACKAGES}
    if not added:
        return
    from importlib.metadata import entry_points

    plugins = {ep.value.partition(":")[0] for ep in entry_points(group=registry.ENTRY_POINT_GROUP)}
    leaked = sorted(n for n, cls in added.items() if cls.__module__ not in plugins)
    if leaked:
        pytest.fail(f"{request.node.nodeid} left method(s) {leaked} registered; "
                    "use the isolated_registry fixture")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny shapes: a second intra-op thread only adds sync cost (12 ms a matmul on a busy box).
    Module scope, restoring the count: suites in other modules set their own."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_family_paths(tmp_path_factory):
    """A builder of tiny random folders, one per family (harness.models.tiny.build_tiny_family),
    each built once per session."""
    from harness.models.tiny import TinyLlavaSpec, build_tiny_family

    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_tiny_family(family, tmp_path_factory.mktemp(f"tiny-{family}"),
                                              TinyLlavaSpec(seed=0))
        return built[family]
    return get
