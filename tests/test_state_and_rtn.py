"""RTN on the tiny LLaVA: codes, activation quantizers, reversible application, state round trip."""

import torch

from harness.quant.config import parse_scheme
from harness.quant.quantizer import fake_quant
from harness.quant.simulated import FakeQuantLinear, applied, apply_state
from harness.quant.state import QuantState
from harness.registry import get_method


def _inputs(lm):
    from conftest import make_pairs
    from harness.calibration import encode_pairs

    return next(encode_pairs(lm, make_pairs(2), batch_size=2).inputs())


def test_rtn_w4a4_codes_and_per_token_activations(tiny_lm):
    state = get_method("rtn")().quantize(tiny_lm, parse_scheme("w4a4"), None)
    proof = state.proof()
    n_linears = sum(isinstance(m, torch.nn.Linear) and "language_model" in n
                    for n, m in tiny_lm.model.named_modules())
    assert proof["quantized_linears"] == n_linears == 14
    assert proof["max_codes_per_row"] <= 16
    with applied(tiny_lm.model, state) as handle:
        name, fake = next(iter(handle.fake_linears().items()))
        assert fake.act.granularity == "per_token" and fake.act.bits == 4
        seen = {}
        fake.register_forward_hook(lambda m, a, o: seen.update(x=a[0], y=o))
        tiny_lm.model(**_inputs(tiny_lm))
        assert handle.act_quantizers_fired() == n_linears
        # output = per-token 4-bit input @ dequantized weight, recomputed independently
        xq = fake_quant(seen["x"].double(), 4, sym=True, dim=-1)
        w = state.linears[name].dequantized().double()
        assert torch.allclose(seen["y"].double(), xq @ w.T, atol=1e-4)


def test_apply_and_restore_leave_float_model_identical(tiny_lm):
    before = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    batch = _inputs(tiny_lm)
    with torch.no_grad():
        ref = tiny_lm.model(**batch).logits
    state = get_method("rtn")().quantize(tiny_lm, parse_scheme("w4a4"), None)
    handle = apply_state(tiny_lm.model, state)
    with torch.no_grad():
        quant = tiny_lm.model(**batch).logits
    assert not torch.allclose(quant, ref)
    handle.restore()
    assert not any(isinstance(m, FakeQuantLinear) for m in tiny_lm.model.modules())
    after = tiny_lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(tiny_lm.model(**batch).logits, ref)


def test_state_save_load_round_trip(tiny_lm, tmp_path):
    state = get_method("rtn")().quantize(tiny_lm, parse_scheme("w6a6", w_group_size=32), None)
    state.float_params["model.language_model.norm.weight"] = torch.arange(64, dtype=torch.float32)
    state.meta["note"] = {"x": 1}
    state.save(tmp_path / "s")
    loaded = QuantState.load(tmp_path / "s")
    assert loaded.config == state.config and loaded.meta == state.meta
    assert set(loaded.linears) == set(state.linears)
    for name, lq in state.linears.items():
        other = loaded.linears[name]
        assert torch.equal(lq.codes, other.codes) and torch.equal(lq.scale, other.scale)
        assert other.act.to_meta() == lq.act.to_meta()
    assert torch.equal(loaded.float_params["model.language_model.norm.weight"], torch.arange(64.0))


def test_float_params_are_applied_and_restored(tiny_lm):
    name = "model.language_model.norm.weight"
    original = tiny_lm.model.get_parameter(name).detach().clone()
    state = QuantState(method="x", config=parse_scheme("w16a16"),
                       float_params={name: torch.full_like(original, 3.0)})
    with applied(tiny_lm.model, state):
        assert torch.all(tiny_lm.model.get_parameter(name) == 3.0)
    assert torch.equal(tiny_lm.model.get_parameter(name), original)


def test_state_with_shared_activation_ranges_saves_and_loads(tiny_lm, tiny_calib, tmp_path):
    # q/k/v (one input) may hold one static range object; safetensors refuses shared memory.
    from harness.quant.ranges import fill_static_ranges, rule_for

    qcfg = parse_scheme("w4a4", a_granularity="per_tensor")
    state = get_method("rtn")().quantize(tiny_lm, qcfg, tiny_calib)
    fill_static_ranges(tiny_lm.model, state, list(tiny_calib.inputs()), rule_for(qcfg))
    names = [n for n in state.linears if n.endswith(("q_proj", "k_proj", "v_proj"))][:3]
    shared = state.linears[names[0]].act
    for n in names[1:]:
        state.linears[n].act.scale = shared.scale
        state.linears[n].act.zero = shared.zero
    state.save(tmp_path / "s")
    loaded = QuantState.load(tmp_path / "s")
    for n in names:
        assert torch.equal(loaded.linears[n].act.scale, shared.scale)
