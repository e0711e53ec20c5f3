"""The registered Q-VLM variants and the fp16+veo control end to end on the tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from harness.quant.build import rtn_state, target_linears
from harness.quant.config import parse_scheme
from harness.quant.simulated import applied
from harness.quant.state import QuantState
from harness.registry import available_methods, get_method
from harness.cells import DEFAULT_CALIBRATION

VARIANTS = {"qvlm": (True, True), "qvlm-cdm": (True, False), "qvlm-veo": (False, True),
            "qvlm-layerwise": (False, False)}
FAST = {"veo_epochs": 1, "veo_lr": 1e-3}
OPEN_CHOICES = ("h0_rule", "h0", "cdm_tau", "grid", "coordinates", "search_weights", "exhaustive_max",
                "max_block", "veo_lambda1", "veo_lambda2", "veo_eta", "veo_optimizer", "veo_lr",
                "veo_epochs", "veo_micro_batch", "veo_jacobian_fallback")


def _snapshot(model):
    return ({n: p.detach().clone() for n, p in model.named_parameters()},
            [(n, type(m)) for n, m in model.named_modules()])


def _assert_unchanged(model, snap):
    params, modules = snap
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), n


def test_registered_with_the_papers_defaults_and_a_fast_preset():
    methods = available_methods()
    for name in VARIANTS:
        cls = methods[name]
        assert cls.needs_calibration
        for key in OPEN_CHOICES:
            assert key in cls.defaults
        assert set(cls.presets) == {"fast"}
        cls(**cls.presets["fast"])  # every preset option is a valid option
    d = get_method("qvlm").defaults
    # the paper's settings: grid 1.0..0.98 by 0.005, blocks of <= 3 layers, 10 VEO epochs,
    # activation clipping only; 64 calibration pairs in batches of 8 are the engine's default
    assert d["grid"] == [1.0, 0.995, 0.99, 0.985, 0.98]
    assert (d["max_block"], d["veo_epochs"], d["search_weights"]) == (3, 10, False)
    assert d["coordinates"] == "layer" and 5 ** 3 <= d["exhaustive_max"]  # blocks of 3: exhaustive
    assert (DEFAULT_CALIBRATION["n"], DEFAULT_CALIBRATION["batch_size"]) == (64, 8)
    assert d["search_batches"] is None and d["veo_report"] is True
    assert (d["h0_rule"], d["h0"]) == ("median", None)  # no deep model yet to choose the rule by
    with pytest.raises(ValueError):
        get_method("qvlm")(no_such_option=1)
    for bad in ({"veo_micro_batch": 0}, {"veo_jacobian_fallback": "ignore"},
                {"search_weights": "yes"}, {"coordinates": "channel"}, {"h0_rule": "mode"},
                {"h0": 0.5}, {"h0_rule": "absolute"}):
        with pytest.raises(ValueError):
            get_method("qvlm")(**bad).quantize(None, parse_scheme("w4a4"), None)
    control = methods["fp16+veo"]
    assert control.quantizes is False and control.needs_calibration
    assert set(control.defaults) < set(d) and control.presets["fast"]["veo_epochs"] == 1


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_runs_and_leaves_model_unchanged(tiny_lm, tiny_calib, name):
    cdm, veo = VARIANTS[name]
    snap = _snapshot(tiny_lm.model)
    qcfg = parse_scheme("w4a4")
    state = get_method(name)(**FAST, h0_rule="absolute", h0=-1.0).quantize(tiny_lm, qcfg, tiny_calib)
    _assert_unchanged(tiny_lm.model, snap)
    meta = state.meta
    assert meta["stages"] == {"cdm": cdm, "veo": veo}
    assert meta["options"]["h0"] == -1.0 and meta["options"]["veo_epochs"] == 1
    assert meta["options"]["h0_rule"] == "absolute" and meta.get("h0_rule") == ("absolute" if cdm else None)
    assert set(meta["search_cost_s"]) == {"veo", "cdm", "search", "total"}
    assert (meta["search_cost_s"]["veo"] > 0) == veo and (meta["search_cost_s"]["cdm"] > 0) == cdm
    # h0 = -1 joins every pair: one block of both layers with CDM, singletons without
    assert meta["partition"] == ([[0, 1]] if cdm else [[0], [1]])
    assert ("dependencies" in meta) == cdm and ("veo" in meta) == veo
    assert bool(state.float_params) == veo
    for b in meta["blocks"]:
        assert b["block_error"] <= b["layerwise_error"]
        assert ("joint" in b["search"]) == cdm
    targets = target_linears(tiny_lm.model, qcfg)
    assert list(state.linears) == list(targets)
    assert set(meta["percentiles"]) == set(targets)
    # activation clipping only: weights are the scheme's round-to-nearest
    rtn = rtn_state(tiny_lm.model, qcfg, "rtn")
    assert all(torch.equal(state.linears[n].codes, rtn.linears[n].codes) for n in targets)
    assert all(p["w"] == 1.0 for p in meta["percentiles"].values())
    proof = state.proof()
    assert proof["quantized_linears"] == len(targets) and proof["max_codes_per_row"] <= 16
    with applied(tiny_lm.model, state) as h:
        out = tiny_lm.model(**next(tiny_calib.inputs()))
        assert torch.isfinite(out.logits).all()
        assert h.act_quantizers_fired() == len(targets)
    _assert_unchanged(tiny_lm.model, snap)
    if veo:  # the record reports each VEO term before and after
        for when in ("veo_before", "veo_after"):
            assert set(meta["summary"][when]) >= {"reg", "ent", "err", "err_vision", "err_output", "total"}
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
    a = get_method("qvlm")(**FAST, h0_rule="absolute", h0=-1.0, seed=3).quantize(tiny_lm, qcfg, tiny_calib)
    b = get_method("qvlm")(**FAST, h0_rule="absolute", h0=-1.0, seed=3).quantize(tiny_lm, qcfg, tiny_calib)
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
    # nothing to search (weights are not searched by default): round-to-nearest everywhere
    rtn = rtn_state(tiny_lm.model, qcfg, "rtn")
    assert all(torch.equal(state.linears[n].codes, rtn.linears[n].codes) for n in state.linears)
    assert all(b["search"]["layerwise"][0]["search"] == "none" for b in state.meta["blocks"])


def test_static_ranges_outside_the_search_are_the_engines(tiny_lm, tiny_calib):
    """Q-VLM sets the ranges it searched; the others stay None for the engine to fill (contract
    item 3), which its finalize step then does."""
    from harness.quant.finalize import finalize_state
    from harness.quant.ranges import rule_for

    qcfg = parse_scheme("w4a4", a_granularity="per_tensor", parts=["language", "projector"])
    state = get_method("qvlm-layerwise")(**FAST).quantize(tiny_lm, qcfg, tiny_calib)
    lang = [n for n in state.linears if "language_model" in n]
    proj = [n for n in state.linears if "multi_modal_projector" in n]
    assert lang and all(state.linears[n].act.scale is not None for n in lang)
    assert proj and all(state.linears[n].act.scale is None for n in proj)
    searched = {n: state.linears[n].act.scale.clone() for n in lang}
    finalize_state(tiny_lm.model, state, qcfg, list(tiny_calib.inputs()), rule_for(qcfg))
    assert state.meta["act_ranges"]["filled"] == len(proj)
    assert all(state.linears[n].act.scale is not None for n in proj)
    assert all(torch.equal(state.linears[n].act.scale, searched[n]) for n in lang)


def test_float_scheme_is_empty(tiny_lm, tiny_calib):
    state = get_method("qvlm-cdm")().quantize(tiny_lm, parse_scheme("w16a16"), tiny_calib)
    assert not state.linears and not state.float_params
    state = get_method("fp16+veo")().quantize(tiny_lm, parse_scheme("w16a16"), tiny_calib)
    assert not state.linears and not state.float_params


def test_fp16_veo_control_is_the_tuned_tower_only(tiny_lm, tiny_calib):
    """The control's tower is the one qvlm-veo would use (same VEO options), per scheme; nothing
    is quantized."""
    snap = _snapshot(tiny_lm.model)
    opts = {"veo_epochs": 1, "veo_lr": 1e-3}
    towers = {}
    for scheme in ("w4a4", "w6a6"):
        state = get_method("fp16+veo")(**opts).quantize(tiny_lm, parse_scheme(scheme), tiny_calib)
        _assert_unchanged(tiny_lm.model, snap)
        assert not state.linears and state.float_params and state.proof()["quantized_linears"] == 0
        assert state.meta["quantizes"] is False and state.meta["summary"]["veo_after"]
        towers[scheme] = state.float_params
    veo = get_method("qvlm-veo")(**opts).quantize(tiny_lm, parse_scheme("w4a4"), tiny_calib)
    assert veo.float_params.keys() == towers["w4a4"].keys()
    assert all(torch.equal(veo.float_params[k], towers["w4a4"][k]) for k in towers["w4a4"])
    # the objective depends on the scheme, so the towers differ
    assert any(not torch.equal(towers["w4a4"][k], towers["w6a6"][k]) for k in towers["w4a4"])
    with applied(tiny_lm.model, state):
        out = tiny_lm.model(**next(tiny_calib.inputs()))
        assert torch.isfinite(out.logits).all()
    _assert_unchanged(tiny_lm.model, snap)


def _finalized(lm, calib, name, qcfg, **options):
    from harness.quant.finalize import finalize_state
    from harness.quant.ranges import rule_for

    state = get_method(name)(**options).quantize(lm, qcfg, calib)
    return finalize_state(lm.model, state, qcfg, list(calib.inputs()), rule_for(qcfg))


def _same_linears(a: QuantState, b: QuantState) -> list[str]:
    """Linears whose codes, scales or activation quantizer (range included) differ."""
    assert list(a.linears) == list(b.linears)
    differ = []
    for n, la in a.linears.items():
        lb = b.linears[n]
        same = torch.equal(la.codes, lb.codes) and torch.equal(la.scale, lb.scale) \
            and torch.equal(la.zero, lb.zero) and la.act.to_meta() == lb.act.to_meta()
        for k in ("scale", "zero"):
            x, y = getattr(la.act, k), getattr(lb.act, k)
            same = same and (x is None) == (y is None) and (x is None or torch.equal(x, y))
        if not same:
            differ.append(n)
    return differ


@pytest.mark.parametrize("parts", [["language"], ["language", "projector"]])
def test_grid_of_one_is_the_rtn_row_on_the_same_stream(tiny_lm, tiny_calib, parts):
    """Issue 29 item 4: with the grid holding only p = 1 the layer-wise search changes nothing,
    so its finalized state must be the RTN row's, static ranges included: the searched layers
    take their ranges from the stream the engine gives every other row (weights quantized,
    activation quantizers off). The float stream (the `range_stream: float` control) does not."""
    qcfg = parse_scheme("w4a4", a_granularity="per_tensor", parts=parts)
    rtn = _finalized(tiny_lm, tiny_calib, "rtn", qcfg)
    same = _finalized(tiny_lm, tiny_calib, "qvlm-layerwise", qcfg, grid=[1.0])
    assert same.meta["range_stream"] == "weights"
    assert _same_linears(same, rtn) == []
    batch = next(tiny_calib.inputs())
    with applied(tiny_lm.model, rtn):
        ref = tiny_lm.model(**batch).logits
    with applied(tiny_lm.model, same):
        assert torch.equal(tiny_lm.model(**batch).logits, ref)
    # the control: ranges from the float model's inputs differ wherever a quantized weight
    # upstream changes the input; only the searched (language) layers' ranges are Q-VLM's
    floated = _finalized(tiny_lm, tiny_calib, "qvlm-layerwise", qcfg, grid=[1.0], range_stream="float")
    assert floated.meta["range_stream"] == "float"
    differ = _same_linears(floated, rtn)
    assert differ and all(".layers." in n for n in differ)
    if parts == ["language"]:  # layer 0's q/k/v read the embeddings, the same in both streams
        assert "model.language_model.layers.0.self_attn.q_proj" not in differ


def test_range_stream_must_be_named(tiny_lm, tiny_calib):
    with pytest.raises(ValueError, match="range_stream must be 'weights'.*set range_stream: weights"):
        get_method("qvlm-layerwise")(range_stream="quantized").quantize(tiny_lm, parse_scheme("w4a4"), tiny_calib)


@pytest.mark.parametrize("granularity", ["per_tensor", "per_token"])
def test_linear_objective_in_group_coordinates_is_the_rtn_clip_row(tiny_lm, tiny_calib, granularity):
    """The bridge between the engine's `+clip` lever and Q-VLM's search: `objective: linear`
    with `coordinates: group` is the engine's clipping search itself (the same tensors, the same
    error, the same stream), so its finalized state is `rtn+clip`'s; with `coordinates: layer`
    it keeps that objective and changes only the coordinates: one percentile per layer, shared
    by the layer's activation tensors, the one minimizing the sum of the engine's errors."""
    from harness.quant.finalize import finalize_state
    from harness.quant.ranges import rule_for

    qcfg = parse_scheme("w4a4", a_granularity=granularity)
    batches = list(tiny_calib.inputs())
    rtn_clip = finalize_state(tiny_lm.model, get_method("rtn")().quantize(tiny_lm, qcfg, None), qcfg,
                              batches, rule_for(qcfg, act_clip_search=True))
    group = _finalized(tiny_lm, tiny_calib, "qvlm-layerwise", qcfg, coordinates="group", objective="linear")
    assert _same_linears(group, rtn_clip) == []
    engine_p = rtn_clip.meta["act_ranges"]["percentiles"]
    assert {n: p["a"] for n, p in group.meta["percentiles"].items()} == engine_p
    # the engine's choices differ inside a layer (else this model could not tell the coordinates apart)
    by_layer: dict[str, set] = {}
    for n, p in engine_p.items():
        by_layer.setdefault(n.split(".mlp.")[0].split(".self_attn.")[0], set()).add(p)
    assert any(len(ps) > 1 for ps in by_layer.values())
    layer = _finalized(tiny_lm, tiny_calib, "qvlm-layerwise", qcfg, objective="linear")
    assert layer.meta["objective"] == "linear" and layer.meta["range_stream"] == "weights"
    lp: dict[str, set] = {}
    for n, p in layer.meta["percentiles"].items():
        lp.setdefault(n.split(".mlp.")[0].split(".self_attn.")[0], set()).add(p["a"])
    assert set(lp) == set(by_layer) and all(len(ps) == 1 for ps in lp.values())
    # the shared value is the argmin of the summed engine errors: recompute them here
    from harness.quant.ranges import SEARCH_GRID, SEARCH_ROWS, _candidates, _Collector, _weights_only
    from harness.quant.simulated import apply_state, quantize_activation
    from harness.quant.ties import stable_argmin

    rtn = rtn_state(tiny_lm.model, qcfg, "rtn")
    lang = [n for n in rtn.linears if ".layers." in n]
    col = _Collector(tiny_lm.model, lang, -(-SEARCH_ROWS // len(batches)))
    h = apply_state(tiny_lm.model, _weights_only(rtn, set()))
    try:
        col.run(batches)
    finally:
        h.restore()
    for prefix, ps in lp.items():
        errs = [0.0] * len(SEARCH_GRID)
        for s in col.shared_sets():
            if not s[0].startswith(prefix + "."):
                continue
            x = torch.cat(col.rows[s[0]], 0)
            lo, hi = float(min(col.lo[n] for n in s)), float(max(col.hi[n] for n in s))
            for i, act in enumerate(_candidates(rtn.linears[s[0]].act, qcfg, lo, hi, x, SEARCH_GRID)):
                d = quantize_activation(x, act) - x
                errs[i] += sum(float((d @ rtn.linears[n].dequantized().to(x.dtype).T).pow(2).sum()) for n in s)
        assert ps == {SEARCH_GRID[stable_argmin(errs)]}


def test_objective_must_be_named_and_layerwise(tiny_lm, tiny_calib):
    qcfg = parse_scheme("w4a4")
    with pytest.raises(ValueError, match="objective must be 'output'.*set objective: output"):
        get_method("qvlm-layerwise")(objective="mse").quantize(tiny_lm, qcfg, tiny_calib)
    with pytest.raises(ValueError, match="no block form.*qvlm-layerwise"):
        get_method("qvlm-cdm")(objective="linear").quantize(tiny_lm, qcfg, tiny_calib)
    with pytest.raises(ValueError, match="range_stream: weights"):
        get_method("qvlm-layerwise")(objective="linear", range_stream="float").quantize(tiny_lm, qcfg, tiny_calib)
