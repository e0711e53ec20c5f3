"""Quantizer math against float64 closed forms written independently here."""

import numpy as np
import pytest
import torch

from harness.quant.config import QuantConfig, SchemeError, parse_scheme
from harness.quant.quantizer import fake_quant, rtn_weight, dequantize_weight


def ref_rtn_rows(w: np.ndarray, bits: int, sym: bool) -> np.ndarray:
    """Per-row round-to-nearest in float64, straight from the textbook formulas."""
    out = np.empty_like(w)
    for i, row in enumerate(w):
        if sym:
            s = max(np.abs(row).max() / (2 ** (bits - 1) - 1), 1e-8)
            q = np.clip(np.round(row / s), -2 ** (bits - 1), 2 ** (bits - 1) - 1)
            out[i] = q * s
        else:
            lo, hi = min(row.min(), 0.0), max(row.max(), 0.0)
            s = max((hi - lo) / (2 ** bits - 1), 1e-8)
            z = np.round(-lo / s)
            q = np.clip(np.round(row / s) + z, 0, 2 ** bits - 1)
            out[i] = (q - z) * s
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_rtn_matches_float64_reference(bits, sym):
    g = torch.Generator().manual_seed(bits * 10 + sym)
    w = torch.randn(24, 40, generator=g, dtype=torch.float64) * 0.1
    codes, scale, zero = rtn_weight(w.float(), bits, sym)
    got = dequantize_weight(codes, scale, zero).double().numpy()
    ref = ref_rtn_rows(w.numpy(), bits, sym)
    # float32 rounding of the scale: agree to float32 precision, and on every code
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2 ** bits - 1


def test_group_quantization_uses_each_groups_range():
    w = torch.cat([torch.full((2, 4), 1.0), torch.full((2, 4), 100.0)], dim=1)
    w[:, 0] = -1.0
    w[:, 4] = 50.0
    codes, scale, zero = rtn_weight(w, 4, False, group_size=4)
    assert scale.shape == (2, 2)
    deq = dequantize_weight(codes, scale, zero)
    # group 0 spans [-1, 1] (step 2/15), group 1 spans [0, 100] (step 100/15)
    assert torch.allclose(scale[0], torch.tensor([2 / 15, 100 / 15]))
    assert (deq[:, :4] - w[:, :4]).abs().max() <= 1 / 15 + 1e-6
    assert (deq[:, 4:] - w[:, 4:]).abs().max() <= 50 / 15 + 1e-4


def test_per_token_activation_fake_quant_matches_reference():
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    got = fake_quant(x.float(), 4, sym=True, dim=-1).double()
    ref = torch.from_numpy(ref_rtn_rows(x.reshape(-1, 16).numpy(), 4, True)).reshape(3, 5, 16)
    assert torch.allclose(got, ref, atol=1e-6)
    # each token has at most 16 levels, and tokens are scaled independently
    assert all(len(torch.unique(row)) <= 16 for row in got.reshape(-1, 16))


def test_clip_ratio_saturates_outliers():
    x = torch.tensor([[0.0, 0.5, 1.0, 10.0]])
    y = fake_quant(x, 8, sym=True, clip_ratio=0.5)
    assert y[0, 3].item() == pytest.approx(5.0, rel=1e-6)


def test_parse_scheme_and_overrides():
    q = parse_scheme("W4A4", w_group_size=128, parts=["language", "vision"])
    assert (q.w_bits, q.a_bits, q.w_group_size, q.parts) == (4, 4, 128, ("language", "vision"))
    assert q.scheme == "w4a4" and not q.is_float
    assert parse_scheme("w16a16").is_float
    assert QuantConfig.from_dict(q.to_dict()) == q
    with pytest.raises(SchemeError, match="w4a4"):
        parse_scheme("int4")
    with pytest.raises(SchemeError, match="valid"):
        parse_scheme("w4a4", group=64)
    with pytest.raises(SchemeError, match="lm_head"):
        parse_scheme("w4a4", parts=["decoder"])
    with pytest.raises(SchemeError):
        parse_scheme("w1a4")


def test_float64_inputs_are_quantized_in_float64():
    """Issue 29.8: ``fake_quant``, ``quantize`` and a static activation quantizer compute a float64
    input in float64 (scales stay float32 parameters, as stored and as the kernels use them); the
    float32 path they once took gives other values on the same inputs."""
    from harness.quant.quantizer import qparams, quantize
    from harness.quant.simulated import quantize_activation
    from harness.quant.state import ActQuant

    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 48, generator=g, dtype=torch.float64) * 3
    for bits, sym in ((4, True), (4, False), (8, True)):
        scale, zero = qparams(x, bits, sym)
        assert scale.dtype == torch.float32  # a parameter of the quantizer
        s, z = scale.double(), zero.double()
        codes = (torch.round(x / s) + z).clamp(0, 2 ** bits - 1)
        want = (codes - z) * s  # exact in float64: small integers times float32 scales
        got = fake_quant(x, bits, sym)
        assert got.dtype == torch.float64 and torch.equal(got, want)
        assert not torch.equal(got, fake_quant(x.float(), bits, sym).double())  # the old float32 path
        assert torch.equal(quantize(x, scale, zero, bits).double(), codes)
        # a static per-tensor quantizer: one float32 scale, applied in float64
        ts, tz = qparams(x.reshape(1, -1), bits, sym)
        act = ActQuant(bits=bits, sym=sym, granularity="per_tensor", scale=ts.reshape(()), zero=tz.reshape(()))
        ts, tz = ts.double().reshape(()), tz.double().reshape(())
        static = quantize_activation(x, act)
        assert static.dtype == torch.float64
        assert torch.equal(static, ((torch.round(x / ts) + tz).clamp(0, 2 ** bits - 1) - tz) * ts)
