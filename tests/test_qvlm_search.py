"""Q-VLM clipping-percentile search: block-wise vs layer-wise, and what the search computes."""

from __future__ import annotations

import pytest
import torch

from harness.quant.blockwise import part_inputs
from harness.quant.build import rtn_state
from harness.quant.config import parse_scheme
from harness.quant.simulated import applied
from harness.quant.state import QuantState
from methods.qvlm.search import DEFAULT_GRID, output_error, search_block, weight_clip_ratios


def _block_setup(lm, calib, layer_ids):
    inputs = part_inputs(lm.model, "language", calib.inputs())
    layers = [inputs.layers[i] for i in layer_ids]
    names = [[n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)] for layer in layers]
    return inputs, layers, names


def _search(lm, calib, qcfg, joint, layer_ids=(0, 1), q_noise=0.0, grid=DEFAULT_GRID, passes=1):
    inputs, layers, names = _block_setup(lm, calib, list(layer_ids))
    f_in = [c.hidden for c in inputs.calls]
    # quantized-path inputs: the float inputs perturbed, as after already-quantized blocks
    gen = torch.Generator().manual_seed(3)
    q_in = [h + q_noise * h.std() * torch.randn(h.shape, generator=gen) for h in f_in]
    res = search_block(layers, list(layer_ids), inputs.calls, q_in, f_in, inputs.masks, qcfg, names,
                       grid=grid, passes=passes, joint=joint)
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


@pytest.mark.parametrize("scheme,noise", [("w4a4", 0.0), ("w4a4", 0.05), ("w6a6", 0.0),
                                          ("w3a16", 0.0), ("w16a4", 0.05)])
def test_block_search_never_worse_than_layerwise(tiny_lm, tiny_calib, scheme, noise):
    qcfg = parse_scheme(scheme)
    _, lw, _ = _search(tiny_lm, tiny_calib, qcfg, joint=False, q_noise=noise)
    inputs, bw, q_in = _search(tiny_lm, tiny_calib, qcfg, joint=True, q_noise=noise, passes=2)
    assert lw.block_error == lw.layerwise_error
    assert bw.layerwise_error == pytest.approx(lw.block_error, rel=1e-6)
    assert bw.block_error <= lw.block_error
    # the errors are those of the simulated model built from the returned entries
    _, layers, _ = _block_setup(tiny_lm, tiny_calib, [0, 1])
    float_out = _run(layers, inputs.calls, [c.hidden for c in inputs.calls])
    for res in (lw, bw):
        with applied(tiny_lm.model, _state(inputs, qcfg, res)):
            out = _run(layers, inputs.calls, q_in)
        assert output_error(out, float_out, inputs.masks) == pytest.approx(res.block_error, rel=1e-5)
        for q, o in zip(res.q_out, out):
            torch.testing.assert_close(q, o)


def test_grid_of_one_is_round_to_nearest(tiny_lm, tiny_calib):
    qcfg = parse_scheme("w4a4")
    inputs, res, _ = _search(tiny_lm, tiny_calib, qcfg, joint=True, grid=[1.0])
    rtn = rtn_state(tiny_lm.model, qcfg, "rtn")
    st = _state(inputs, qcfg, res)
    assert set(st.linears) == {n for n in rtn.linears if n.startswith(inputs.path)}
    for name, lq in st.linears.items():
        assert torch.equal(lq.codes, rtn.linears[name].codes)
        assert lq.act.clip_ratio == 1.0
    assert res.evaluations == 2  # one baseline evaluation per layer, nothing else to try


def test_groups_share_the_input_tensor(tiny_lm, tiny_calib):
    _, res, _ = _search(tiny_lm, tiny_calib, parse_scheme("w4a4"), joint=False)
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


def test_layer_coordinates_share_one_pair_per_layer(tiny_lm, tiny_calib):
    qcfg = parse_scheme("w4a4")
    _, lw, _ = _search(tiny_lm, tiny_calib, qcfg, joint=False)
    inputs, layers, names = _block_setup(tiny_lm, tiny_calib, [0, 1])
    f_in = [c.hidden for c in inputs.calls]
    res = search_block(layers, [0, 1], inputs.calls, f_in, f_in, inputs.masks, qcfg, names,
                       coordinates="layer", eval_batches=1)
    for groups in res.percentiles.values():
        assert len({(p["a"], p["w"]) for p in groups.values()}) == 1
    assert res.block_error <= res.layerwise_error
    assert res.evaluations == 2 * (1 + 2 * 4) + 2 * 2 * 4  # init per layer, then one block sweep
    assert len(res.q_out) == 1  # the objective (and q_out) cover the first batch only
