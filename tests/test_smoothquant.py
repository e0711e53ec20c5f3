"""SmoothQuant (baselines/smoothquant.py) on the bundled qvlm-tiny-llava, in float64.

The scales are recomputed here from the mit-han-lab/smoothquant formula with hooks of their own
(norm outputs, not the SDK's capture); the smoothed float model must compute what the original
does; the smoothing must do what it is for (flatter activation channels, less output error than
RTN where activations are quantized); the state must pass the engine's checks and run.
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_pairs, output_error

ALL = ("vision", "language")


@pytest.fixture(scope="module")
def bundled(one_thread):
    from harness.models.loading import load_model

    return load_model("qvlm-tiny-llava", dtype="fp64")


@pytest.fixture(scope="module")
def batches(bundled):
    from harness.calibration import encode_pairs

    return list(encode_pairs(bundled, make_pairs(16), batch_size=8).inputs())


@pytest.fixture(scope="module")
def calib(bundled):
    from harness.calibration import encode_pairs

    return encode_pairs(bundled, make_pairs(16), batch_size=8)


def _reference_scales(model, batches, alpha):
    """Per norm-fed group and linear-fed group: s = max|X|^α / max|W|^(1−α) with the reference's
    clamps, X captured independently (the norm's output, or the linear's input for v→o/up→down)
    over real tokens in float64, max|W_j| over the rows of every linear of the group."""
    from harness.models.family import adapter_for

    ad = adapter_for(model)
    groups = []
    for prefix, layers in (ad.vision_layers(model), ad.language_layers(model)):
        for i, layer in enumerate(layers):
            groups += [(f"{prefix}.{i}", g) for g in ad.scale_groups(layer)]
    seen: dict[str, torch.Tensor] = {}
    mask = {}

    def record(key, x):
        x = x.detach().double()
        m = mask["m"]
        rows = x[m] if x.shape[:-1] == m.shape else x.reshape(-1, x.shape[-1])  # vision: all real
        amax = rows.abs().max(0).values
        seen[key] = amax if key not in seen else torch.maximum(seen[key], amax)

    handles = []
    for p, g in groups:
        key = f"{p}.{g.prev}"
        if g.after_norm:  # the norm's output is what its linears read
            handles.append(model.get_submodule(key).register_forward_hook(
                lambda _m, _a, out, _k=key: record(_k, out)))
        else:
            handles.append(model.get_submodule(f"{p}.{g.linears[0]}").register_forward_pre_hook(
                lambda _m, args, _k=key: record(_k, args[0])))
    try:
        with torch.no_grad():
            for b in batches:
                mask["m"] = b["attention_mask"].bool()
                model(**b, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for p, g in groups:
        w_max = None
        for n in g.linears:  # column maxima per linear, then the maximum over the linears
            col = model.get_submodule(f"{p}.{n}").weight.detach().double().abs().max(0).values
            w_max = col if w_max is None else torch.maximum(w_max, col)
        w_max = w_max.clamp(min=1e-5)
        out[(p, g.key)] = (seen[f"{p}.{g.prev}"] ** alpha / w_max ** (1 - alpha)).clamp(min=1e-5)
    return out


@pytest.mark.parametrize("alpha", [0.5, 0.85])
def test_scales_match_the_reference_formula_in_float64(bundled, batches, alpha):
    from baselines.smoothquant import smoothing_groups, smoothing_scales

    groups = smoothing_groups(bundled.model, ALL, fold_linears=True)
    ref = _reference_scales(bundled.model, batches, alpha)
    assert len(groups) == len(ref) == 4 * 3 + 4 * 4  # CLIP: qkv, out_proj, fc1; Llama: 4 groups
    for (p, g), s in zip(groups, smoothing_scales(bundled.model, groups, batches, alpha)):
        want = ref[(p, g.key)]
        assert s.dtype == torch.float64 and s.shape == want.shape
        torch.testing.assert_close(s, want, rtol=1e-12, atol=0, msg=f"{p} {g.key}")
    # the default smooths the norm-fed groups only, as the reference does
    assert all(g.after_norm for _, g in smoothing_groups(bundled.model, ALL))
    assert len(smoothing_groups(bundled.model, ("language",))) == 4 * 2


def test_state_holds_the_smoothed_norms_and_rtn_codes_of_the_smoothed_weights(bundled, calib):
    from baselines.smoothquant import smoothing_groups, smoothing_scales
    from harness.quant.build import linear_from_weight
    from harness.quant.config import parse_scheme
    from harness.registry import get_method

    qcfg = parse_scheme("w4a8", parts=ALL)
    state = get_method("smoothquant")().quantize(bundled, qcfg, calib)
    groups = smoothing_groups(bundled.model, ALL)
    scales = smoothing_scales(bundled.model, groups, list(calib.inputs()), 0.5)
    for (p, g), s in zip(groups, scales):
        norm = bundled.model.get_submodule(f"{p}.{g.prev}")
        torch.testing.assert_close(state.float_params[f"{p}.{g.prev}.weight"], norm.weight / s, rtol=1e-14, atol=0)
        if getattr(norm, "bias", None) is not None:
            torch.testing.assert_close(state.float_params[f"{p}.{g.prev}.bias"], norm.bias / s, rtol=1e-14, atol=0)
        for n in g.linears:
            w = bundled.model.get_submodule(f"{p}.{n}").weight
            want = linear_from_weight(w * s.view(1, -1), qcfg)
            assert torch.equal(state.linears[f"{p}.{n}"].codes, want.codes), n
            assert f"{p}.{n}.weight" not in state.float_params  # carried by the codes
    assert state.meta["smoothed_groups"] == 4 * 2 + 4 * 2


@pytest.mark.parametrize("fold_linears", [False, True])
def test_smoothed_float_model_equals_the_original(bundled, batches, fold_linears):
    """Exact in real arithmetic: in float64 the logits agree to round-off, both through the
    edited model and through a state carrying the edit as float params."""
    from baselines.smoothquant import smoothing_edit, smoothing_groups
    from harness.quant.config import parse_scheme
    from harness.quant.simulated import applied
    from harness.quant.state import QuantState
    from harness.quant.transforms import edited

    model = bundled.model
    edit = smoothing_edit(model, smoothing_groups(model, ALL, fold_linears), batches, alpha=0.5)
    assert len(edit.params) > 40  # norms and linears of both towers
    with torch.no_grad():
        ref = [model(**b, use_cache=False).logits for b in batches]
        with edited(model, edit):
            got = [model(**b, use_cache=False).logits for b in batches]
        state = QuantState(method="smoothquant", config=parse_scheme("w16a16"))
        edit.to_state(state)
        with applied(model, state):
            via_state = [model(**b, use_cache=False).logits for b in batches]
    for r, g, v, b in zip(ref, got, via_state, batches):
        m = b["attention_mask"].bool()
        scale = float(r[m].abs().max())
        assert float((g - r)[m].abs().max()) < 1e-12 * scale
        assert float((v - r)[m].abs().max()) < 1e-12 * scale
    # the model is restored after the block
    after = [model(**b, use_cache=False).logits for b in batches[:1]]
    assert torch.equal(after[0], ref[0])


def _smoothed_channel_maxima(model, batches, alpha, parts=ALL):
    """Per norm-fed group: max|X_j| of the group's input before and after smoothing (real tokens),
    and max|W_j| over the group's rows after it."""
    from baselines.smoothquant import smoothing_edit, smoothing_groups
    from harness.quant.capture import channel_stats
    from harness.quant.transforms import edited

    groups = smoothing_groups(model, parts)
    names = [f"{p}.{g.linears[0]}" for p, g in groups]
    before = channel_stats(model, names, batches)
    edit = smoothing_edit(model, groups, batches, alpha)
    with edited(model, edit):
        after = channel_stats(model, names, batches)
        w = [torch.cat([model.get_submodule(f"{p}.{n}").weight.detach().abs() for n in g.linears]).amax(0)
             for p, g in groups]
    return [(n, before[n], after[n], wj) for n, wj in zip(names, w)]


def test_alpha_one_flattens_activations_and_alpha_zero_flattens_weights(bundled, batches):
    """The two ends of the migration: α = 1 puts every activation channel's maximum at 1 (all the
    difficulty in the weights), α = 0 every weight column's maximum at 1."""
    for name, _, x, _ in _smoothed_channel_maxima(bundled.model, batches, 1.0):
        torch.testing.assert_close(x, torch.ones_like(x), rtol=1e-12, atol=0, msg=name)
    for name, _, _, w in _smoothed_channel_maxima(bundled.model, batches, 0.0):
        torch.testing.assert_close(w, torch.ones_like(w), rtol=1e-12, atol=0, msg=name)


def test_default_alpha_flattens_the_activation_channels(bundled, batches):
    """α = 0.5 makes the smoothed channel maxima ``√(max|X_j| · max|W_j|)``: their spread (the
    std of their logs) falls for every smoothed input, and in the language model the max/mean
    ratio (the outlier channels a per-tensor or per-token quantizer must cover) falls for every
    group. Measured: log-std 0.28-0.79 → 0.15-0.42, language max/mean 2.4-4.6 → 1.7-2.3. (The
    vision tower's first q/k/v input has no outlier channel to speak of, max/mean 1.96, and comes
    out at 2.20: smoothing spends weight range there for nothing, as the paper expects.)"""
    spread, ratios = [], []
    for name, x0, x1, _ in _smoothed_channel_maxima(bundled.model, batches, 0.5):
        s0, s1 = float(x0.log().std()), float(x1.log().std())
        assert s1 < 0.75 * s0, (name, s0, s1)
        spread.append(s1 / s0)
        if "language_model" in name:
            r0, r1 = float(x0.max() / x0.mean()), float(x1.max() / x1.mean())
            assert r1 < 0.85 * r0, (name, r0, r1)
            ratios.append(r1 / r0)
    assert len(spread) == 16 and len(ratios) == 8
    assert sum(spread) / len(spread) < 0.65 and sum(ratios) / len(ratios) < 0.7, (spread, ratios)


def test_smoothquant_beats_rtn_where_activations_are_quantized(bundled, calib):
    """Held-out logit error of the bundled model, static per-tensor activation ranges filled by
    the engine's rule for both: smoothing first must leave less error than RTN alone."""
    from harness.calibration import encode_pairs
    from harness.quant.config import parse_scheme
    from harness.quant.finalize import finalize_state
    from harness.quant.ranges import rule_for
    from harness.registry import get_method

    heldout = list(encode_pairs(bundled, make_pairs(16, seed=7), batch_size=8).inputs())
    qcfg = parse_scheme("w4a8", a_granularity="per_tensor")
    err = {}
    for name in ("rtn", "smoothquant"):
        state = get_method(name)().quantize(bundled, qcfg, calib)
        finalize_state(bundled.model, state, qcfg, list(calib.inputs()), rule_for(qcfg))
        err[name] = output_error(bundled, state, heldout)
    assert err["smoothquant"] < 0.8 * err["rtn"], err


def test_state_passes_finalize_and_runs(bundled, calib):
    from harness.quant.config import parse_scheme
    from harness.quant.finalize import finalize_state, param_checksum
    from harness.quant.ranges import rule_for
    from harness.quant.simulated import applied
    from harness.registry import get_method

    qcfg = parse_scheme("w4a4", a_granularity="per_tensor", parts=ALL)
    before = param_checksum(bundled.model)
    state = get_method("smoothquant")(fold_linears=True).quantize(bundled, qcfg, calib)
    assert param_checksum(bundled.model) == before  # the method left the model as it found it
    finalize_state(bundled.model, state, qcfg, list(calib.inputs()), rule_for(qcfg))
    n = 4 * 6 + 4 * 7  # CLIP: q, k, v, out, fc1, fc2; Llama: q, k, v, o, gate, up, down
    assert state.meta["proof"]["quantized_linears"] == n and state.meta["act_ranges"]["filled"] == n
    assert state.meta["options"] == {"alpha": 0.5, "fold_linears": True}
    with applied(bundled.model, state) as handle, torch.no_grad():
        logits = bundled.model(**next(calib.inputs()), use_cache=False).logits
        assert handle.act_quantizers_fired() == n
    assert torch.isfinite(logits).all()
    float_state = get_method("smoothquant")().quantize(bundled, parse_scheme("w16a16"), calib)
    assert not float_state.linears and not float_state.float_params


def test_registered_with_typed_options():
    from harness.registry import get_method

    cls = get_method("smoothquant")
    assert cls.needs_calibration and cls.defaults == {"alpha": 0.5, "fold_linears": False}
    assert cls(alpha=0.85).opts.alpha == 0.85
    with pytest.raises(ValueError, match="alpha"):
        cls(alpha="high")
