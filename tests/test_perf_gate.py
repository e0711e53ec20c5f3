"""The engine against the simulated model on the tiny LLaVA (CPU), and the gate's verdict logic."""

import pytest
import torch

from harness.perf import gate as gate_mod
from perf_helpers import engine_on_cpu
from harness.perf.engine import LlavaEngine, build_blocks
from harness.kernels.real import RealLinear
from harness.perf.states import make_workload
from harness.quant.build import rtn_state
from harness.quant.config import parse_scheme
from harness.quant.simulated import apply_state




@pytest.mark.parametrize("scheme", ["w16a16", "w4a16", "w8a8", "w4a4"])
def test_engine_matches_simulated_model(tiny_lm, scheme):
    wl = make_workload(tiny_lm.model.config, text_tokens=12, new_tokens=5)
    ids, pix = wl.batch(1)
    state = None if scheme == "w16a16" else rtn_state(tiny_lm.model, parse_scheme(scheme), "rtn")
    handle = apply_state(tiny_lm.model, state) if state else None
    try:
        ref = gate_mod.simulated_reference(tiny_lm.model, ids, pix, n_tokens=4)
    finally:
        if handle:
            handle.restore()
    assert len(ref.tokens) == 5 and ref.logits.shape[0] == 5 and ref.io
    eng = engine_on_cpu(tiny_lm, state, 2, wl)
    g = gate_mod.check(eng, ref, act_quant=scheme.endswith(("a8", "a4")), policy="strict")
    assert g["layerwise_max_rel_err"] < 1e-4, g["layerwise"]
    assert g["e2e_rel_logit_err"] < 1e-4 and g["e2e_tokens_match"], g
    assert g["passed"] and g["strict_passed"]
    assert {k.rsplit(".", 1)[1] for k in g["layerwise"]} == {"prefill", "decode"}
    # free-running greedy decode gives the simulated model's tokens, on every batch row
    toks = eng.generate(5)
    assert toks.shape == (2, 5) and toks[0].tolist() == ref.tokens == toks[1].tolist()


def _rtn_reference(lm, scheme, new_tokens, text_tokens=12):
    """Workload, RTN state and the simulated model's reference run for ``scheme``."""
    wl = make_workload(lm.model.config, text_tokens=text_tokens, new_tokens=new_tokens)
    ids, pix = wl.batch(1)
    state = rtn_state(lm.model, parse_scheme(scheme), "rtn")
    with torch.no_grad():
        handle = apply_state(lm.model, state)
        ref = gate_mod.simulated_reference(lm.model, ids, pix, n_tokens=new_tokens - 1)
        handle.restore()
    return wl, state, ref


def test_gate_fails_a_wrong_kernel(tiny_lm, monkeypatch):
    wl, state, ref = _rtn_reference(tiny_lm, "w4a16", new_tokens=4)
    eng = engine_on_cpu(tiny_lm, state, 1, wl)
    orig = RealLinear.run
    monkeypatch.setattr(RealLinear, "run", lambda self, k, x, pq=False: orig(self, k, x, pq) * 1.05)
    g = gate_mod.check(eng, ref, act_quant=False, policy="auto")
    assert not g["layerwise_ok"] and not g["passed"]




@pytest.mark.parametrize("layer_ok,e2e_ok,act,policy,passed", [
    (True, True, False, "strict", True), (True, False, False, "auto", False),
    (True, False, True, "auto", True), (True, False, True, "strict", False),
    (False, True, True, "auto", False), (False, True, False, "strict", False),
])
def test_gate_policies(monkeypatch, layer_ok, e2e_ok, act, policy, passed):
    monkeypatch.setattr(gate_mod, "language_layers", lambda m: ("lm.layers", None))
    monkeypatch.setattr(gate_mod, "layerwise_errors",
                        lambda e, r, p, *a: {"layers.0.qkv.prefill": 1e-4 if layer_ok else 0.5})
    ref = gate_mod.SimReference(logits=torch.tensor([[0.0, 1.0, 0.5]]), tokens=[1])

    class Eng:
        batch = 1
        model = None

        def teacher_forced_logits(self, tokens):
            lg = torch.tensor([[[0.0, 1.0, 0.5]]]) if e2e_ok else torch.tensor([[[0.0, 0.4, 1.0]]])
            return lg
    g = gate_mod.check(Eng(), ref, act_quant=act, policy=policy)
    assert g["passed"] is passed
    assert g["strict_passed"] is (layer_ok and e2e_ok)
    with pytest.raises(ValueError):
        gate_mod.check(Eng(), ref, act_quant=act, policy="lenient")


def test_near_ties_pass_auto_but_not_strict(monkeypatch):
    monkeypatch.setattr(gate_mod, "language_layers", lambda m: ("lm.layers", None))
    monkeypatch.setattr(gate_mod, "layerwise_errors", lambda e, r, p, *a: {"layers.0.o.prefill": 1e-4})
    ref = gate_mod.SimReference(logits=torch.tensor([[0.0, 1.0, 0.995]]), tokens=[1])

    class Eng:
        batch = 1
        model = None

        def teacher_forced_logits(self, tokens):
            return torch.tensor([[[0.0, 0.99, 1.0]]])
    auto = gate_mod.check(Eng(), ref, act_quant=False, policy="auto")
    strict = gate_mod.check(Eng(), ref, act_quant=False, policy="strict")
    assert auto["passed"] and not strict["passed"]
    assert auto["token_mismatches"][0]["gap"] == pytest.approx(0.005, abs=1e-6)
    # a decisive difference is never a tie
    ref2 = gate_mod.SimReference(logits=torch.tensor([[0.0, 1.0, 0.5]]), tokens=[1])
    assert not gate_mod.check(Eng(), ref2, act_quant=False, policy="auto")["passed"]


def _half_away_quantizer(scale_factor=1.0):
    """A per-token quantizer that rounds halves away from zero (eager torch.round: to even)."""
    from harness.quant.quantizer import qparams

    def q(x, act):
        s, z = qparams(x, act.bits, act.sym, act.clip_ratio, dim=-1)
        s = s * scale_factor
        r = x.float() / s
        codes = torch.sign(r) * torch.floor(r.abs() + 0.5) + z
        return ((codes.clamp(0, 2 ** act.bits - 1) - z) * s).to(x.dtype)
    return q


def _tie_input():
    # amax 7 at 4 bits (symmetric): scale exactly 1, so 2.5 is an exact tie (even: 2, away: 3)
    return torch.tensor([[7.0, 2.5, 1.0, -3.0, 0.25, -6.0, 4.0, 0.0] * 2])


def test_quantizer_ties_tells_a_tie_from_a_real_difference():
    from harness.kernels.real import quantizer_ties
    from harness.quant.simulated import quantize_activation
    from harness.quant.state import ActQuant

    act = ActQuant(bits=4)
    x = _tie_input()
    assert quantizer_ties(x, act, engine_quantizer=quantize_activation) == \
        {"elements": 16, "mismatches": 0, "non_tie": 0}
    ties = quantizer_ties(x, act, engine_quantizer=_half_away_quantizer())
    assert ties == {"elements": 16, "mismatches": 2, "non_tie": 0}  # the two 2.5s
    wrong = quantizer_ties(x, act, engine_quantizer=_half_away_quantizer(scale_factor=1.1))
    assert wrong["non_tie"] > 0


def test_layer_error_separates_rounding_ties_from_kernel_errors(monkeypatch):
    """A quantizer that breaks ties the other way moves a code by a whole step (a large error on a
    16-wide layer); the gate attributes it to the tie and checks kernel and state separately."""
    from harness.kernels import real
    from harness.quant.quantizer import rtn_weight
    from harness.quant.state import ActQuant, LinearQuant

    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 16, generator=g)
    codes, scale, zero = rtn_weight(w, 4, False, None)
    lq = LinearQuant(bits=4, codes=codes, scale=scale, zero=zero, group_size=None, sym=False, act=ActQuant(bits=4))
    mod = RealLinear.from_quant(lq, torch.nn.Linear(16, 8, bias=False), device="cpu", dtype=torch.float32)
    x = _tie_input()
    want = mod.simulated(x)  # the simulated model's layer (eager quantizer)
    ties = {}
    assert gate_mod._layer_error(mod, x, want, 1e-2, "k", ties) < 1e-6 and ties == {}
    monkeypatch.setattr(real, "act_fake", _half_away_quantizer())
    err = gate_mod._layer_error(mod, x, want, 1e-2, "k", ties)
    assert ties["k"]["total"] > 1e-2 and ties["k"]["quantizer"] == {"elements": 16, "mismatches": 2, "non_tie": 0}
    assert err == max(ties["k"]["kernel"], ties["k"]["state"]) < 1e-6
    # a quantizer that is wrong beyond ties keeps the full error
    monkeypatch.setattr(real, "act_fake", _half_away_quantizer(scale_factor=1.1))
    ties = {}
    assert gate_mod._layer_error(mod, x, want, 1e-2, "k", ties) == ties["k"]["total"] > 1e-2


def test_gate_record_keeps_the_rounding_tie_split(monkeypatch):
    split = {"total": 0.03, "kernel": 1e-5, "state": 1e-6, "quantizer": {"elements": 8, "mismatches": 1, "non_tie": 0}}

    def layerwise(e, r, p, tol, ties):
        ties["layers.0.qkv.decode"] = split
        return {"layers.0.qkv.decode": 1e-5}
    monkeypatch.setattr(gate_mod, "language_layers", lambda m: ("lm.layers", None))
    monkeypatch.setattr(gate_mod, "layerwise_errors", layerwise)
    ref = gate_mod.SimReference(logits=torch.tensor([[0.0, 1.0, 0.5]]), tokens=[1])

    class Eng:
        batch = 1
        model = None

        def teacher_forced_logits(self, tokens):
            return torch.tensor([[[0.0, 0.4, 1.0]]])  # a decisive token mismatch, listed apart
    g = gate_mod.check(Eng(), ref, act_quant=True, policy="auto")
    assert g["passed"] and g["layerwise_rounding_ties"] == {"layers.0.qkv.decode": split}
    assert g["token_mismatches"][0]["real"] == 2


def test_rounding_tie_split_runs_on_the_engines_fused_layers(tiny_lm):
    """The split path (kernel vs engine-quantizer arithmetic, state vs captured output) works on
    the engine's concatenated q/k/v and gate/up layers; forced here with tol = 0."""
    wl, state, ref = _rtn_reference(tiny_lm, "w4a4", new_tokens=3)
    eng = engine_on_cpu(tiny_lm, state, 1, wl)
    lang_path, _ = gate_mod.language_layers(eng.model)
    ties: dict = {}
    errs = gate_mod.layerwise_errors(eng, ref, lang_path, tol=0.0, ties=ties)
    assert all(k in ties or errs[k] == 0 for k in errs)  # every layer with any error was split
    assert {k.split(".")[2] for k in ties} >= {"qkv", "gate_up"}
    for split in ties.values():
        # eager quantizers on both sides here: no mismatches, and kernel and state both exact
        assert split["quantizer"]["mismatches"] == 0 and split["quantizer"]["non_tie"] == 0
        assert split["kernel"] < 1e-5 and split["state"] < 1e-5


@pytest.mark.parametrize("scheme", ["w4a4"])  # w8a8's int8 codes and GEMM: test_perf_fused/_kernels
def test_fused_producers_feed_the_integer_kernels(tiny_lm, scheme, monkeypatch):
    """W4A4 with the engine's fused quantizers and the Triton kernels (CPU interpreter): the engine
    computes what the simulated model computes, and the producers pass their own check."""
    from harness.kernels import real
    from harness.kernels import triton_matmul as tk
    from perf_helpers import triton_interpreter

    triton_interpreter()
    monkeypatch.setattr(real, "DECODE_MAX_ROWS", 4)  # a short prompt takes the prefill kernels
    prev = tk.interpret_on_cpu(True)
    try:
        if True:
            wl, state, ref = _rtn_reference(tiny_lm, scheme, new_tokens=2, text_tokens=4)

            def make(path, lin):
                return RealLinear.from_quant(state.linears[path], lin, device="cpu", dtype=tiny_lm.dtype, name=path)
            eng = LlavaEngine(tiny_lm.model, build_blocks(tiny_lm.model, make))
            eng.setup(*wl.batch(1), wl.new_tokens)
            assert eng.fused
            for m in eng.linears().values():
                comp = m.int_compute()
                m.choice = {"decode": f"triton-{m.fmt}-dot", "prefill": f"triton-{comp}-gemm"}
            g = gate_mod.check(eng, ref, act_quant=True, policy="strict")
            assert g["layerwise_max_rel_err"] < 1e-3 and g["e2e_rel_logit_err"] < 1e-3, g
            assert g["e2e_tokens_match"]
            p = gate_mod.check_producers(eng, ref)
            assert p["passed"] and p["checks"], p
            modes = {c["mode"] for c in p["checks"].values()}
            assert modes == {"fake", "codes-fp8" if scheme == "w4a4" else "codes"}, modes
    finally:
        tk.interpret_on_cpu(prev)


def test_trained_model_gate_runs_with_the_chosen_kernels(tiny_llava_path, tmp_path):
    import json

    from harness.perf.benchmark import run_perf

    recs = run_perf(str(tiny_llava_path), schemes=["w4a16", "w8a8"], batches=[1], out=tmp_path,
                    new_tokens=3, text_tokens=8, warmup=1, reps=1, gate_tokens=2, device="cpu",
                    dtype="fp32", trained_gate="on", compile=False, graphs=False, log=lambda *a: None)
    assert [r["scheme"] for r in recs] == ["w16a16", "w4a16", "w8a8"]
    for r in recs:
        t = r["gate"]["trained"]
        assert t["ran"] and t["passed"] and t["model"] == "qvlm-tiny-llava", t
        assert t["e2e_rel_logit_err"] < 1e-4 and t["tokens_sim"] == t["tokens_real"]
        big = r["kernels"]["selection"]
        assert set(t["kernels"].values()) <= {s["chosen"] for s in big}  # the same kernels
    w8 = json.loads((tmp_path / "records.jsonl").read_text().splitlines()[-1])
    assert w8["dtype"] == "fp32" and w8["reference"] is False and recs[0]["reference"] is True


def test_end_to_end_tolerance_follows_the_dtype_and_the_float_engine(monkeypatch):
    """The issue's bf16 run: the float engine itself was 3.6e-2 from the bf16 simulated model (same
    tokens), w4a16 5.0e-2; both failed a fixed 1e-2. The tolerance scales with the unit roundoff
    (bf16: 2**-8 vs fp16's 2**-11) and admits 2x the same-dtype float engine's own error."""
    assert gate_mod.e2e_tolerance(torch.float16) == pytest.approx(1e-2)
    assert gate_mod.e2e_tolerance(torch.bfloat16) == pytest.approx(8e-2)
    assert gate_mod.e2e_tolerance(torch.float32) == pytest.approx(1e-2)
    assert gate_mod.e2e_tolerance(torch.float16, float_e2e=0.02) == pytest.approx(0.04)
    monkeypatch.setattr(gate_mod, "language_layers", lambda m: ("lm.layers", None))
    monkeypatch.setattr(gate_mod, "layerwise_errors", lambda e, r, p, *a: {"layers.0.o.prefill": 3e-3})
    sim = torch.tensor([[0.0, 1.0, 0.5, -0.2]])
    ref = gate_mod.SimReference(logits=sim, tokens=[1])

    def engine(dtype, err):
        class Eng:
            batch = 1
            model = None

            def teacher_forced_logits(self, tokens):
                d = torch.tensor([[0.3, -0.2, 0.1, -0.4]])
                return (sim + err * sim.norm() * d / d.norm())[None]
        Eng.dtype = dtype
        return Eng()
    assert not gate_mod.check(engine(torch.float16, 3.6e-2), ref, act_quant=False)["passed"]
    g = gate_mod.check(engine(torch.bfloat16, 3.6e-2), ref, act_quant=False)
    assert g["passed"] and g["e2e_tol"] == pytest.approx(8e-2)
    assert g["e2e_rel_logit_err"] == pytest.approx(3.6e-2, rel=1e-4)
    assert gate_mod.check(engine(torch.bfloat16, 5.0e-2), ref, act_quant=False, float_e2e=3.6e-2)["passed"]
    assert not gate_mod.check(engine(torch.bfloat16, 9e-2), ref, act_quant=False, float_e2e=3.6e-2)["passed"]


@pytest.mark.parametrize("policy,layer_ok,strict_ok,producers,trained,passed", [
    ("auto", True, False, True, True, True),  # random-weight end to end recorded, not required
    ("auto", True, True, True, False, False),  # the trained model decides
    ("auto", False, False, True, True, False),
    ("auto", True, True, False, True, False),  # a fused quantizer off beyond ties
    ("strict", True, False, True, True, False),
    ("strict", True, True, True, True, True),
])
def test_trained_gate_verdict(policy, layer_ok, strict_ok, producers, trained, passed):
    g = {"policy": policy, "layerwise_ok": layer_ok, "strict_passed": strict_ok,
         "producers": {"passed": producers}}
    assert gate_mod.combine(g, {"ran": True, "passed": trained}) is passed


def test_exact_reference_is_the_float64_model_teacher_forced(tiny_lm):
    """``exact_reference``: one float64 forward over prompt + tokens gives, at every step, the logits a
    float64 greedy run would compute at that prefix; ``sim_err`` is the eager model's own distance."""
    import copy

    from harness.kernels.real import rel_err

    wl = make_workload(tiny_lm.model.config, text_tokens=10, new_tokens=4)
    ids, pix = wl.batch(1)
    state = rtn_state(tiny_lm.model, parse_scheme("w4a8"), "rtn")
    handle = apply_state(tiny_lm.model, state)
    try:
        m32 = copy.deepcopy(tiny_lm.model).to(torch.float32)
        ref = gate_mod.simulated_reference(m32, ids, pix.float(), n_tokens=3)
        m64 = copy.deepcopy(tiny_lm.model).to(torch.float64)
        ex = gate_mod.exact_reference(m64, ids, pix, ref)
        # independent: the float64 model run prefix by prefix, as a greedy loop would
        seq = ids
        for i, t in enumerate(ref.tokens):
            want = m64(input_ids=seq, pixel_values=pix.double(), use_cache=False).logits[0, -1]
            torch.testing.assert_close(ex.logits[i], want, rtol=0, atol=1e-9)
            seq = torch.cat([seq, torch.tensor([[t]])], dim=1)
    finally:
        handle.restore()
    assert ex.logits.dtype == torch.float64 and ex.logits.shape == ref.logits.shape
    assert ex.sim_err == pytest.approx(rel_err(ref.logits, ex.logits))
    assert 0 < ex.sim_err < 1e-3  # float32 eager vs float64: rounding only
    assert ex.sim_dev == pytest.approx((ref.logits.double() - ex.logits).abs().amax(-1).tolist())


def test_exact_policy_allows_what_the_eager_model_itself_is_off(monkeypatch):
    """Policy ``exact``: the engine may be as far from the float64 model as 2x the same-dtype eager
    simulated model is (the trained-model gate: fp16 eager W8A8 is 2.7e-2 from float64 on the bundled
    model, W4A4 0.16), and a greedy flip counts only where the float64 gap is within 2x the eager
    model's own largest logit deviation at that step."""
    monkeypatch.setattr(gate_mod, "language_layers", lambda m: ("lm.layers", None))
    monkeypatch.setattr(gate_mod, "layerwise_errors", lambda e, r, p, *a: {"layers.0.o.prefill": 1e-3})
    exact = torch.tensor([[0.0, 2.0, 1.9, -1.0], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)

    def ref(sim_err, dev):
        return gate_mod.SimReference(logits=exact.float(), tokens=[1, 0], exact=gate_mod.ExactReference(
            logits=exact, sim_err=sim_err, sim_dev=dev))

    def engine(real):
        class Eng:
            batch, model, dtype = 1, None, torch.float16

            def teacher_forced_logits(self, tokens):
                return real[None].float()
        return Eng()

    d = torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    off = exact + 0.05 * exact.norm() * d / d.norm()  # 5e-2 relative, same argmax
    g = gate_mod.check(engine(off), ref(0.03, [0.1, 0.1]), act_quant=True, policy="exact")
    assert g["exact"]["rel_logit_err"] == pytest.approx(0.05, rel=1e-3)
    assert g["exact"]["tol"] == pytest.approx(0.06) and g["passed"]
    assert not gate_mod.check(engine(off), ref(0.02, [0.1, 0.1]), act_quant=True, policy="exact")["passed"]
    # a flip of step 0 (gap 0.1 in the float64 model): a tie when the eager model deviates by >= 0.05
    flip = exact.clone()
    flip[0, 2] = 2.01
    g = gate_mod.check(engine(flip), ref(0.03, [0.06, 0.0]), act_quant=True, policy="exact")
    assert g["exact"]["token_flips"][0]["gap"] == pytest.approx(0.1) and g["passed"]
    g = gate_mod.check(engine(flip), ref(0.03, [0.01, 0.0]), act_quant=True, policy="exact")
    assert not g["passed"] and not g["exact"]["tokens_match_up_to_ties"]
    # the float engine's own distance to its float64 model in the same call counts as measured noise
    # too (the H200 W4A16 run: eager deviation 0.010 at the flipped step, the fp16 float engine's 0.149)
    fe = {"rel_logit_err": 0.025, "real_max_dev": [0.02, 0.149]}  # flip is 3.5e-2 off: within 2 x 0.025
    g = gate_mod.check(engine(flip), ref(0.003, [0.01, 0.0]), act_quant=True, policy="exact", float_exact=fe)
    assert g["passed"] and g["exact"]["noise_max_dev"] == pytest.approx(0.149)
    assert g["exact"]["token_flips"][0]["tie_tol"] == pytest.approx(0.298)
    assert g["exact"]["tol"] == pytest.approx(0.05) and g["exact"]["noise_rel_logit_err"] == 0.025
    assert g["exact"]["real_max_dev"] == pytest.approx([0.11, 0.0])
    with pytest.raises(ValueError, match="float64 reference"):
        gate_mod.check(engine(off), gate_mod.SimReference(logits=exact.float(), tokens=[1, 0]),
                       act_quant=True, policy="exact")
