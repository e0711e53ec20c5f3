"""Q-VLM visual encoder optimization: every term acts on the tower, the Jacobian weights survive
half precision, training lowers the terms and keeps the float loss."""

from __future__ import annotations

import pytest
import torch

from harness.models.layers import part_of
from harness.quant.config import parse_scheme
from methods.qvlm import encoder as encoder_mod
from methods.qvlm.encoder import (VEO, JacobianWeightsError, VEOConfig, _rel_err,
                                  optimize_vision_encoder, ste_quant)

# The float model's calibration loss may rise by at most this much (nats) while VEO trades it
# against entropy and quantization error. L_reg is part of the objective, so it usually falls.
FLOAT_LOSS_TOLERANCE = 0.02


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}, \
        {n: p.requires_grad for n, p in model.named_parameters()}, \
        [type(m) for m in model.modules()]


@pytest.mark.parametrize("scheme", ["w4a4", "w6a6"])
def test_veo_lowers_entropy_and_error_keeps_float_loss(tiny_lm, tiny_calib, scheme):
    model = tiny_lm.model
    params, flags, types = _snapshot(model)
    cfg = VEOConfig(epochs=3, lr=1e-3)  # defaults otherwise; lr raised for a 6-step run
    new, info = optimize_vision_encoder(model, parse_scheme(scheme), tiny_calib.batches, cfg)
    before, after = info["before"], info["after"]
    assert after["ent"] < before["ent"]
    assert after["err"] < before["err"]
    assert after["reg"] <= before["reg"] + FLOAT_LOSS_TOLERANCE
    assert after["total"] < before["total"]
    assert info["steps"] == 3 * len(tiny_calib.batches)
    w = torch.tensor(info["jacobian_weights"])
    assert torch.isclose(w.sum(), torch.tensor(1.0)) and (w >= 0).all()
    # only vision-tower parameters, in the model's dtype; the model itself is untouched
    assert new and all(part_of(n) == "vision" for n in new)
    assert all(new[n].dtype == params[n].dtype and not torch.equal(new[n], params[n]) for n in new)
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]) and p.requires_grad == flags[n], n
    assert [type(m) for m in model.modules()] == types


def test_veo_same_seed_same_weights(tiny_lm, tiny_calib):
    cfg = VEOConfig(epochs=1, lr=1e-3, seed=5)
    a, ia = optimize_vision_encoder(tiny_lm.model, parse_scheme("w4a4"), tiny_calib.batches, cfg)
    b, ib = optimize_vision_encoder(tiny_lm.model, parse_scheme("w4a4"), tiny_calib.batches, cfg)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert ia["after"] == ib["after"]


def test_veo_micro_batches_approximate_whole_batches(tiny_lm, tiny_calib):
    """Splitting a batch for memory weights each chunk's loss by its share of the sequences:
    close to the whole-batch step, not identical (HF's loss is a per-token mean, and Adam's
    normalized step amplifies tiny gradient differences), so compare where training ends. The
    entropy term is off: its random positions are drawn per chunk."""
    cfg = dict(epochs=1, lr=1e-3, lambda1=0.0)
    _, a = optimize_vision_encoder(tiny_lm.model, parse_scheme("w6a6"), tiny_calib.batches, VEOConfig(**cfg))
    _, b = optimize_vision_encoder(tiny_lm.model, parse_scheme("w6a6"), tiny_calib.batches,
                                   VEOConfig(**cfg, micro_batch=4))
    for k in ("reg", "err"):  # entropy positions are drawn per chunk: not comparable
        assert abs(a["before"][k] - b["before"][k]) < 1e-3 * abs(a["before"][k])
        assert abs(a["after"][k] - b["after"][k]) <= 0.1 * abs(a["before"][k] - a["after"][k]) + 1e-6


def test_veo_without_report_skips_the_evaluations(tiny_lm, tiny_calib):
    cfg = VEOConfig(epochs=1, lr=1e-3, report=False, jacobian_batches=1)
    new, info = optimize_vision_encoder(tiny_lm.model, parse_scheme("w4a4"), tiny_calib.batches, cfg)
    assert new and info["before"] is None and info["after"] is None
    assert len(info["jacobian_weights"]) == 1  # two decoder layers: one pair


# ---- each loss term acts on the tower -----------------------------------------------------------

def _flat_grad(loss, params):
    grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                      for g, p in zip(grads, params)])


def _double(tiny_lm, tiny_calib):
    model = tiny_lm.model.double()
    batch = {k: v.double() if v.is_floating_point() else v for k, v in tiny_calib.batches[0].items()}
    return model, batch


TERMS = {"reg": "reg", "ent": "ent", "err": "err", "err_vision": "err"}


@pytest.mark.parametrize("a_granularity", ["per_token", "per_tensor"])
@pytest.mark.parametrize("term", list(TERMS))
def test_each_term_changes_the_update_and_a_step_on_it_lowers_it(tiny_lm, tiny_calib, term,
                                                                 a_granularity):
    """With only the language model quantized (the default parts), every term of L moves the
    tower: the gradient of L with the term differs from L without it, and a small step against
    the term's own gradient lowers the term (float64 model, fixed entropy positions)."""
    model, batch = _double(tiny_lm, tiny_calib)
    veo = VEO(model, parse_scheme("w4a4", a_granularity=a_granularity), [batch], VEOConfig())
    weights = torch.tensor([1.0], dtype=torch.float64)
    with veo.prepared():
        params = list(veo.vision_params.values())
        t = veo.terms(batch, weights, seed=7)
        lam = {"reg": 1.0, "ent": veo.cfg.lambda1, "err": veo.cfg.lambda2}[TERMS[term]]
        g_all = _flat_grad(veo.total(t), params)
        without = {**t, term: t[term].detach()} if term != "err_vision" else \
            {**t, "err": t["err"] - t["err_vision"]}  # L_err keeps its output part
        g_without = _flat_grad(veo.total(without), params)
        g_term = _flat_grad(t[term], params)
        assert float(g_term.norm()) > 0
        torch.testing.assert_close(g_all - g_without, lam * g_term)
        assert float((g_all - g_without).norm()) > 1e-2 * float(g_all.norm())
        theta = [p.detach().clone() for p in params]
        for eps in (1e-2, 1e-3):
            with torch.no_grad():
                offset = 0
                for p, th in zip(params, theta):
                    n = p.numel()
                    p.copy_(th - eps * (g_term[offset:offset + n] / g_term.norm()).reshape(p.shape))
                    offset += n
                after = float(veo.terms(batch, weights, seed=7)[term].detach())
                for p, th in zip(params, theta):
                    p.copy_(th)
            assert after < float(t[term].detach()), (term, eps)


def test_vision_term_had_no_gradient_through_a_straight_through_estimator(tiny_lm, tiny_calib):
    """Why X^v_q goes through the quantizer without a straight-through estimator: with a float
    tower, X^v_q and X^v_r are the same function of the tower's weights, and an identity
    backward leaves ‖Q(X^v) − X^v‖ a value without a gradient."""
    model, batch = _double(tiny_lm, tiny_calib)
    veo = VEO(model, parse_scheme("w4a4"), [batch], VEOConfig())
    with veo.prepared():
        params = list(veo.vision_params.values())
        _, _, xv = veo._forward(batch, quant=False)
        assert xv.shape[0] == int((batch["input_ids"] == veo.image_token).sum())  # visual rows only
        ste = _rel_err(ste_quant(xv, veo.xv_act), xv)
        exact = veo.vision_error(xv, xv)
        assert float(ste.detach()) == pytest.approx(float(exact.detach())) and float(exact.detach()) > 0
        assert float(_flat_grad(ste, params).abs().max()) == 0.0
        assert float(_flat_grad(exact, params).abs().max()) > 0.0


# ---- the Jacobian weights in half precision -----------------------------------------------------

def _weights(lm, calib, **cfg):
    veo = VEO(lm.model, parse_scheme("w4a4"), calib.batches, VEOConfig(**cfg))
    with veo.prepared():
        return veo.jacobian_weights()


def test_jacobian_weights_survive_half_precision_underflow(tmp_path, monkeypatch):
    """At 7B in fp16, ∂E^(n)/∂logits (a relative error over ~10^8 logits) is ~1e-10 per element and
    underflows: the weights came out uniform. Here E^(n) is scaled by 1e-6 to put the tiny model's
    gradient there; loss scaling recovers the float32 weights, the unscaled backward gets zeros."""
    from harness.calibration import encode_pairs
    from harness.models.loading import load_model
    from harness.models.tiny import TinyLlavaSpec, build_tiny_llava

    from tests.conftest import make_pairs

    path = build_tiny_llava(tmp_path, TinyLlavaSpec(seed=0, text_layers=4))  # three weights
    pairs = make_pairs(16)
    lm32 = load_model(str(path), dtype="fp32", device="cpu")
    ref, _ = _weights(lm32, encode_pairs(lm32, pairs, batch_size=8))
    lm16 = load_model(str(path), dtype="fp16", device="cpu")
    calib16 = encode_pairs(lm16, pairs, batch_size=8)
    small = lambda a, b, m=None: 1e-6 * _rel_err(a, b, m)  # noqa: E731
    monkeypatch.setattr(encoder_mod, "_rel_err", small)
    w16, report = _weights(lm16, calib16)
    assert report["fallback"] is None and report["loss_scale"][0] > 2 ** 30
    torch.testing.assert_close(w16, ref, atol=0.02, rtol=0)
    assert float((w16 - 1 / len(w16)).abs().max()) > 0.1  # far from uniform
    # the same gradient without loss scaling: nothing reaches the layers
    veo = VEO(lm16.model, parse_scheme("w4a4"), calib16.batches, VEOConfig())
    with veo.prepared():
        batch = calib16.batches[0]
        with torch.no_grad():
            out_r, _, _ = veo._forward(batch, quant=False)
        out_q, hid_q, _ = veo._forward(batch, quant=True)
        grads = torch.autograd.grad(small(out_q.logits, out_r.logits, batch["attention_mask"]),
                                    hid_q[:-1])
        assert all(float(g.float().abs().max()) == 0.0 for g in grads)


@pytest.mark.parametrize("broken", ["zero", "nan"])
def test_jacobian_failure_fails_or_is_recorded(tiny_lm, tiny_calib, monkeypatch, broken):
    value = 0.0 if broken == "zero" else float("nan")
    monkeypatch.setattr(encoder_mod, "_rel_err", lambda a, b, m=None: value * (a.float() - b.float()).sum())
    with pytest.raises(JacobianWeightsError, match="veo_jacobian_fallback: uniform"):
        _weights(tiny_lm, tiny_calib)
    w, report = _weights(tiny_lm, tiny_calib, jacobian_fallback="uniform")
    assert torch.equal(w, torch.full_like(w, 1 / len(w)))
    assert report["fallback"].startswith("uniform weights")


def test_jacobian_fallback_reaches_the_state_meta(tiny_lm, tiny_calib, monkeypatch):
    from harness.registry import get_method

    monkeypatch.setattr(encoder_mod, "_rel_err", lambda a, b, m=None: 0.0 * (a.float() - b.float()).sum())
    opts = {"veo_epochs": 1, "veo_report": False}
    with pytest.raises(JacobianWeightsError):
        get_method("qvlm-veo")(**opts).quantize(tiny_lm, parse_scheme("w4a4"), tiny_calib)
    state = get_method("qvlm-veo")(**opts, veo_jacobian_fallback="uniform").quantize(
        tiny_lm, parse_scheme("w4a4"), tiny_calib)
    assert state.meta["warnings"] and "uniform" in state.meta["warnings"][0]
    assert state.meta["summary"]["veo_fallback"].startswith("uniform")


def test_auto_micro_batch_is_the_whole_batch_on_cpu(tiny_lm, tiny_calib):
    _, info = optimize_vision_encoder(tiny_lm.model, parse_scheme("w4a4"), tiny_calib.batches,
                                      VEOConfig(epochs=1, report=False, jacobian_batches=1))
    assert info["memory"]["micro_batch"] == "whole batch"
