"""The four registered Q-VLM variants end to end on the tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from harness.quant.build import target_linears
from harness.quant.config import parse_scheme
from harness.quant.simulated import applied
from harness.quant.state import QuantState
from harness.registry import available_methods, get_method

VARIANTS = {"qvlm": (True, True), "qvlm-cdm": (True, False), "qvlm-veo": (False, True),
            "qvlm-layerwise": (False, False)}
FAST = {"veo_epochs": 1, "veo_lr": 1e-3}
OPEN_CHOICES = ("h0", "cdm_tau", "grid", "passes", "max_block", "veo_lambda1", "veo_lambda2",
                "veo_eta", "veo_optimizer", "veo_lr", "veo_epochs")


def _snapshot(model):
    return ({n: p.detach().clone() for n, p in model.named_parameters()},
            [(n, type(m)) for n, m in model.named_modules()])


def _assert_unchanged(model, snap):
    params, modules = snap
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), n


def test_registered_with_defaults():
    methods = available_methods()
    for name in VARIANTS:
        cls = methods[name]
        assert cls.needs_calibration
        for key in OPEN_CHOICES:
            assert key in cls.defaults
    assert get_method("qvlm").defaults["grid"] == [1.0, 0.995, 0.99, 0.985, 0.98]
    with pytest.raises(ValueError):
        get_method("qvlm")(no_such_option=1)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_runs_and_leaves_model_unchanged(tiny_lm, tiny_calib, name):
    cdm, veo = VARIANTS[name]
    snap = _snapshot(tiny_lm.model)
    qcfg = parse_scheme("w4a4")
    state = get_method(name)(**FAST, h0=-1.0).quantize(tiny_lm, qcfg, tiny_calib)
    _assert_unchanged(tiny_lm.model, snap)
    meta = state.meta
    assert meta["stages"] == {"cdm": cdm, "veo": veo}
    assert meta["options"]["h0"] == -1.0 and meta["options"]["veo_epochs"] == 1
    assert set(meta["search_cost_s"]) == {"veo", "cdm", "search", "total"}
    assert (meta["search_cost_s"]["veo"] > 0) == veo and (meta["search_cost_s"]["cdm"] > 0) == cdm
    # h0 = -1 joins every pair: one block of both layers with CDM, singletons without
    assert meta["partition"] == ([[0, 1]] if cdm else [[0], [1]])
    assert ("dependencies" in meta) == cdm and ("veo" in meta) == veo
    assert bool(state.float_params) == veo
    for b in meta["blocks"]:
        assert b["block_error"] <= b["layerwise_error"]
    targets = target_linears(tiny_lm.model, qcfg)
    assert list(state.linears) == list(targets)
    assert set(meta["percentiles"]) == set(targets)
    proof = state.proof()
    assert proof["quantized_linears"] == len(targets) and proof["max_codes_per_row"] <= 16
    with applied(tiny_lm.model, state) as h:
        out = tiny_lm.model(**next(tiny_calib.inputs()))
        assert torch.isfinite(out.logits).all()
        assert h.act_quantizers_fired() == len(targets)
    _assert_unchanged(tiny_lm.model, snap)
    json.dumps(meta)  # records need plain JSON


def _same_state(a: QuantState, b: QuantState) -> None:
    assert list(a.linears) == list(b.linears)
    for n, la in a.linears.items():
        lb = b.linears[n]
        assert torch.equal(la.codes, lb.codes) and torch.equal(la.scale, lb.scale)
        assert la.act.to_meta() == lb.act.to_meta()
    assert a.float_params.keys() == b.float_params.keys()
    assert all(torch.equal(a.float_params[k], b.float_params[k]) for k in a.float_params)
    drop = lambda m: {k: v for k, v in m.items() if k not in ("search_cost_s", "summary", "blocks")}  # noqa: E731
    assert drop(a.meta) == drop(b.meta)


def test_same_seed_same_state(tiny_lm, tiny_calib, tmp_path):
    qcfg = parse_scheme("w4a4")
    a = get_method("qvlm")(**FAST, h0=-1.0, seed=3).quantize(tiny_lm, qcfg, tiny_calib)
    b = get_method("qvlm")(**FAST, h0=-1.0, seed=3).quantize(tiny_lm, qcfg, tiny_calib)
    _same_state(a, b)
    loaded = QuantState.load(a.save(tmp_path / "state"))
    _same_state(a, loaded)


def test_weight_only_and_other_parts(tiny_lm, tiny_calib):
    qcfg = parse_scheme("w4a16", parts=["language", "projector"])
    snap = _snapshot(tiny_lm.model)
    state = get_method("qvlm")(**FAST).quantize(tiny_lm, qcfg, tiny_calib)
    _assert_unchanged(tiny_lm.model, snap)
    assert state.meta["entropy_bits"] == 8  # cdm_bits: activations stay in float
    proj = [n for n in state.linears if "multi_modal_projector" in n]
    assert proj and all(state.linears[n].codes is not None for n in proj)
    assert all(lq.act is None for lq in state.linears.values())
    assert all(set(p) == {"a", "w"} for p in state.meta["percentiles"].values())


def test_float_scheme_is_empty(tiny_lm, tiny_calib):
    state = get_method("qvlm-cdm")().quantize(tiny_lm, parse_scheme("w16a16"), tiny_calib)
    assert not state.linears and not state.float_params
