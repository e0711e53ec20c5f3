"""Q-VLM clipping-percentile search: joint block search vs layer-wise, and what the search computes."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from harness.models.capture import LayerCall
from harness.quant.blockwise import part_inputs
from harness.quant.build import rtn_state
from harness.quant.config import parse_scheme
from harness.quant.simulated import applied
from harness.quant.state import QuantState
from methods.qvlm import search as search_mod
from methods.qvlm.search import DEFAULT_GRID, output_error, search_block, weight_clip_ratios


def _block_setup(lm, calib, layer_ids):
    inputs = part_inputs(lm.model, "language", calib.inputs())
    layers = [inputs.layers[i] for i in layer_ids]
    names = [[n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)] for layer in layers]
    return inputs, layers, names


def _search(lm, calib, qcfg, joint, layer_ids=(0, 1), q_noise=0.0, **kw):
    inputs, layers, names = _block_setup(lm, calib, list(layer_ids))
    f_in = [c.hidden for c in inputs.calls]
    # quantized-path inputs: the float inputs perturbed, as after already-quantized blocks
    gen = torch.Generator().manual_seed(3)
    q_in = [h + q_noise * h.std() * torch.randn(h.shape, generator=gen) for h in f_in]
    res = search_block(layers, list(layer_ids), inputs.calls, q_in, f_in, inputs.masks, qcfg, names,
                       joint=joint, **kw)
    return inputs, res, q_in


def _state(inputs, qcfg, res):
    st = QuantState("qvlm-test", qcfg)
    for key, lq in res.entries.items():
        i, _, local = key.partition(".")
        st.linears[f"{inputs.path}.{i}.{local}"] = lq
    return st


def _run(layers, calls, hidden):
    from harness.models.capture import layer_output

    out = list(hidden)
    with torch.no_grad():
        for layer in layers:
            out = [layer_output(layer, c.with_hidden(h)) for c, h in zip(calls, out)]
    return out


@pytest.mark.parametrize("scheme,noise,kw", [
    ("w4a4", 0.0, {}), ("w4a4", 0.05, {}), ("w6a6", 0.0, {}),  # layer coordinates: exhaustive
    # coordinate descent (objective on one batch, for time): groups, and weights too
    ("w16a4", 0.05, {"coordinates": "group", "eval_batches": 1}),
    ("w4a4", 0.05, {"coordinates": "group", "eval_batches": 1}),
    ("w3a16", 0.0, {"search_weights": True, "coordinates": "group", "eval_batches": 1}),
    ("w4a4", 0.05, {"search_weights": True, "eval_batches": 1})])  # 625 combinations
def test_joint_never_worse_than_layerwise_and_is_what_the_model_computes(tiny_lm, tiny_calib,
                                                                          scheme, noise, kw):
    qcfg = parse_scheme(scheme)
    _, lw, _ = _search(tiny_lm, tiny_calib, qcfg, joint=False, q_noise=noise, **kw)
    inputs, bw, q_in = _search(tiny_lm, tiny_calib, qcfg, joint=True, q_noise=noise, **kw)
    assert lw.block_error == lw.layerwise_error
    assert bw.layerwise_error == lw.block_error  # the joint search starts from the same solution
    assert bw.block_error <= lw.block_error
    small = kw.get("coordinates", "layer") == "layer" and not kw.get("search_weights")
    assert bw.search["joint"]["search"] == ("exhaustive" if small else "descent")
    # the errors are those of the simulated model built from the returned entries
    _, layers, _ = _block_setup(tiny_lm, tiny_calib, [0, 1])
    float_out = _run(layers, inputs.calls, [c.hidden for c in inputs.calls])
    k = len(bw.q_out)  # the batches the objective used
    for res in (lw, bw):
        with applied(tiny_lm.model, _state(inputs, qcfg, res)):
            out = _run(layers, inputs.calls[:k], q_in[:k])
        assert output_error(out, float_out[:k], inputs.masks[:k]) == pytest.approx(res.block_error, rel=1e-6)
        for q, o in zip(res.q_out, out):
            torch.testing.assert_close(q, o)


def test_activation_only_by_default_weights_are_rtn(tiny_lm, tiny_calib):
    qcfg = parse_scheme("w4a4")
    inputs, res, _ = _search(tiny_lm, tiny_calib, qcfg, joint=True)
    rtn = rtn_state(tiny_lm.model, qcfg, "rtn")
    for name, lq in _state(inputs, qcfg, res).linears.items():
        assert torch.equal(lq.codes, rtn.linears[name].codes)
        assert torch.equal(lq.scale, rtn.linears[name].scale)
    assert all(p["w"] == 1.0 for groups in res.percentiles.values() for p in groups.values())
    assert any(p["a"] < 1.0 for groups in res.percentiles.values() for p in groups.values())
    # weight-only scheme: nothing to search unless weights are searched
    _, wo, _ = _search(tiny_lm, tiny_calib, parse_scheme("w3a16"), joint=True)
    assert wo.search["layerwise"][0]["search"] == "none" and wo.block_error == wo.layerwise_error
    _, ws, _ = _search(tiny_lm, tiny_calib, parse_scheme("w3a16"), joint=True, search_weights=True)
    assert any(p["w"] < 1.0 for groups in ws.percentiles.values() for p in groups.values())


def test_grid_of_one_is_round_to_nearest(tiny_lm, tiny_calib):
    qcfg = parse_scheme("w4a4")
    inputs, res, _ = _search(tiny_lm, tiny_calib, qcfg, joint=True, grid=[1.0], search_weights=True)
    rtn = rtn_state(tiny_lm.model, qcfg, "rtn")
    st = _state(inputs, qcfg, res)
    assert set(st.linears) == {n for n in rtn.linears if n.startswith(inputs.path)}
    for name, lq in st.linears.items():
        assert torch.equal(lq.codes, rtn.linears[name].codes)
        assert lq.act.clip_ratio == 1.0
    assert res.evaluations == 3  # one combination per layer, one for the block


def test_groups_share_the_input_tensor(tiny_lm, tiny_calib):
    _, res, _ = _search(tiny_lm, tiny_calib, parse_scheme("w4a4"), joint=False, search_weights=True,
                        coordinates="group", eval_batches=1)
    groups = set(res.percentiles[0])
    assert groups == {"self_attn.q_proj+self_attn.k_proj+self_attn.v_proj", "self_attn.o_proj",
                      "mlp.gate_proj+mlp.up_proj", "mlp.down_proj"}
    for ps in res.percentiles[0].values():
        assert ps["a"] in DEFAULT_GRID and ps["w"] in DEFAULT_GRID


def test_per_tensor_activations(tiny_lm, tiny_calib):
    """Q-VLM decides its own static ranges: layer 0's q/k/v range is the full range of their
    (float) input over real tokens, shrunk by the clip ratio of the chosen percentile (1 at p = 1)."""
    from conftest import linear_inputs, symmetric_static_scale
    from harness.models.capture import layer_output

    qcfg = parse_scheme("w4a4", a_granularity="per_tensor")
    inputs, res, q_in = _search(tiny_lm, tiny_calib, qcfg, joint=True)
    for lq in res.entries.values():
        assert lq.act.granularity == "per_tensor"
    layer0 = inputs.layers[0]
    seen = linear_inputs(layer0, ["self_attn.q_proj"],
                         lambda: [layer_output(layer0, c.with_hidden(h)) for c, h in zip(inputs.calls, q_in)])
    p_a = res.percentiles[0]["self_attn.q_proj+self_attn.k_proj+self_attn.v_proj"]["a"]
    for local in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        act = res.entries[f"0.{local}"].act
        assert (act.clip_ratio == 1.0) == (p_a == 1.0) and act.clip_ratio <= 1.0
        expected = symmetric_static_scale(seen["self_attn.q_proj"], 4, inputs.masks, clip=act.clip_ratio)
        assert float(act.scale) == pytest.approx(expected, rel=1e-5)
    with applied(tiny_lm.model, _state(inputs, qcfg, res)) as h:
        tiny_lm.model(**next(tiny_calib.inputs()))
        assert h.act_quantizers_fired() == len(res.entries)


def test_weight_clip_ratios_are_monotone():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    for gs in (None, 16):
        r = weight_clip_ratios(w, gs, DEFAULT_GRID)
        assert torch.equal(r[1.0], torch.ones_like(r[1.0]))
        for hi, lo in zip(DEFAULT_GRID, DEFAULT_GRID[1:]):
            assert (r[lo] <= r[hi]).all() and (r[lo] > 0).all()
        assert r[0.98].shape == (16, 1 if gs is None else 4, 1)


def test_layer_coordinates_share_one_value_per_layer(tiny_lm, tiny_calib):
    inputs, layers, names = _block_setup(tiny_lm, tiny_calib, [0, 1])
    f_in = [c.hidden for c in inputs.calls]
    res = search_block(layers, [0, 1], inputs.calls, f_in, f_in, inputs.masks, parse_scheme("w4a4"),
                       names, eval_batches=1)  # coordinates="layer", the default
    for groups in res.percentiles.values():
        assert len({p["a"] for p in groups.values()}) == 1
    assert res.block_error <= res.layerwise_error
    # layer-wise: 5 values per layer; joint: all 25 pairs
    assert res.evaluations == 5 + 5 + 25
    assert res.search["joint"]["combinations"] == 25
    assert len(res.q_out) == 1  # the objective (and q_out) cover the first batch only


# ---- a constructed block where the layer-wise optimum is not the block optimum -----------------

class _Lin(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.proj = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
        with torch.no_grad():
            self.proj.weight.copy_(w)

    def forward(self, x):
        return self.proj(x)


def _outlier_block(amp: float, n_layers: int = 2, d: int = 256, tokens: int = 256):
    """Channel 0 is a constant outlier (4 sigma). Layer-wise, clipping it pays (it shrinks every
    channel's rounding step); the last layer amplifies channel 0 by ``amp``, so at the block output
    keeping it wins — and once one layer clips it, unclipping the other alone gains nothing: the
    layer-wise solution is a fixed point of coordinate descent."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, tokens, d, generator=gen, dtype=torch.float64)
    x[..., 0] = 4.0
    last = torch.eye(d, dtype=torch.float64)
    last[0, 0] = amp
    layers = [_Lin(torch.eye(d, dtype=torch.float64)) for _ in range(n_layers - 1)] + [_Lin(last)]
    return x, layers


# the harness's quantizers compute in float32 whatever the input (harness.quant.quantizer); the
# reference below computes in float64
REL = 1e-5


def _brute_force(x, layers, grid, bits=4):
    """Every combination, by an independent implementation: static symmetric per-tensor ranges at
    the p-quantile of |float input| (order statistic round(p (n-1)) of all values), codes -8..7."""
    qmax = 2 ** (bits - 1) - 1
    with torch.no_grad():
        fl = [x]
        for layer in layers:
            fl.append(fl[-1] @ layer.proj.weight.T)

        def threshold(h, p):
            a = h.abs().reshape(-1).sort().values
            return float(a[round(p * (a.numel() - 1))])

        errors = {}
        for combo in itertools.product(grid, repeat=len(layers)):
            h = x
            for layer, p, f in zip(layers, combo, fl):
                s = threshold(f, p) / qmax
                h = (torch.clamp(torch.round(h / s), -qmax - 1, qmax) * s) @ layer.proj.weight.T
            errors[combo] = float((h - fl[-1]).pow(2).mean())
    return errors


def _run_constructed(x, layers, **kw):
    qcfg = parse_scheme("w16a4", a_granularity="per_tensor")
    n = len(layers)
    res = search_block(layers, list(range(n)), [LayerCall((x,), {})], [x], [x], [None], qcfg,
                       [["proj"]] * n, **kw)
    return res, tuple(res.percentiles[i]["proj"]["a"] for i in range(n))


@pytest.mark.parametrize("amp,start", [(3.0, "unclipped"), (2.0, "uniform")])
def test_joint_search_finds_the_block_optimum_layerwise_misses(amp, start):
    x, layers = _outlier_block(amp)
    brute = _brute_force(x, layers, DEFAULT_GRID)
    best = min(brute, key=brute.get)
    lw, lw_p = _run_constructed(x, layers, joint=False)
    assert brute[lw_p] == pytest.approx(lw.block_error, rel=REL)  # same objective, same answer
    assert brute[lw_p] > 1.4 * brute[best]  # layer-wise is far from the block optimum
    for exhaustive_max in (125, 0):  # exhaustive enumeration, and coordinate descent
        res, p = _run_constructed(x, layers, exhaustive_max=exhaustive_max)
        assert p == best
        assert res.block_error == pytest.approx(brute[best], rel=REL)
        assert res.layerwise_error == pytest.approx(brute[lw_p], rel=REL)
        if exhaustive_max:  # the record says how close the best losing combination came
            assert res.search["joint"]["runner_up_error"] == pytest.approx(sorted(brute.values())[1], rel=REL)
    # descent from the layer-wise solution stays there (a single pass from it cannot help);
    # another start reaches the optimum
    runs = {r["start"]: r for r in res.search["joint"]["starts"]}
    assert runs["layerwise"]["error"] == pytest.approx(lw.block_error, rel=1e-12)
    assert res.search["joint"]["winner"] == start
    assert runs[start]["error"] == pytest.approx(brute[best], rel=REL)


def test_exhaustive_search_is_a_tree_over_layers():
    x, layers = _outlier_block(3.0, n_layers=3, d=64, tokens=64)
    res, p = _run_constructed(x, layers)
    brute = _brute_force(x, layers, DEFAULT_GRID)
    assert res.search["joint"]["combinations"] == 125
    assert p == min(brute, key=brute.get)
    # layer-wise: 3 x (5 + 1 propagation); joint tree: 5 + 25 + 125; the result's output: 3
    assert res.layer_passes == 3 * 6 + 155 + 3


def test_choices_do_not_flip_on_rounding_noise(tiny_lm, tiny_calib, monkeypatch):
    """Errors perturbed by 1e-9 relative (far more than float64 noise between machines) give the
    same percentiles: every comparison goes through harness.quant.ties."""
    qcfg = parse_scheme("w4a4")
    kw = {"eval_batches": 1, "coordinates": "group"}  # descent: the most comparisons
    _, ref, _ = _search(tiny_lm, tiny_calib, qcfg, joint=True, **kw)
    gen = torch.Generator().manual_seed(1)
    exact = search_mod.output_error

    def noisy(*a):
        return exact(*a) * (1 + 1e-9 * float(torch.randn((), generator=gen)))

    monkeypatch.setattr(search_mod, "output_error", noisy)
    _, again, _ = _search(tiny_lm, tiny_calib, qcfg, joint=True, **kw)
    assert again.percentiles == ref.percentiles


def test_output_error_keeps_float64():
    t = torch.full((1, 4, 8), 1e4, dtype=torch.float64)
    o = t + 1e-3
    assert output_error([o], [t], [None]) == pytest.approx(1e-6, rel=1e-6)
    assert output_error([o.float()], [t.float()], [None]) != pytest.approx(1e-6, rel=1e-2)
