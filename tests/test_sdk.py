"""The method SDK: Hadamard constructions, exact folds, the capture helper, typed options and
the method cache key — each checked against an independent float64 reference."""

from __future__ import annotations

import math
import sys
import textwrap
from dataclasses import dataclass
from typing import Literal

import pytest
import torch

from harness.models.family import UnknownFamilyError, adapter_for, scale_groups_of
from harness.quant.capture import channel_stats, image_token_mask, shared_input_sets
from harness.quant.transforms import (
    FloatEdit, apply_hadamard, edited, hadamard_factors, hadamard_matrix, random_signs)
from harness.registry import check_option_types, get_method, method_source_files

from conftest import linear_inputs


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@pytest.mark.parametrize("n", [1, 2, 8, 12, 20, 28, 64, 148, 768, 1536])
def test_hadamard_is_orthogonal_with_entries_plus_minus_one(n):
    h = hadamard_matrix(n) * math.sqrt(n)
    assert torch.allclose(h.abs(), torch.ones_like(h), atol=1e-12)  # ±1 entries
    assert torch.allclose(h @ h.T, n * torch.eye(n, dtype=torch.float64), atol=1e-9)


def test_power_of_two_hadamard_is_sylvesters():
    assert torch.allclose(hadamard_matrix(64), _sylvester(64) / 8, atol=1e-15)


def test_apply_hadamard_is_the_kronecker_product():
    """x H with H = (H_m ⊗ H_p)/√n, the dense factors built independently."""
    m, p = hadamard_factors(768)
    assert (m, p) == (12, 64)
    h_m = hadamard_matrix(12) * math.sqrt(12)
    dense = torch.kron(h_m, _sylvester(64)) / math.sqrt(768)
    x = torch.randn(5, 768, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(apply_hadamard(x), x @ dense, atol=1e-12)


def test_sizes_of_the_models_people_quantize():
    assert hadamard_factors(11008) == (344, 32)  # LLaVA-1.5-7B's MLP (Paley I, q = 343 = 7³)
    assert hadamard_factors(18944) == (148, 128)  # Qwen2.5-7B's MLP (Paley II, q = 73)
    assert hadamard_factors(3584) == (28, 128)  # Qwen2.5-7B's hidden size (Paley II, q = 13)
    with pytest.raises(ValueError, match="no Hadamard matrix of order 6"):
        hadamard_factors(6)


def _layer0(lm):
    path, layers = adapter_for(lm.model).language_layers(lm.model)
    return f"{path}.0", layers[0]


def _layer_out(layer, x, pos):
    out = layer(x, position_embeddings=pos, attention_mask=None)
    return out[0] if isinstance(out, tuple) else out


def _rotary(lm, x):
    lang = lm.model.model.language_model
    pos_ids = torch.arange(x.shape[1]).unsqueeze(0)
    return lang.rotary_emb(x, pos_ids)


def test_scale_folds_leave_the_layer_unchanged(tiny_lm):
    lm = tiny_lm
    lm.model.double()
    prefix, layer = _layer0(lm)
    x = torch.randn(2, 7, layer.self_attn.q_proj.in_features, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1))
    pos = _rotary(lm, x)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    ref = _layer_out(layer, x, pos)
    edit = FloatEdit(lm.model)
    gen = torch.Generator().manual_seed(2)
    groups = scale_groups_of(layer)
    assert [g.key for g in groups] == ["q_proj+k_proj+v_proj", "o_proj", "gate_proj+up_proj", "down_proj"]
    for g in groups:
        n = layer.get_submodule(g.linears[0]).in_features
        edit.scale_group(prefix, g, torch.rand(n, dtype=torch.float64, generator=gen) * 4 + 0.25)
    with edited(lm.model, edit):
        got = _layer_out(layer, x, pos)
        assert not torch.equal(layer.input_layernorm.weight, before[f"{prefix}.input_layernorm.weight"])
    assert (got - ref).abs().max() <= 1e-12 * ref.abs().max()
    for k, v in lm.model.state_dict().items():  # edited() restored every tensor
        assert torch.equal(v, before[k]), k


def test_online_hadamard_is_exact_and_seen_by_capture(tiny_lm, tiny_calib):
    """An online Hadamard in front of down_proj: the model's output is unchanged, and every
    statistic taken through the capture helper sees the transformed input (x H)."""
    lm = tiny_lm
    lm.model.double()
    prefix, _ = _layer0(lm)
    down = f"{prefix}.mlp.down_proj"
    batches = list(tiny_calib.inputs())[:1]
    batches = [{k: v.double() if v.is_floating_point() else v for k, v in b.items()} for b in batches]
    with torch.no_grad():
        ref = lm.model(**batches[0], use_cache=False).logits
    raw = linear_inputs(lm.model, [down], lambda: lm.model(**batches[0], use_cache=False))[down][0]
    edit = FloatEdit(lm.model)
    edit.online_hadamard(down)
    with edited(lm.model, edit):
        with torch.no_grad():
            got = lm.model(**batches[0], use_cache=False).logits
        amax = channel_stats(lm.model, [down], batches, stat="absmax")[down]
    assert (got - ref).abs().max() <= 1e-10 * ref.abs().max()
    mask = batches[0]["attention_mask"].bool()
    expect = (raw[mask] @ hadamard_matrix(raw.shape[-1])).abs().amax(0)
    assert torch.allclose(amax, expect, atol=1e-12)


def test_residual_rotation_of_a_layer_commutes(tiny_lm):
    """Norm fused, readers W Q, writers Qᵀ W: the layer maps x Q to y Q (float64)."""
    lm = tiny_lm
    lm.model.double()
    prefix, layer = _layer0(lm)
    d = layer.self_attn.q_proj.in_features
    x = torch.randn(1, 5, d, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    pos = _rotary(lm, x)
    ref = _layer_out(layer, x, pos)
    signs = random_signs(d, seed=4)
    q = torch.diag(signs) @ hadamard_matrix(d)
    edit = FloatEdit(lm.model)
    edit.fuse_norm(f"{prefix}.input_layernorm", [f"{prefix}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")])
    edit.fuse_norm(f"{prefix}.post_attention_layernorm", [f"{prefix}.mlp.gate_proj", f"{prefix}.mlp.up_proj"])
    for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
        edit.rotate_reader(f"{prefix}.{n}", signs)
    for n in adapter_for(lm.model).residual_writers(layer):
        edit.rotate_writer(f"{prefix}.{n}", signs)
    with edited(lm.model, edit):
        got = _layer_out(layer, x @ q, pos)
    # transformers' LlamaRMSNorm computes its rsqrt in float32 even for float64 inputs, so the
    # rotated stream's norm differs from the original by float32 round-off, not float64's
    assert (got - ref @ q).abs().max() <= 1e-7 * ref.abs().max()


def test_channel_stats_count_real_tokens_only(tiny_lm, tiny_calib):
    lm = tiny_lm
    name = "model.language_model.layers.1.self_attn.q_proj"
    batches = list(tiny_calib.inputs())
    seen = linear_inputs(lm.model, [name], lambda: [lm.model(**b, use_cache=False) for b in batches])[name]
    rows = torch.cat([x[b["attention_mask"].bool()] for x, b in zip(seen, batches)])
    assert any(not bool(b["attention_mask"].all()) for b in batches)  # padding exists
    got = channel_stats(lm.model, [name], batches, stat="absmax")[name]
    assert torch.allclose(got.double(), rows.abs().amax(0), rtol=1e-6)
    got = channel_stats(lm.model, [name], batches, stat="absmean")[name]
    assert torch.allclose(got.double(), rows.abs().mean(0), rtol=1e-5)


def test_image_tokens_and_shared_inputs(tiny_lm, tiny_calib):
    b = next(iter(tiny_calib.inputs()))
    image_id = adapter_for(tiny_lm.model).image_token_id(tiny_lm.model)
    mask = image_token_mask(b, image_id)
    per_image = tiny_lm.model.config.image_seq_length
    assert int(mask.sum()) == per_image * b["pixel_values"].shape[0]
    x, y = torch.ones(2, 3), torch.ones(2, 3)
    assert shared_input_sets([("q", x), ("k", x), ("v", x), ("o", y)]) == [["q", "k", "v"], ["o"]]


def test_unknown_family_names_the_supported_ones():
    class Cfg:
        model_type = "mamba"

    class M(torch.nn.Module):
        config = Cfg()
    with pytest.raises(UnknownFamilyError, match="supported families: llava-1.5"):
        adapter_for(M())


def test_typed_options_name_the_option_and_the_type():
    @dataclass
    class Opts:
        alpha: float = 0.5
        steps: int = 3
        on: bool = True
        mode: Literal["a", "b"] = "a"
        limit: int | None = None

    check_option_types("m", Opts, {"alpha": 1, "steps": 2, "on": False, "mode": "b", "limit": None})
    for bad, msg in [({"steps": 2.5}, "'steps' must be int"), ({"on": "yes"}, "'on' must be bool"),
                     ({"steps": True}, "'steps' must be int"), ({"mode": "c"}, "'mode' must be one of a, b"),
                     ({"alpha": "x"}, "'alpha' must be float"), ({"limit": "7"}, "'limit' must be")]:
        with pytest.raises(ValueError, match=msg):
            check_option_types("m", Opts, bad)
    awq = get_method("awq")(n_grid=10)
    assert awq.opts.n_grid == 10 and awq.options["n_grid"] == 10 and awq.options["apply_clip"] is True


def test_cache_key_covers_every_file_a_method_imports(tmp_path, monkeypatch):
    files = {f.relative_to(f.parents[2]).as_posix() if "harness" in f.parts else f.name
             for f in method_source_files(get_method("awq"))}
    assert {"awq.py", "harness/quant/capture.py", "harness/quant/transforms.py",
            "harness/models/family.py"} <= files
    # a method installed elsewhere, in a module that imports a helper module beside it
    (tmp_path / "ext_helpers.py").write_text("SCALE = 2\n")
    (tmp_path / "ext_unrelated.py").write_text("UNUSED = 1\n")
    (tmp_path / "ext_mine.py").write_text(textwrap.dedent("""
        from harness.registry import Method
        from ext_helpers import SCALE

        class Mine(Method):
            name = "ext-mine-test"
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = __import__("ext_mine")
    try:
        names = sorted(f.name for f in method_source_files(mod.Mine))
        assert names == ["ext_helpers.py", "ext_mine.py"]
    finally:
        for key in [k for k in sys.modules if k.startswith("ext_")]:
            del sys.modules[key]


def test_edited_and_to_state_hold_one_cast_at_a_time():
    """A float edit of a model costs its float working copies and one parameter's cast, never a
    model's worth of casts or of saved originals beside them (QuaRot on a 7B model on an 80 GB GPU
    needed this): every cast is released before the next is made, the originals wait in host
    memory, and the model comes back bit for bit. (The GPU run of QuaRot on Qwen2.5-VL-7B shapes is
    the measurement: docs/benchmarks/suite_7b.md.)"""
    import weakref

    from harness.quant.config import QuantConfig
    from harness.quant.state import QuantState

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(4)]).float()  # casts are new tensors
    before = {k: v.clone() for k, v in model.state_dict().items()}
    edit = FloatEdit(model)
    for i in range(4):
        edit.online_hadamard(str(i))
    alive, made = [], []
    real = FloatEdit.cast_each

    def watched(self):
        for path, value in real(self):
            alive.append(sum(r() is not None for r in made))  # earlier casts still referenced
            made.append(weakref.ref(value))
            yield path, value

    FloatEdit.cast_each = watched
    try:
        with edited(model, edit):
            for i in range(4):
                assert torch.equal(model[i].weight, edit.params[f"{i}.weight"].float())
        state = QuantState(method="test", config=QuantConfig())
        edit.to_state(state)
    finally:
        FloatEdit.cast_each = real
    # inside edited(): each cast gone before the next (the old dict of casts held all four); to_state
    # keeps each as the state's float parameter in host memory (on the CPU that is the cast itself)
    assert len(made) == 8 and alive[:4] == [0] * 4, alive
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert sorted(state.float_params) == [f"{i}.weight" for i in range(4)]
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in state.float_params.values())
