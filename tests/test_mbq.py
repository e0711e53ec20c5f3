"""MBQ: equal modality weights give AWQ exactly; the gradient sensitivities against an independent
float64 autograd computation; the weighted errors against MBQ's formulas; the state finalizes and runs."""

import numpy as np
import pytest
import torch

from harness.quant.config import parse_scheme
from harness.quant.simulated import applied
from harness.quant.state import QuantState
from harness.registry import get_method, method_source_files

from baselines.mbq import MBQ, Modalities, gradient_sensitivity, modality_error, modality_ratios
from conftest import make_pairs

pytestmark = pytest.mark.usefixtures("one_thread")


def _same_state(a: QuantState, b: QuantState) -> None:
    assert a.meta["alpha"] == b.meta["alpha"]
    assert a.linears.keys() == b.linears.keys() and a.float_params.keys() == b.float_params.keys()
    for n in a.float_params:
        assert torch.equal(a.float_params[n], b.float_params[n]), n
    assert all(lq.codes is not None for lq in a.linears.values())
    for n, la in a.linears.items():
        lb = b.linears[n]
        for attr in ("codes", "scale", "zero", "weight"):
            x, y = getattr(la, attr, None), getattr(lb, attr, None)
            assert (x is None) == (y is None), (n, attr)
            if x is not None:
                assert torch.equal(x, y), (n, attr)


@pytest.mark.parametrize("scheme", ["w4a4", "w4a16"])
def test_equal_weights_is_awq(tiny_lm, tiny_calib, scheme):
    """Every real token weighted 1 (vision ratio 1, all non-image tokens as text) under AWQ's
    squared error: the same α per group, the same folded norms, the same codes and scales."""
    qcfg = parse_scheme(scheme)
    awq = get_method("awq")().quantize(tiny_lm, qcfg, tiny_calib)
    mbq = get_method("mbq")(loss="sq", text_tokens="all", vision_weight=1.0).quantize(tiny_lm, qcfg, tiny_calib)
    _same_state(mbq, awq)
    assert mbq.method == "mbq" and mbq.meta["mbq"]["vision_weight"] == 1.0
    # and the weighting is live: MBQ's own objective picks other scales on this model
    other = get_method("mbq")().quantize(tiny_lm, qcfg, tiny_calib)
    assert other.meta["alpha"] != awq.meta["alpha"]


def _independent_sensitivity(model, batches):
    """Per residual writer: mean over samples of mean |∂L/∂y| over vision / answer tokens, with
    ∂L/∂y taken as the gradient of a zero offset added to y (float64, one sample at a time)."""
    image_id = model.config.image_token_id
    names = [n for n, _ in model.named_modules()
             if n.startswith("model.language_model.layers.") and n.endswith(("o_proj", "down_proj"))]
    acc = {n: {"vision": [], "text": []} for n in names}
    for batch in batches:
        for i in range(batch["input_ids"].shape[0]):
            sample = {k: v[i:i + 1] for k, v in batch.items()}
            deltas = {}

            def add(name):
                def hook(_m, _a, out):
                    deltas[name] = torch.zeros_like(out, requires_grad=True)
                    return out + deltas[name]
                return hook
            hs = [model.get_submodule(n).register_forward_hook(add(n)) for n in names]
            try:
                with torch.enable_grad():
                    loss = model(**sample, use_cache=False).loss
                    grads = torch.autograd.grad(loss, [deltas[n] for n in names])
            finally:
                for h in hs:
                    h.remove()
            vis = sample["input_ids"][0] == image_id
            ans = sample["labels"][0] != -100
            for n, g in zip(names, grads):
                acc[n]["vision"].append(g[0][vis].abs().mean().item())
                acc[n]["text"].append(g[0][ans].abs().mean().item())
    return {n: {k: float(np.mean(v)) for k, v in a.items()} for n, a in acc.items()}


def test_sensitivities_match_autograd_float64(tiny_llava_path):
    from harness.calibration import encode_pairs
    from harness.models.loading import load_model

    lm = load_model(str(tiny_llava_path), dtype="fp64", device="cpu")
    batches = encode_pairs(lm, make_pairs(6, seed=3), batch_size=3).batches
    ours = gradient_sensitivity(lm.model, batches)
    ref = _independent_sensitivity(lm.model, batches)
    assert ours.keys() == ref.keys() and len(ref) == 4
    for n in ref:
        assert ours[n]["samples_vision"] == ours[n]["samples_text"] == 6
        for k in ("vision", "text"):
            # ours: one pass per padded batch; the reference: one pass per sample. Equal in exact
            # arithmetic; transformers' RMSNorm rounds to float32 even in a float64 model, which
            # turns the batches' 1e-16 BLAS differences into ~1e-8
            assert ours[n][k] == pytest.approx(ref[n][k], rel=1e-6, abs=1e-300), (n, k)
    # Causal attention: the last layer's outputs at image positions reach no answer's logit,
    # so their gradient is exactly zero and MBQ's median floor is what weights that layer.
    last = "model.language_model.layers.1"
    assert ours[f"{last}.self_attn.o_proj"]["vision"] == 0.0 == ours[f"{last}.mlp.down_proj"]["vision"]
    assert ours["model.language_model.layers.0.self_attn.o_proj"]["vision"] > 0
    ratio, raw, median = modality_ratios(ours)
    for layer in raw:
        for m in ("self_attn", "mlp"):
            writer = "o_proj" if m == "self_attn" else "down_proj"
            r = ours[f"{layer}.{m}.{writer}"]["vision"] / ours[f"{layer}.{m}.{writer}"]["text"]
            assert raw[layer][m] == r
            assert median[m] == pytest.approx((raw["model.language_model.layers.0"][m] + raw[last][m]) / 2)
            assert ratio[layer][m] == max(r, median[m])
    assert ratio[last]["mlp"] == median["mlp"] > 0  # floored


def test_ratios_median_floor():
    """MBQ's rule on given gradients: r_l = ḡ_v/ḡ_t, floored at the median over layers, per module."""
    sens = {}
    for layer, (ra, rm) in enumerate([(0.5, 2.0), (0.1, 1.0), (0.3, 4.0)]):
        sens[f"m.layers.{layer}.self_attn.o_proj"] = {"vision": ra * 2.0, "text": 2.0}
        sens[f"m.layers.{layer}.mlp.down_proj"] = {"vision": rm * 0.5, "text": 0.5}
    ratio, raw, median = modality_ratios(sens)
    assert median == {"self_attn": pytest.approx(0.3), "mlp": pytest.approx(2.0)}
    assert [ratio[f"m.layers.{i}"]["self_attn"] for i in range(3)] == pytest.approx([0.5, 0.3, 0.3])
    assert [ratio[f"m.layers.{i}"]["mlp"] for i in range(3)] == pytest.approx([2.0, 2.0, 4.0])
    unfloored, _, _ = modality_ratios(sens, median_floor=False)
    assert unfloored == raw
    with pytest.raises(ValueError, match="text-token gradient"):
        modality_ratios({"m.layers.0.mlp.down_proj": {"vision": 1.0, "text": 0.0}})


def test_errors_are_mbqs_formulas():
    """The weighted errors over two calls, against MBQ's expressions (auto_scale.py) in float64:
    masks mark vision and text tokens, other (prompt, padding) tokens count for nothing."""
    g = torch.Generator().manual_seed(0)
    ref = [torch.randn(2, 7, 5, generator=g) for _ in range(2)]
    out = [r + 0.3 * torch.randn(r.shape, generator=g) for r in ref]
    vis = [torch.zeros(2, 7, dtype=torch.bool) for _ in range(2)]
    txt = [torch.zeros(2, 7, dtype=torch.bool) for _ in range(2)]
    vis[0][:, 1:4] = True
    vis[1][0, 2:6] = True
    txt[0][:, 5:] = True
    txt[1][:, 6] = True
    modal = Modalities(vis, txt)
    r = 0.37
    d = [(a - b).double() for a, b in zip(ref, out)]
    vm = torch.stack(vis).unsqueeze(-1).expand(2, 2, 7, 5)
    tm = torch.stack(txt).unsqueeze(-1).expand(2, 2, 7, 5)
    dd = torch.stack(d)
    expect = {
        "mae": ((dd.abs() * tm).sum() + r * (dd.abs() * vm).sum()) / (tm.sum() + vm.sum()),
        "mse": (dd.pow(2) * tm).sum() / tm.sum() + r * (dd.pow(2) * vm).sum() / vm.sum(),
        "sq": ((dd.pow(2) * tm).sum() + r * (dd.pow(2) * vm).sum()) / (tm.sum() + vm.sum()),
    }
    for loss, want in expect.items():
        err = modality_error(modal, r, loss)
        parts = [err(i, ref[i], out[i]) for i in range(2)]
        got = sum(p[0] for p in parts) / sum(p[1] for p in parts)
        assert got == pytest.approx(float(want), rel=1e-6), loss
    with pytest.raises(ValueError):
        modality_error(modal, r, "l1")


def test_state_finalizes_and_runs(tiny_lm, tiny_calib):
    from harness.quant.finalize import finalize_state
    from harness.quant.ranges import rule_for

    qcfg = parse_scheme("w4a4", parts=["vision", "projector", "language", "lm_head"],
                        a_granularity="per_tensor")
    state = get_method("mbq")().quantize(tiny_lm, qcfg, tiny_calib)
    rtn = get_method("rtn")().quantize(tiny_lm, qcfg, tiny_calib)
    assert set(state.linears) == set(rtn.linears)
    info = state.meta["mbq"]
    assert info["loss"] == "mae" and info["text_tokens"] == "answer"
    assert info["tokens"]["vision"] == 16 * tiny_calib.n and info["tokens"]["text"] > 0
    assert set(info["ratio"]) == {f"model.language_model.layers.{i}" for i in range(2)}
    assert all(r > 0 for layer in info["ratio"].values() for r in layer.values())
    finalize_state(tiny_lm.model, state, qcfg, list(tiny_calib.inputs()), rule_for(qcfg))  # model untouched
    with applied(tiny_lm.model, state) as h:
        out = tiny_lm.model(**next(tiny_calib.inputs()), use_cache=False)
        assert h.act_quantizers_fired() == len(state.linears)
    assert torch.isfinite(out.logits).all()


def test_registered_options_and_cache_key():
    m = get_method("mbq")()
    assert isinstance(m, MBQ) and m.needs_calibration
    assert m.options["loss"] == "mae" and m.options["vision_weight"] is None
    assert m.options["n_grid"] == 20 and m.options["apply_clip"] is True  # AWQ's, inherited
    with pytest.raises(ValueError, match="loss"):
        get_method("mbq")(loss="l1")
    files = {p.name for p in method_source_files(MBQ)}
    assert {"mbq.py", "awq.py", "answers.py"} <= files
