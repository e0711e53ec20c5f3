"""Fused activation quantizers (harness/kernels/fused.py) under Triton's CPU interpreter, against
float64 arithmetic and the simulated model's quantizer."""

import pytest
import torch

from harness.kernels import fused
from harness.kernels.fused import InputMode
from harness.quant.simulated import quantize_activation
from harness.quant.state import ActQuant
from perf_helpers import interp, rand_acts  # noqa: F401  (fixture)

ACTS = [ActQuant(bits=4), ActQuant(bits=8), ActQuant(bits=6, sym=False),
        ActQuant(bits=8, granularity="per_tensor", scale=torch.tensor(0.37), zero=torch.tensor(128.0))]
MODES = [InputMode("fake"), InputMode("codes", fp8=False, rowsum=True), InputMode("codes", fp8=True)]



def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _fits(act, mode):
    if mode.kind == "codes" and mode.fp8:
        return act.bits <= 4 and act.sym  # integers up to 16 are exact in e4m3
    return act.sym or act.bits <= 7  # asymmetric codes q - z span 2**bits - 1 either side


def test_add_rms_norm_matches_float64(interp):
    res, delta = rand_acts(6, 96, 0), rand_acts(6, 96, 1)
    w = (torch.rand(96, generator=torch.Generator().manual_seed(2)) + 0.5).half()
    new, h = fused.add_rms_norm_q(res, delta, w, 1e-6, None, fused.FLOAT_INPUT)
    want_res = (res.double() + delta.double()).half()  # one rounding, as the fp16 add
    assert torch.equal(new, want_res)
    x = want_res.double()
    want = w.double() * x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    assert h.dtype == torch.float16 and _rel(h, want) < 2e-3
    same, h2 = fused.add_rms_norm_q(want_res, None, w, 1e-6, None, fused.FLOAT_INPUT)
    assert same is want_res and torch.equal(h2, h)


def test_silu_mul_matches_float64(interp):
    gu = rand_acts(5, 2 * 80, 3, outliers=False) * 3
    h = fused.silu_mul_q(gu, None, fused.FLOAT_INPUT)
    g, u = gu[:, :80].double(), gu[:, 80:].double()
    want = (g / (1 + torch.exp(-g))).half().double() * u
    assert h.shape == (5, 80) and _rel(h, want) < 2e-3


@pytest.mark.parametrize("act", ACTS, ids=lambda a: f"a{a.bits}{'s' if a.sym else 'a'}-{a.granularity}")
@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"{m.kind}{'-fp8' if m.fp8 else ''}")
def test_producers_quantize_as_the_simulated_model(interp, act, mode):
    if not _fits(act, mode):
        pytest.skip("this code range does not fit the output format (the engine never asks for it)")
    res, delta = rand_acts(7, 96, 4), rand_acts(7, 96, 5)
    w = (torch.rand(96, generator=torch.Generator().manual_seed(6)) + 0.5).half()
    _, h = fused.add_rms_norm_q(res, delta, w, 1e-6, None, fused.FLOAT_INPUT)
    _, p = fused.add_rms_norm_q(res, delta, w, 1e-6, act, mode)
    gu = rand_acts(7, 192, 7)
    hs = fused.silu_mul_q(gu, None, fused.FLOAT_INPUT)
    ps = fused.silu_mul_q(gu, act, mode)
    for h_, p_ in ((h, p), (hs, ps)):
        assert p_.kind == mode.kind and p_.x.shape == h_.shape
        c = fused.check_codes(h_, p_, act)
        assert c["non_tie"] == 0 and c["scale_mismatch"] == 0, c
        assert c["mismatches"] <= 2, c  # ties are rare
        if mode.kind == "fake":
            assert _rel(p_.x, quantize_activation(h_, act)) < 1e-2
        else:
            assert p_.scale.dtype == torch.float32 and p_.scale.shape == (7,)
            if mode.rowsum:
                assert c["rowsum_mismatch"] == 0
            # (codes - zero) * scale is the simulated model's fake-quantized input
            assert _rel(p_.x.float() * p_.scale[:, None], quantize_activation(h_.float(), act)) < 1e-2


def test_attention_output_is_quantized_through_its_transpose(interp):
    att = rand_acts(2 * 3 * 4, 32, 8).reshape(2, 3, 4, 32)  # [B, H, T, D] as SDPA returns it
    view = att.transpose(1, 2)  # [B, T, H, D], not contiguous
    flat = view.reshape(8, 96)
    act = ActQuant(bits=4)
    for mode in MODES[:2]:
        p = fused.rows_q(view, act, mode)
        c = fused.check_codes(flat, p, act)
        assert c["mismatches"] == 0, c  # same input values: bit-identical to the simulated quantizer
    assert torch.equal(fused.rows_q(flat, act, MODES[0]).x, quantize_activation(flat, act))


def test_scale_floor_and_rounding_half_to_even(interp):
    # a row of zeros gets the quantizer's floor scale; exact halves round to even, as torch.round
    x = torch.tensor([[0.0] * 16, [7.0, 2.5, 1.5, 0.5, -0.5, -1.5, -2.5, 3.5] * 2], dtype=torch.float16)
    p = fused.rows_q(x, ActQuant(bits=4), InputMode("codes"))
    assert p.scale[0].item() == pytest.approx(1e-8) and not p.x[0].any()
    assert p.scale[1].item() == 1.0  # 7 / 7
    assert p.x[1, :8].tolist() == [7, 2, 2, 0, 0, -2, -2, 4]


def test_cpu_fallback_is_the_torch_reference():
    act = ActQuant(bits=8)
    x = rand_acts(3, 64, 9)
    from harness.kernels import triton_matmul as tk

    prev = tk.interpret_on_cpu(False)
    try:
        p = fused.rows_q(x, act, InputMode("fake"))
    finally:
        tk.interpret_on_cpu(prev)
    assert torch.equal(p.x, quantize_activation(x, act))


def test_check_codes_tells_an_ulp_flip_from_a_wrong_code():
    """The H200 run of 8a432de: W8A8/W6A6 prefill producers differed from the simulated quantizer in
    1-3 of 2.65M codes, each one step where the quotient was near (not at) a half step -- what a
    one-ulp difference in the producer's own RMSNorm value does at 8 bits (an fp16 ulp of a value
    near amax is ~0.06 of a step). Those are ``ulp_flips``; a code off elsewhere stays ``non_tie``;
    row sums must be those of the codes emitted."""
    act = ActQuant(bits=8)  # symmetric: scale = amax / 127
    h = torch.tensor([[127.0, 10.0, 20.5 + 2 ** -6, 30.25]], dtype=torch.float16)  # scale 1
    assert fused.ulp(h).tolist() == [[2 ** -4, 2 ** -7, 2 ** -6, 2 ** -6]]  # float64 spacing of fp16
    q = torch.tensor([[127.0, 10.0, 21.0, 30.0]])  # what round(h / 1) gives
    assert torch.equal(fused._codes_torch(h, act)[0], q)

    def prepared(codes):
        c = torch.tensor([codes], dtype=torch.int8)
        return fused.Prepared("codes", c, torch.tensor([1.0]), c.float().sum(-1).to(torch.int32))
    ok = fused.check_codes(h, prepared([127, 10, 21, 30]), act)
    assert ok["mismatches"] == 0 and ok["rowsum_mismatch"] == 0
    # 20.5 + 2**-6 is one fp16 ulp above the half: a producer whose value was one ulp lower saw 20.5
    # and rounded to even (20)
    flip = fused.check_codes(h, prepared([127, 10, 20, 30]), act)
    assert flip["mismatches"] == 1 and flip["ulp_flips"] == 1 and flip["non_tie"] == 0
    # 30.25 is 0.25 from the half, 16 ulps: no rounding difference gives 31
    wrong = fused.check_codes(h, prepared([127, 10, 21, 31]), act)
    assert wrong["non_tie"] == 1 and wrong["ulp_flips"] == 0
    far = fused.check_codes(h, prepared([127, 12, 21, 30]), act)  # two steps off
    assert far["non_tie"] == 1
    p = prepared([127, 10, 21, 30])
    p.rowsum += 1
    assert fused.check_codes(h, p, act)["rowsum_mismatch"] == 1
    fake = fused.check_codes(h, fused.Prepared("fake", torch.tensor([[127.0, 10.0, 20.0, 30.0]],
                                                                    dtype=torch.float16)), act)
    assert fake["ulp_flips"] == 1 and fake["non_tie"] == 0


def test_check_codes_accepts_a_scale_from_an_amax_one_ulp_away():
    """13B W4A4 on the H200 (commit 00109cb): one row of 2560 had a scale one ulp of amax away (its
    producer's amax was the neighbouring fp16 value); its codes are then judged with that scale."""
    act = ActQuant(bits=4)
    h = torch.tensor([[6.0, 3.857421875, -1.0, 2.0]], dtype=torch.float16)  # scale 6/7: 4.5003 -> 5
    s = torch.tensor([6.0]) / torch.tensor([7.0])
    up = (torch.tensor([6.0]) + 2 ** -8) / torch.tensor([7.0])  # amax one fp16 ulp (2**-8) up: 4.4997 -> 4

    def prepared(codes, scale):
        return fused.Prepared("codes", torch.tensor([codes], dtype=torch.int8), scale)
    ok = fused.check_codes(h, prepared([7, 5, -1, 2], s), act)
    assert ok["mismatches"] == 0 and ok["scale_mismatch"] == 0 and ok["ulp_scales"] == 0
    moved = fused.check_codes(h, prepared([7, 4, -1, 2], up), act)
    assert moved["ulp_scales"] == 1 and moved["scale_mismatch"] == 0 and moved["mismatches"] == 0
    assert fused.check_codes(h, prepared([7, 4, -1, 3], up), act)["non_tie"] == 1  # 2.33 is not near a half
    far = fused.check_codes(h, prepared([7, 4, -1, 2], s * 1.01), act)
    assert far["scale_mismatch"] == 1 and far["ulp_scales"] == 0
