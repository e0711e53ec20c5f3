"""What a perf row times: the variants, the workload, and each variant's state on the accuracy path.

``perf_variants`` resolves methods as accuracy suites do (``cells.resolve_methods``: the same
``Variant``, options, labels), the float reference first. ``perf_state`` makes a state as the
accuracy worker makes it (``prepare.prepare_state``) and names it by ``cells.state_identity``'s
digest. ``StatePreparer`` turns one ``Case`` into that state, its simulated reference (the gate's
greedy reference) and the engine's deployed layers (``engine.state_blocks``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from ..cells import (Variant, act_range_rule, calibration_spec, digest, resolve_methods, state_identity,
                     uses_calibration)
from ..suite_config import MethodSpec, method_spec
from ..prepare import prepare_state
from ..quant.config import parse_scheme
from ..quant.simulated import apply_state
from . import gate as gate_mod
from .engine import state_blocks
from .images import image_inputs, images_to, repeat_images

DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def float_variant() -> tuple[str, str]:
    """The baseline row: the method that declares itself the reference, unquantized."""
    from ..registry import reference_method

    return reference_method(), "w16a16"


def perf_variants(methods) -> list[Variant]:
    """``methods`` (names, ``MethodSpec``s, suite ``methods`` entries, or ``cells.Variant``s resolved
    with their suite) as ``cells.Variant``s, the float reference first (once); the same resolution,
    options and labels as accuracy suites."""
    methods = list(methods)
    ref_name, _ = float_variant()
    if methods and all(isinstance(m, Variant) for m in methods):  # resolved already (with a suite)
        variants = methods
        if not any(v.reference for v in variants):
            variants = resolve_methods([MethodSpec(ref_name)]) + variants
        return sorted(variants, key=lambda v: not v.reference)
    specs = [method_spec(m) for m in methods]
    if ref_name not in [s.name for s in specs]:
        specs = [MethodSpec(ref_name)] + specs
    variants = resolve_methods(specs)
    return sorted(variants, key=lambda v: not v.reference)


# ---------------------------------------------------------------------------- workload

@dataclass
class Workload:
    input_ids: torch.Tensor  # [1, L]
    pixel_values: torch.Tensor  # one picture as the family's model takes it (LLaVA-1.5: [1, 3, S, S])
    image_tokens: int
    text_tokens: int
    new_tokens: int
    image_extra: dict = field(default_factory=dict)  # image_sizes / image_grid_thw (other families)
    image_size: int | None = None  # the picture's side in pixels

    @property
    def pixels(self):
        """The picture: ``pixel_values`` (LLaVA-1.5), or a dict of image inputs (``images``)."""
        return {"pixel_values": self.pixel_values, **self.image_extra} if self.image_extra else self.pixel_values

    def batch(self, B: int):
        """``(input_ids [B, L], pixels)`` for ``B`` copies of the prompt (``images.repeat_images``)."""
        return self.input_ids.repeat(B, 1), repeat_images(self.pixels, B)

    def describe(self) -> dict:
        side = self.image_size if self.image_size is not None else int(self.pixel_values.shape[-1])
        out = {"image_tokens": self.image_tokens, "text_tokens": self.text_tokens,
               "prompt_tokens": int(self.input_ids.shape[1]), "new_tokens": self.new_tokens,
               "image_size": side, "eos": "ignored (forced length)",
               "inputs": "random token ids + one random normalised image (systems benchmark)"}
        if self.image_extra:
            out["image_inputs"] = {k: list(v.shape) for k, v in self.pixels.items()}
        return out


def make_workload(config, *, text_tokens: int = 70, new_tokens: int = 128, seed: int = 0,
                  image_size: int | None = None) -> Workload:
    """One image inside ~``text_tokens`` random text tokens: the family's picture inputs and image
    tokens (``ModelAdapter.synthetic_image``: 576 tokens at 336 px / patch 14 for LLaVA-1.5)."""
    from types import SimpleNamespace

    from ..models.family import adapter_for_config

    adapter = adapter_for_config(config)
    image_token = adapter.image_token_id(SimpleNamespace(config=config))
    tc = adapter.text_config(config)
    vocab = tc.vocab_size
    gen = torch.Generator().manual_seed(seed)
    hi = min(vocab, 32000)
    text = torch.randint(3, hi, (text_tokens,), generator=gen)
    text[text == image_token] = 3
    bos = getattr(tc, "bos_token_id", 1) or 1
    pixels, n_img = adapter.synthetic_image(config, gen, image_size)
    head = 5  # "<s> USER :" before the image, the question and " ASSISTANT:" after it
    ids = torch.cat([torch.tensor([bos]), text[: head - 1], torch.full((n_img,), image_token),
                     text[head - 1:]])
    pix = pixels.pop("pixel_values")
    side = image_size if image_size is not None else (int(pix.shape[-1]) if not pixels else None)
    if side is None:  # Qwen's flattened patches: the side from the grid
        grid = pixels.get("image_grid_thw")
        side = int(grid[0, 1]) * config.vision_config.patch_size if grid is not None else None
    return Workload(ids[None], pix, n_img, text_tokens + 1, new_tokens, image_extra=pixels, image_size=side)


# ---------------------------------------------------------------------------- methods & states

def random_calibration(lm, workload: Workload, n: int = 4):
    """Random calibration batches for methods that need data (systems benchmarking only)."""
    from ..calibration import CalibrationSet

    from ..models.family import adapter_for

    adapter = adapter_for(lm.model)
    cfg = lm.model.config
    image_token = adapter.image_token_id(lm.model)
    vocab = min(adapter.text_config(cfg).vocab_size, 32000)
    ids, pix = workload.batch(1)
    gen = torch.Generator().manual_seed(1234)
    batches = []
    for _ in range(n):
        b_ids = ids.clone()
        txt = b_ids != image_token
        txt[:, 0] = False  # keep BOS
        b_ids[txt] = torch.randint(3, vocab, (int(txt.sum()),), generator=gen)
        b_ids[txt & (b_ids == image_token)] = 3
        labels = torch.full_like(b_ids, -100)
        labels[:, -8:] = b_ids[:, -8:]
        imgs = image_inputs(pix)
        imgs["pixel_values"] = torch.randn(imgs["pixel_values"].shape, generator=gen)
        imgs = images_to(imgs, lm.device, lm.dtype)
        batch = adapter.forward_inputs(lm.model, b_ids.to(lm.device), imgs)
        batch.update(attention_mask=torch.ones_like(b_ids).to(lm.device), labels=labels.to(lm.device))
        batches.append(batch)
    return CalibrationSet(batches=batches, source={"kind": "random", "n": n,
                                                   "note": "random tokens and images: systems benchmark"})


class SuiteSettings:
    """What a suite decides about a row's state besides its ``methods`` entry, for
    ``qvlm-bench perf --methods-from SUITE``: each scheme's quantization settings (the suite's
    ``quant`` block and the scheme's own overrides), the calibration set (``cells.calibration_spec``:
    task, split, n, seed, modality), the activation-range rule (``cells.act_range_rule``, with the
    suite's ``act_ranges`` stream) and the seed. Without a suite (``--methods``): the scheme's
    defaults, random calibration data, the default range rule."""

    def __init__(self, suite: str | None = None):
        self.name = suite
        self.suite = None
        self.quant: dict = {}
        if suite is not None:
            from ..suite_config import load_suite, read_suite_data

            self.suite = load_suite(suite)
            self.quant = dict(read_suite_data(suite)[0].get("quant") or {})

    def qcfg(self, scheme: str, overrides: dict | None = None, *, reference: bool = False):
        """The ``QuantConfig`` of ``scheme`` as the suite runs it (its entry in ``schemes`` where it
        lists the scheme, else the scheme with the suite's ``quant`` block), ``overrides`` on top."""
        if reference:
            return parse_scheme(scheme)
        base: dict = {}
        if self.suite is not None:
            from ..quant.config import OVERRIDE_KEYS

            listed = next((q for q in self.suite.schemes if q.scheme == scheme), None)
            base = ({k: v for k, v in listed.to_dict().items() if k in OVERRIDE_KEYS} if listed is not None
                    else dict(self.quant))
        return parse_scheme(scheme, **{**base, **(overrides or {})})

    def calibration(self, lm, variant: Variant, qcfg, workload: Workload):
        """The row's calibration set (None where it gets no data): the suite's own where the suite's
        task can be loaded for this model (``calibration.suite_calibration``, through lm-eval); else
        random batches, whose ``source`` says which set they stand in for and why."""
        if not uses_calibration(variant.cls, variant.act_clip_search, qcfg):
            return None
        if self.suite is None:
            return random_calibration(lm, workload)
        spec = calibration_spec(self.suite, variant, qcfg)
        try:
            from ..prepare import suite_calibration

            return suite_calibration(lm, self.suite, spec)
        except Exception as exc:  # noqa: BLE001 - no lm-eval on the GPU image, no processor for random weights
            calib = random_calibration(lm, workload)
            calib.source.update(instead_of=spec, why=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                                if str(exc) else type(exc).__name__)
            return calib

    def rule(self, variant: Variant, qcfg):
        return act_range_rule(self.suite, variant, qcfg)

    def seed(self, default: int) -> int:
        return self.suite.seed if self.suite is not None else default


def perf_state(lm, variant: Variant, qcfg, workload: Workload, *, seed: int = 0,
               settings: SuiteSettings | None = None):
    """``(state, state_key)``: the state a perf row times, made by the accuracy worker's path
    (``prepare.prepare_state``: the variant's options, the unchanged-model check, ``finalize_state``
    with the suites' activation-range rule), on the calibration data of ``settings`` where the row
    uses data (``cells.uses_calibration``; the suite's set, or random batches), and its
    ``cells.state_identity`` digest."""
    settings = settings or SuiteSettings()
    calib = settings.calibration(lm, variant, qcfg, workload)
    rule = settings.rule(variant, qcfg)
    state = prepare_state(lm, variant, qcfg, calib, rule, seed=seed)
    dtype = DTYPE_NAMES.get(lm.dtype, str(lm.dtype))
    device_kind = "cuda" if str(lm.device).startswith("cuda") else str(lm.device)
    ident = state_identity(lm.name, f"{lm.path}; seed {seed}", dtype, device_kind, variant, qcfg,
                           None if calib is None else {**calib.source, "digest": calib.digest()}, rule, seed)
    return state, digest(ident)


@dataclass
class Case:
    """One (variant, scheme, dtype) of a perf run, and what the run found for it. ``variant`` is
    the accuracy suites' ``cells.Variant`` (method class, resolved options, row label)."""

    variant: Variant
    scheme: str
    dtype: torch.dtype
    qcfg: object = None
    ref: gate_mod.SimReference | None = None
    quantize_s: float | None = None
    error: str | None = None
    proof: dict = field(default_factory=dict)
    trained: dict | None = None  # the trained-model gate, once per variant
    selection: list = field(default_factory=list)
    float_params: dict = field(default_factory=dict)  # the state's, for the engine
    state_key: str | None = None  # cells.state_identity's digest
    state_meta: dict = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.variant.method

    @property
    def is_reference(self) -> bool:
        return self.variant.reference

    @property
    def act_quant(self) -> bool:
        return self.qcfg is not None and self.qcfg.quantizes_acts

    @property
    def label(self) -> str:
        return f"{self.variant.label} {self.scheme} ({DTYPE_NAMES.get(self.dtype, self.dtype)})"


class StatePreparer:
    """Makes a ``Case``'s state on a model by the accuracy path, with its simulated reference, and
    the engine's deployed layers for it (the state-preparation side of a perf run)."""

    def __init__(self, *, device, gate_tokens: int, overrides: dict, seed: int = 0,
                 settings: SuiteSettings | None = None):
        self.settings = settings or SuiteSettings()
        self.device, self.gate_tokens, self.overrides = device, gate_tokens, overrides
        self.seed = self.settings.seed(seed)  # a suite's rows are made with the suite's seed

    def prepare(self, v: Case, lm, wl: Workload, exact: bool = False):
        """State of ``v`` on ``lm`` by the accuracy path (``prepare_state``) and its simulated
        reference (None state for the float baseline).

        ``exact``: also the float64 copy of the simulated model's logits (``gate.exact_reference``;
        small models only: it copies the model)."""
        ids1, pix1 = wl.batch(1)
        ids1, pix1 = ids1.to(self.device), images_to(pix1, self.device, lm.dtype)
        v.qcfg = self.settings.qcfg(v.scheme, self.overrides, reference=v.is_reference)

        def reference():
            v.ref = gate_mod.simulated_reference(lm.model, ids1, pix1, self.gate_tokens)
            if exact:
                m64 = copy.deepcopy(lm.model).to(torch.float64)
                v.ref.exact = gate_mod.exact_reference(m64, ids1, pix1, v.ref)
                del m64

        if v.is_reference:
            reference()
            return None
        state, v.state_key = perf_state(lm, v.variant, v.qcfg, wl, seed=self.seed, settings=self.settings)
        v.quantize_s = state.meta.get("quantize_s")
        v.proof = dict(state.meta.get("proof") or state.proof())
        v.state_meta = {k: state.meta.get(k) for k in ("act_ranges", "calibration")}
        handle = apply_state(lm.model, state, device=self.device)
        try:
            reference()
            v.proof["act_quantizers_fired"] = gate_mod.fake_linears_fired(lm.model)
        finally:
            handle.restore()
        return state

    def blocks(self, model, state, dtype):
        return state_blocks(model, state, device=self.device, dtype=dtype)
