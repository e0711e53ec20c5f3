"""Real kernels against the simulated arithmetic on small layers (CPU paths; Triton via its interpreter)."""

import importlib
import os

import pytest
import torch

from harness.perf import real
from harness.perf.real import RealLinear, rel_err, select_kernels
from harness.quant.quantizer import rtn_weight
from harness.quant.simulated import build_fake_linear
from harness.quant.state import ActQuant, LinearQuant

CASES = [  # (w_bits, act bits or None, group, w_sym)
    (4, None, None, False), (4, None, 32, False), (8, None, None, False), (6, None, None, True),
    (4, 4, None, False), (6, 6, None, False), (8, 8, None, False), (4, 8, None, True),
]


def _layer(bits, abits, group, sym, seed=0, n=48, k=128):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    codes, scale, zero = rtn_weight(w, bits, sym, group)
    act = ActQuant(bits=abits) if abits else None
    lq = LinearQuant(bits=bits, codes=codes, scale=scale, zero=zero, group_size=group, sym=sym, act=act)
    lin = torch.nn.Linear(k, n, bias=False)
    return lq, lin


@pytest.mark.parametrize("bits,abits,group,sym", CASES)
def test_cpu_kernels_match_simulated(bits, abits, group, sym):
    lq, lin = _layer(bits, abits, group, sym)
    rl = RealLinear.from_quant(lq, lin, device="cpu", dtype=torch.float32)
    fake = build_fake_linear(lin, lq)
    for phase, rows in (("decode", 3), ("prefill", 70)):
        x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows))
        with torch.no_grad():
            ref = fake(x)
            assert torch.allclose(rl.simulated(x), ref)
            for name in rl.candidates(phase, "cpu"):
                if name.startswith("triton"):
                    continue
                assert rel_err(rl.run(name, x), ref) < 1e-5, name


def test_integer_paths_are_offered_where_exact():
    lq, lin = _layer(4, 4, None, False)
    assert RealLinear.from_quant(lq, lin, device="cpu", dtype=torch.float32).int_compute() == "fp8"
    lq, lin = _layer(8, 8, None, False)
    assert RealLinear.from_quant(lq, lin, device="cpu", dtype=torch.float32).int_compute() == "int8"
    lq, lin = _layer(4, 4, 32, False)  # grouped weights: scales can't leave the GEMM
    rl = RealLinear.from_quant(lq, lin, device="cpu", dtype=torch.float32)
    assert rl.int_compute() is None and "simulated" in rl.candidates("prefill", "cpu")
    lq, lin = _layer(4, None, None, False)
    lq.act = ActQuant(bits=8, sym=False)  # asymmetric 8-bit codes don't fit int8
    assert RealLinear.from_quant(lq, lin, device="cpu", dtype=torch.float32).int_compute() is None


def test_select_kernels_picks_a_passing_candidate():
    layers = []
    for seed in range(3):
        lq, lin = _layer(8, 8, None, False, seed=seed)
        layers.append(RealLinear.from_quant(lq, lin, device="cpu", dtype=torch.float32))
    recs = select_kernels(layers, "prefill", 40, dtype=torch.float32, reps=1)
    assert len(recs) == 1
    chosen = recs[0].chosen
    assert all(layer.choice["prefill"] == chosen for layer in layers)
    assert recs[0].candidates[chosen]["rel_err"] < 1e-5


def test_select_kernels_rejects_a_wrong_kernel(monkeypatch):
    lq, lin = _layer(8, 8, None, False)
    layer = RealLinear.from_quant(lq, lin, device="cpu", dtype=torch.float32)
    orig = RealLinear.run

    def broken(self, kernel, x, prequantized=False):
        y = orig(self, kernel, x, prequantized)
        return y * 1.1 if kernel == "torch-int_mm-int8" else y
    monkeypatch.setattr(RealLinear, "run", broken)
    rec = select_kernels([layer], "prefill", 40, dtype=torch.float32, reps=1)[0]
    assert "error" in rec.candidates["torch-int_mm-int8"]
    assert rec.chosen == "simulated"


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None,
                    reason="Triton kernels run on CPU only under TRITON_INTERPRET=1 with triton installed")
@pytest.mark.parametrize("bits,abits,group,sym", CASES)
def test_triton_kernels_under_interpreter(bits, abits, group, sym):
    lq, lin = _layer(bits, abits, group, sym)
    rl = RealLinear.from_quant(lq, lin, device="cpu", dtype=torch.float16)
    for phase, rows in (("decode", 1), ("decode", 5), ("prefill", 70)):
        x = torch.randn(rows, 128).half()
        ref = rl.simulated(x.float())
        for name in rl.candidates(phase, "cpu"):
            if name.startswith("triton") and "fp8" not in name:  # no fp8 casts in the interpreter
                assert rel_err(rl.run(name, x).float(), ref) < 2e-3, name


@pytest.mark.parametrize("group,expect", [(None, 256), (64, 64), (32, 32), (512, 256)])
def test_tinygemm_operands_encode_the_same_weights(group, expect):
    from harness.perf.packing import unpack_int4

    lq, lin = _layer(4, None, group, False, k=1024)
    rl = RealLinear.from_quant(lq, lin, device="cpu", dtype=torch.float32)
    g = rl.tinygemm_group()
    assert g == expect
    swapped, sz = real.tinygemm_operands(rl.wdata, rl.scale, rl.zero, rl.group, g)
    assert sz.shape == (1024 // g, 48, 2) and sz.dtype == torch.bfloat16
    # tinygemm's reading of its inputs: even column in the high nibble, (q - 8) * scale + zero
    q = torch.stack([swapped >> 4, swapped & 0x0F], dim=-1).reshape(48, 1024)
    assert torch.equal(q, unpack_int4(rl.wdata))  # the codes, bit for bit
    scale = sz[..., 0].double().t().repeat_interleave(g, dim=1)
    zero = sz[..., 1].double().t().repeat_interleave(g, dim=1)
    w = (q.double() - 8) * scale + zero
    assert rel_err(w, rl.dequantized(torch.float64)) < 4e-3  # bf16 ranges: ~2**-9 each


def test_tinygemm_only_for_weight_only_int4_on_cuda():
    lq, lin = _layer(4, 4, None, False)
    assert RealLinear.from_quant(lq, lin, device="cpu", dtype=torch.float32).tinygemm_group() is None
    lq, lin = _layer(8, None, None, False)
    assert RealLinear.from_quant(lq, lin, device="cpu", dtype=torch.float32).tinygemm_group() is None
    lq, lin = _layer(4, None, None, False)
    rl = RealLinear.from_quant(lq, lin, device="cpu", dtype=torch.float32)
    assert real.TINYGEMM not in rl.candidates("decode", "cpu", opt_in=[real.TINYGEMM])
    # on CUDA only when asked for (it failed the end-to-end gate and slows prefill; see candidates)
    assert real.TINYGEMM not in rl.candidates("decode", "cuda")
    assert real.TINYGEMM in rl.candidates("decode", "cuda", opt_in=[real.TINYGEMM])
    # naming it in --kernels adds it without restricting the other layers' kernels
    recs = select_kernels([rl], "decode", 1, dtype=torch.float32, reps=1, only=[real.TINYGEMM])
    assert recs[0].chosen == "dequant+torch"  # on CPU: the only other candidate, not filtered out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch._weight_int4pack_mm runs on CUDA only")
@pytest.mark.parametrize("group", [None, 128])
def test_tinygemm_kernel_matches_simulated_and_keeps_one_layout(group):
    lq, lin = _layer(4, None, group, False, n=256, k=1024)
    rl = RealLinear.from_quant(lq, lin, device="cuda", dtype=torch.float16)
    x = torch.randn(4, 1024, device="cuda", dtype=torch.float16)
    ref = rl.simulated(x)
    assert rel_err(rl.run(real.TINYGEMM, x), ref) < 1e-2
    recs = select_kernels([rl], "decode", 4, dtype=torch.float16, reps=2, only=[real.TINYGEMM])
    assert recs[0].candidates[real.TINYGEMM]["rel_err"] < 1e-2
    rl.choice["decode"] = real.TINYGEMM  # as if it had won
    assert rl.candidates("prefill", "cuda") == [real.TINYGEMM]
    select_kernels([rl], "prefill", 300, dtype=torch.float16, reps=2)
    before = rl.weight_bytes()
    rl.finalize_storage()
    assert rl.wdata is None and rl.fmt == "int4-tinygemm"
    assert rl.weight_bytes() < 1.1 * before  # one layout, not two
    assert rel_err(rl(x), ref) < 1e-2
