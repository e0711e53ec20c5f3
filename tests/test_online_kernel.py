"""The fused online Hadamard (harness/kernels/hadamard.py) under Triton's CPU interpreter: its
transform against x·H computed in float64 from the Sylvester and Paley matrices, its quantized
outputs against the simulated quantizer, its inputs read as the engine produces them, and QuaRot's
engine with it against the same engine with the eager transform."""

from __future__ import annotations

import math

import pytest
import torch

from harness.kernels import fused, hadamard
from harness.kernels.fused import InputMode
from harness.kernels.online import OnlineHadamard
from harness.quant.simulated import quantize_activation
from harness.quant.state import ActQuant
from harness.quant.transforms import _dense_factor, _sylvester, hadamard_factors
from perf_helpers import engine_on_cpu, interp, rand_acts  # noqa: F401  (fixture)

# 1 · 256 (16 x 16 tile), 12 · 64 (the bundled model's MLP), 1 · 4096 (LLaVA-1.5-7B's o_proj),
# 344 · 32 (its down_proj: Paley I over GF(7³))
WIDTHS = [256, 768, 4096, 11008]


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _xh64(x: torch.Tensor) -> torch.Tensor:
    """``x @ H`` in float64, ``H = (H_m ⊗ H_p) / √n`` from the matrices themselves: the dense
    Kronecker product where it is small, else the same product factor by factor."""
    n = x.shape[-1]
    m, p = hadamard_factors(n)
    hm, hp = _dense_factor(m), _sylvester(p)
    if n <= 1024:
        return x.double() @ torch.kron(hm, hp) / math.sqrt(n)
    xr = x.double().reshape(-1, m, p)
    return torch.einsum("ik,rij,jl->rkl", hm, xr, hp).reshape(x.shape) / math.sqrt(n)


@pytest.mark.parametrize("n", WIDTHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_transform_is_x_times_h_in_float64(interp, n, dtype):
    x = rand_acts(3, n, n, dtype)
    t = OnlineHadamard(n)
    got = hadamard.hadamard_q(x, t, None)
    assert got.dtype == dtype and got.shape == x.shape
    want = _xh64(x)
    # fp32: accumulation order only; fp16: the rounding of each stage to fp16, as the eager transform
    assert _rel(got, want) < (1e-6 if dtype == torch.float32 else 1e-3)
    eager = t(x)
    assert _rel(got, eager) < (1e-6 if dtype == torch.float32 else 1e-3)
    if n in (4096, 11008) and dtype == torch.float16:
        # the eager stages and their roundings: equal but for a few values an ulp or two apart (the
        # order of float32 accumulation inside the products)
        d = (got.double() - eager.double()).abs()
        assert (d <= 2 * fused.ulp(eager)).all() and (d > 0).double().mean() < 0.01


def test_dense_factor_is_read_as_bits(interp):
    for m, mp in ((12, 16), (344, 512)):
        words = hadamard.factor_bits(m, mp, "cpu")
        assert words.dtype == torch.int32 and words.shape == (mp, -(-m // 32))
        bits = (words.long()[:, :, None] >> torch.arange(32)) & 1  # [k, t, b]
        neg = bits.reshape(mp, -1)[:, :m]
        assert torch.equal(neg[:m].bool(), _dense_factor(m).t() < 0) and not neg[m:].any()


def test_inputs_are_read_as_the_engine_produces_them(interp):
    # down_proj: SiLU(gate) * up of the fused gate/up output, rounded as fused.silu_mul_q
    for n in (768, 11008):
        gu = rand_acts(2, 2 * n, n + 1, outliers=False) * 3
        got = hadamard.hadamard_q(gu, OnlineHadamard(n), None, silu=True)
        g, u = gu[:, :n].double(), gu[:, n:].double()
        h = (g / (1 + torch.exp(-g))).half().double() * u
        assert _rel(got, _xh64(h)) < 1e-3
        assert torch.equal(got, hadamard.hadamard_q(fused.silu_mul_q(gu, None, fused.FLOAT_INPUT),
                                                    OnlineHadamard(n), None))
    # o_proj: the attention output [B, H, T, D] read through its transpose, rows (b, t)
    for n in (256, 4096):
        att = rand_acts(2 * 4 * 3, n // 4, n + 2).reshape(2, 4, 3, n // 4)
        view = att.transpose(1, 2)
        got = hadamard.hadamard_q(view, OnlineHadamard(n), None)
        assert got.shape == (6, n)
        assert torch.equal(got, hadamard.hadamard_q(view.reshape(6, n), OnlineHadamard(n), None))
        assert _rel(got, _xh64(view.reshape(6, n))) < 1e-3


ACTS = [ActQuant(bits=4), ActQuant(bits=8), ActQuant(bits=6, sym=False),
        ActQuant(bits=8, granularity="per_tensor", scale=torch.tensor(0.37), zero=torch.tensor(128.0))]
MODES = [InputMode("fake"), InputMode("codes", fp8=False, rowsum=True), InputMode("codes", fp8=True)]


@pytest.mark.parametrize("act", ACTS, ids=lambda a: f"a{a.bits}{'s' if a.sym else 'a'}-{a.granularity}")
@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"{m.kind}{'-fp8' if m.fp8 else ''}")
@pytest.mark.parametrize("n", [768, 4096, 11008])
def test_quantized_outputs_are_the_simulated_quantizer(interp, act, mode, n):
    if mode.kind == "codes" and mode.fp8 and not (act.bits <= 4 and act.sym):
        pytest.skip("codes beyond ±16 are not exact in e4m3 (the engine never asks for it)")
    if not act.sym and act.bits > 7:
        pytest.skip("asymmetric 8-bit codes do not fit int8 (the engine never asks for it)")
    t = OnlineHadamard(n)
    gu = rand_acts(3, 2 * n, n + 3)
    h = hadamard.hadamard_q(gu, t, None, silu=True)
    p = hadamard.hadamard_q(gu, t, act, mode, silu=True)
    assert p.kind == mode.kind and p.x.shape == (3, n)
    c = fused.check_codes(h, p, act)  # the same transformed values: the same codes and scales
    assert c["mismatches"] == 0 and c["scale_mismatch"] == 0 and not c.get("rowsum_mismatch"), c
    eager = hadamard.eager_q(gu, t, act, mode, silu=True)  # the engine's path before this kernel
    if mode.kind == "fake":
        assert _rel(p.x, quantize_activation(h, act)) == 0.0
        assert _rel(p.x, eager.x) < 1e-2
    else:
        assert p.x.dtype == eager.x.dtype and p.scale.shape == (3,)
        assert _rel(p.x.float() * p.scale[:, None], eager.x.float() * eager.scale[:, None]) < 1e-2


def test_plans_and_what_stays_eager(interp, monkeypatch):
    assert hadamard.plan(4096) == hadamard.Plan(4096, 1, 4096, p1=64, p2=64)
    assert hadamard.plan(11008) == hadamard.Plan(11008, 344, 32, mp=512)
    assert hadamard.plan(3584) == hadamard.Plan(3584, 28, 128, mp=32)  # Qwen2.5-7B hidden
    assert hadamard.plan(18944) == hadamard.Plan(18944, 148, 128, mp=256)  # its MLP
    for n in (5120, 48, 128):  # 20 · 256 (13B hidden), 12 · 4, 1 · 128: eager
        assert isinstance(hadamard.plan(n), str)
        assert hadamard.usable(OnlineHadamard(n), "cpu", torch.float16)
        with pytest.raises(ValueError, match="does not run here"):
            hadamard.hadamard_q(torch.zeros(1, n, dtype=torch.float16), OnlineHadamard(n), None)
    assert hadamard.usable(OnlineHadamard(4096), "cpu", torch.float16) is None
    monkeypatch.setenv(hadamard.IMPL_ENV, "eager")
    assert hadamard.impl() == "eager"
    for v, want in (("fused", "fused"), ("triton", "fused"), ("auto", "auto"), ("", "auto")):
        monkeypatch.setenv(hadamard.IMPL_ENV, v)
        assert hadamard.impl() == want
    monkeypatch.setenv(hadamard.IMPL_ENV, "fast")
    with pytest.raises(ValueError, match="expected"):
        hadamard.impl()


def test_timed_choice_prefers_the_fused_kernel_within_the_margin():
    """``hadamard.choose`` with synthetic timings (no kernel runs): the workload's sum(runs × ms) per
    width, the fused kernel kept within select's 5 % margin, phases without a case skipped."""
    assert hadamard.pick(1.04, 1.0) == hadamard.KERNEL and hadamard.pick(1.06, 1.0) == "eager"
    assert hadamard.pick(1.06, 1.0, margin=0.1) == hadamard.KERNEL
    ms = {("a", "decode", "fused"): 0.033, ("a", "decode", "eager"): 0.018,
          ("a", "prefill", "fused"): 0.150, ("a", "prefill", "eager"): 0.112,
          ("b", "decode", "fused"): 0.006, ("b", "decode", "eager"): 0.012,
          ("b", "prefill", "fused"): 0.011, ("b", "prefill", "eager"): 0.053}
    calls = []

    def timer(key, phase, path, fn):
        calls.append((key, phase, path))
        return ms[(key, phase, path)]
    never = (lambda: 1 / 0, lambda: 1 / 0)
    plan = [("decode", 1, 64.0), ("prefill", 647, 1.0)]
    got = hadamard.choose({"a": {"decode": never, "prefill": never}, "b": {"decode": never}}, plan, timer)
    assert got["a"]["choice"] == "eager" and got["b"]["choice"] == hadamard.KERNEL
    assert got["a"]["cost_fused_ms"] == pytest.approx(64 * 0.033 + 0.150)
    assert got["a"]["phases"]["prefill"] == {"rows": 647, "runs": 1.0, "fused_ms": 0.150, "eager_ms": 0.112}
    assert set(got["b"]["phases"]) == {"decode"} and ("b", "prefill", "fused") not in calls


def test_no_matrix_is_built_again_after_the_first_call(interp, monkeypatch):
    """Graph-capturable: after the first (eager) call the kernel reads only device tensors it holds
    (the bit-packed factor) and the call's own buffers: nothing is built or copied from the host."""
    from harness.quant import transforms

    x = rand_acts(2, 11008, 5)
    t = OnlineHadamard(11008)
    first = hadamard.hadamard_q(x, t, ActQuant(bits=4), InputMode("codes", fp8=True))
    made = []
    monkeypatch.setattr(transforms, "_dense_factor", lambda m: made.append(m))
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a))
    again = hadamard.hadamard_q(x, t, ActQuant(bits=4), InputMode("codes", fp8=True))
    assert made == [] and torch.equal(again.x.float(), first.x.float()) and torch.equal(again.scale, first.scale)


# ---- QuaRot's engine with the kernel and without it ----------------------------------------------

@pytest.fixture(scope="module")
def bundled32():
    from harness.models.loading import load_model

    return load_model("qvlm-tiny-llava", dtype="fp32", device="cpu")


def test_quarot_engine_with_the_kernel_equals_the_eager_one(bundled32, interp, monkeypatch):
    from harness.perf import gate as gate_mod
    from harness.perf import states as states_mod
    from harness.quant.config import parse_scheme
    from harness.quant.simulated import apply_state

    lm = bundled32
    wl = states_mod.make_workload(lm.model.config, text_tokens=12, new_tokens=5, seed=1)
    (quarot,) = [v for v in states_mod.perf_variants(["quarot"]) if not v.reference]
    state, _ = states_mod.perf_state(lm, quarot, parse_scheme("w4a4"), wl)
    assert sum(lq.input_transform == "hadamard" for lq in state.linears.values()) == 8
    ids, pix = wl.batch(1)
    with torch.no_grad():
        handle = apply_state(lm.model, state)
        try:
            ref = gate_mod.simulated_reference(lm.model, ids, pix.to(lm.dtype), n_tokens=4)
        finally:
            handle.restore()

    fast = engine_on_cpu(lm, state, 1, wl, float_params=True, only=["simulated"])
    assert set(fast.online_impl.values()) == {hadamard.KERNEL} and len(fast.online_impl) == 8
    monkeypatch.setenv(hadamard.IMPL_ENV, "eager")
    slow = engine_on_cpu(lm, state, 1, wl, float_params=True, only=["simulated"])
    assert all(v.startswith("eager") for v in slow.online_impl.values())

    with torch.no_grad():
        a = fast.teacher_forced_logits(ref.tokens[1:])
        b = slow.teacher_forced_logits(ref.tokens[1:])
    assert _rel(a, b) <= gate_mod.GATE_TOL and torch.equal(a.argmax(-1), b.argmax(-1))
    for eng in (fast, slow):
        g = gate_mod.check(eng, ref, act_quant=True, policy="strict")
        assert g["passed"], g
        pc = gate_mod.check_producers(eng, ref)
        assert pc["passed"], pc
        online = [c for k, c in pc["checks"].items() if k.split(".")[2] in ("o", "down")]
        assert online and all(c["transform_err"] < 1e-5 for c in online)
    assert {c["online"] for k, c in gate_mod.check_producers(fast, ref)["checks"].items()
            if k.split(".")[2] in ("o", "down")} == {hadamard.KERNEL}

    # the timed choice per width, with synthetic timings: the MLP's width timed slower fused -> eager
    # there, the attention output's fused; forced by QVLM_ONLINE_HADAMARD, nothing is timed
    assert slow.choose_online(timer=lambda *a: 1 / 0) == {}
    monkeypatch.setenv(hadamard.IMPL_ENV, "fused")
    assert fast.choose_online(timer=lambda *a: 1 / 0) == {}
    monkeypatch.delenv(hadamard.IMPL_ENV)
    assert fast.choose_online() == {}  # the CPU: nothing timed without an injected timer
    seen = []

    def timer(key, phase, path, fn):
        seen.append((key, phase, path))
        return {"fused": 2.0, "eager": 1.0}[path] if "silu" in key else {"fused": 1.04, "eager": 1.0}[path]
    timings = fast.choose_online(timer=timer)
    assert {k.split(" ")[1] for k in timings} == {"attention", "silu·up"}
    assert {(ph, path) for _k, ph, path in seen} == {(ph, p) for ph in ("decode", "prefill")
                                                     for p in ("fused", "eager")}
    down = {k: v for k, v in fast.online_impl.items() if k.endswith(".down")}
    o = {k: v for k, v in fast.online_impl.items() if k.endswith(".o")}
    assert set(o.values()) == {hadamard.KERNEL} and all(v.startswith("eager: timed") for v in down.values())
    assert all(t["layers"] == 4 for t in timings.values())
    assert len(fast._online_fused) == 4
    with torch.no_grad():
        c = fast.teacher_forced_logits(ref.tokens[1:])
    assert _rel(c, b) <= gate_mod.GATE_TOL and torch.equal(c.argmax(-1), b.argmax(-1))


# ---- the split 11008 path: (row, block of outputs) programs, then the quantizer pass ----------------

@pytest.mark.parametrize("rows", [1, 2, 33])
def test_split_dense_stage_at_11008(interp, rows):
    """Every block size of the split dense stage gives the same values (the same tiles, the same
    float32 accumulation order), x·H in float64 up to fp16 rounding, and, with every quantizer, the
    simulated quantizer on those values (the row statistic taken over the blocks' statistics)."""
    n = 11008
    t = OnlineHadamard(n)
    gu = rand_acts(rows, 2 * n, 40 + rows)
    h = hadamard.hadamard_q(gu, t, None, silu=True, dense="tiles")
    g, u = gu[:, :n].double(), gu[:, n:].double()
    assert _rel(h, _xh64((g / (1 + torch.exp(-g))).half().double() * u)) < 1e-3
    for bk in (hadamard.BLOCK_KS if rows <= 2 else (64,)):
        assert torch.equal(hadamard.hadamard_q(gu, t, None, silu=True, block_k=bk, dense="tiles"), h)
    cases = [(a, m) for a in ACTS for m in MODES
             if not (m.kind == "codes" and m.fp8 and not (a.bits <= 4 and a.sym)) and (a.sym or a.bits <= 7)]
    for act, mode in cases if rows <= 2 else cases[:2]:
        for bk in (16, 64) if rows == 1 else (None,):
            p = hadamard.hadamard_q(gu, t, act, mode, silu=True, block_k=bk, dense="tiles")
            assert p.kind == mode.kind and p.x.shape == (rows, n)
            c = fused.check_codes(h, p, act)
            assert c["mismatches"] == 0 and c["scale_mismatch"] == 0 and not c.get("rowsum_mismatch"), (act, mode, c)
            if mode.kind == "fake":
                assert torch.equal(p.x, quantize_activation(h, act))


@pytest.mark.parametrize("rows", [1, 3])
def test_whole_row_dense_stage_at_11008(interp, rows):
    """The loop-free form of the split dense stage (``dense="whole"``: the row's [512, 32] tile in
    two products) gives x·H up to fp16 rounding against float64, the tiled form's values but for an
    ulp or two where float32 sums in another order round differently, the same values every call, and every quantizer's codes on its
    own values; a width whose row exceeds a program's tile is refused by name."""
    n = 11008
    t = OnlineHadamard(n)
    gu = rand_acts(rows, 2 * n, 70 + rows)
    whole = hadamard.hadamard_q(gu, t, None, silu=True, dense="whole")
    tiles = hadamard.hadamard_q(gu, t, None, silu=True, dense="tiles")
    g, u = gu[:, :n].double(), gu[:, n:].double()
    assert _rel(whole, _xh64((g / (1 + torch.exp(-g))).half().double() * u)) < 1e-3
    d = (whole.double() - tiles.double()).abs()
    assert (d <= 2 * fused.ulp(tiles)).all() and (d > 0).double().mean() < 0.01
    # the same call gives the same values; another block size may round a sum's last bit elsewhere
    assert torch.equal(hadamard.hadamard_q(gu, t, None, silu=True, dense="whole"), whole)
    other = hadamard.hadamard_q(gu, t, None, silu=True, dense="whole", block_k=64)
    assert ((other.double() - whole.double()).abs() <= 2 * fused.ulp(whole)).all()
    for act, mode in [(a, m) for a in ACTS[:2] for m in MODES[:2]]:
        p = hadamard.hadamard_q(gu, t, act, mode, silu=True, dense="whole")
        c = fused.check_codes(whole, p, act)
        assert c["mismatches"] == 0 and c["scale_mismatch"] == 0, (act, mode, c)
    with pytest.raises(ValueError, match="dense='sideways'"):
        hadamard.hadamard_q(gu, t, None, silu=True, dense="sideways")
    assert hadamard._dense(1, hadamard.plan(n)) == ("whole" if hadamard.WHOLE_MAX_ROWS >= 1 else "tiles")


def test_the_dense_form_rule_and_its_override(monkeypatch):
    p = hadamard.plan(11008)
    monkeypatch.setenv(hadamard.WHOLE_ENV, "8")
    assert [hadamard._dense(r, p) for r in (1, 8, 9, 647)] == ["whole", "whole", "tiles", "tiles"]
    monkeypatch.setenv(hadamard.WHOLE_ENV, "0")
    assert hadamard._dense(1, p) == "tiles"
    monkeypatch.delenv(hadamard.WHOLE_ENV)
    assert hadamard._dense(1, p) == ("whole" if hadamard.WHOLE_MAX_ROWS >= 1 else "tiles")
    # only the tile measured on the GPU (512 · 32) goes "whole" by default: Qwen2.5-7B's 18944 does not
    assert hadamard.plan(18944).mp * hadamard.plan(18944).p > hadamard.WHOLE_MAX_TILE >= p.mp * p.p
    assert hadamard._dense(1, hadamard.plan(18944)) == "tiles"


def test_whole_row_dense_stage_reads_the_attention_output_at_3584(interp):
    """Qwen2.5-7B's o_proj input (3584 = 28 · 128, read through the attention output's transpose)
    goes "whole" at one row by default: x·H against float64, and the tiled form's values within
    two ulps."""
    n, heads = 3584, 28
    t = OnlineHadamard(n)
    att = rand_acts(heads, n // heads, 91).reshape(1, heads, 1, n // heads)
    x = att.transpose(1, 2)  # [B, T, H, D] as the engine reads it
    assert hadamard._dense(1, hadamard.plan(n)) == "whole"
    whole = hadamard.hadamard_q(x, t, None, dense="whole")
    tiles = hadamard.hadamard_q(x, t, None, dense="tiles")
    assert _rel(whole, _xh64(x.reshape(1, n))) < 1e-3
    assert ((whole.double() - tiles.double()).abs() <= 2 * fused.ulp(tiles)).all()
