"""Real kernels against float64 arithmetic and the simulated layer on small layers: CPU paths,
Triton kernels through the interpreter, torch's row-wise ``_scaled_mm`` (it runs on the CPU too),
the layouts' exactness, and the layout choice."""

import pytest
import torch

from harness.kernels import fused, real, select
from harness.kernels.fused import InputMode, Prepared
from harness.kernels.real import KERNELS, RealLinear, rel_err
from harness.kernels.select import select_kernels
from harness.quant.quantizer import rtn_weight
from harness.quant.simulated import build_fake_linear, quantize_activation
from harness.quant.state import ActQuant, LinearQuant
from perf_helpers import interp, rand_acts  # noqa: F401  (fixture)

CASES = [  # (w_bits, act bits or None, group, w_sym)
    (4, None, None, False), (4, None, 32, False), (8, None, None, False), (6, None, None, True),
    (4, 4, None, False), (6, 6, None, False), (8, 8, None, False), (4, 8, None, True),
]
IDS = [f"w{b}a{a or 16}-g{g}-{'sym' if s else 'asym'}" for b, a, g, s in CASES]


def _layer(bits, abits, group, sym, seed=0, n=48, k=128):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    codes, scale, zero = rtn_weight(w, bits, sym, group)
    act = ActQuant(bits=abits) if abits else None
    lq = LinearQuant(bits=bits, codes=codes, scale=scale, zero=zero, group_size=group, sym=sym, act=act)
    lin = torch.nn.Linear(k, n, bias=False)
    return lq, lin


def _ref64(lq: LinearQuant, x: torch.Tensor) -> torch.Tensor:
    """float64: the simulated layer's arithmetic without any rounding of its own."""
    xq = quantize_activation(x, lq.act) if lq.act is not None else x
    return xq.double() @ lq.dequantized().double().t()



@pytest.mark.parametrize("bits,abits,group,sym", CASES, ids=IDS)
def test_cpu_kernels_match_simulated(bits, abits, group, sym):
    lq, lin = _layer(bits, abits, group, sym)
    rl = RealLinear.from_quant(lq, lin, device="cpu", dtype=torch.float32)
    fake = build_fake_linear(lin, lq)
    for phase, rows in (("decode", 3), ("prefill", 70)):
        x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows))
        with torch.no_grad():
            ref = fake(x)
            assert torch.allclose(rl.simulated(x), ref)
            names = rl.candidates(phase, "cpu")
            assert names and not any(n.startswith("triton") for n in names)  # no interpreter unless asked
            for name in names:
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


@pytest.mark.parametrize("bits,abits,group,sym", CASES, ids=IDS)
def test_triton_kernels_under_interpreter(interp, bits, abits, group, sym):
    lq, lin = _layer(bits, abits, group, sym)
    rl = RealLinear.from_quant(lq, lin, device="cpu", dtype=torch.float16)
    rl.act_dtype = torch.float16
    seen = set()
    for phase, rows in (("decode", 1), ("decode", 5), ("prefill", 70)):
        x = rand_acts(rows, 128, rows)
        want = _ref64(lq, x)
        comp = rl.int_compute()
        inputs = {"fake": Prepared("fake", quantize_activation(x, lq.act)) if lq.act else x}
        if comp:
            inputs["codes"] = fused.rows_q(x, lq.act, InputMode("codes", fp8=comp == "fp8", rowsum=rl.corr))
        for name in rl.candidates(phase, "cpu"):
            if not name.startswith("triton"):
                continue
            out = rl.run(name, inputs[KERNELS[name].input])
            assert out.dtype == torch.float16 and rel_err(out, want) < 3e-3, name
            seen.add(name)
    fmt = "int4" if bits <= 4 else "int8"
    assert f"triton-{fmt}-dot" in seen
    if rl.int_compute():
        assert f"triton-{rl.int_compute()}-gemm" in seen, seen  # the integer tensor-core GEMM ran


@pytest.mark.parametrize("abits,bits", [(4, 4), (8, 8), (6, 6)])
def test_codes_kernels_take_the_fused_quantizers_codes(interp, abits, bits):
    """The prefill path as the engine runs it: codes from the fused producer, scales in the epilogue."""
    lq, lin = _layer(bits, abits, None, False, seed=3)
    rl = RealLinear.from_quant(lq, lin, device="cpu", dtype=torch.float16)
    x = rand_acts(40, 128, 11)
    mode = InputMode("codes", fp8=rl.int_compute() == "fp8", rowsum=rl.corr)
    p = fused.rows_q(x, lq.act, mode)
    name = f"triton-{rl.int_compute()}-gemm"
    assert rel_err(rl.run(name, p), _ref64(lq, x)) < 3e-3


def test_scaled_mm_rowwise_on_fp8_weights():
    """``torch._scaled_mm`` with per-token x per-channel scales (it has a CPU implementation)."""
    lq, lin = _layer(4, 4, None, False, seed=5)
    rl = RealLinear.from_quant(lq, lin, device="cpu", dtype=torch.float16)
    w8 = rl._layout("fp8w")
    assert w8.dtype == real.FP8 and torch.equal(w8.double(), lq.codes.double() - lq.zero.double())  # exact
    x = rand_acts(24, 128, 12)
    p = fused.emit_torch(x, lq.act, InputMode("codes", fp8=True))
    out = rl.run("torch-scaled_mm-fp8w", p)
    assert out.dtype == torch.float16 and rel_err(out, _ref64(lq, x)) < 3e-3


def test_select_kernels_picks_and_rejects(interp, monkeypatch):
    layers = [RealLinear.from_quant(*_layer(8, 8, None, False, seed=s), device="cpu", dtype=torch.float16)
              for s in range(3)]
    orig = RealLinear.run

    def broken(self, kernel, x, prequantized=False):
        y = orig(self, kernel, x, prequantized)
        return y * 1.1 if kernel == "triton-int8-dot" else y
    monkeypatch.setattr(RealLinear, "run", broken)
    recs = select_kernels(layers, plan=[("decode", 2, 63.0), ("prefill", 40, 1.0)], dtype=torch.float16, reps=1)
    assert len(recs) == 2 and {r.phase for r in recs} == {"decode", "prefill"}
    dec = next(r for r in recs if r.phase == "decode")
    assert "relative error" in dec.candidates["triton-int8-dot"]["error"]
    assert dec.chosen != "triton-int8-dot" and dec.candidates[dec.chosen]["rel_err"] < 1e-2
    assert all(layer.choice == {r.phase: r.chosen for r in recs} for layer in layers)
    assert dec.quantizer["non_tie"] == 0 and dec.runs == 63.0


class _Member:
    def __init__(self):
        self.choice = {}


def _rec(phase, runs, **times):
    rec = select.KernelRecord(phase=phase, rows=1, shape=(8, 8), chosen="", runs=runs)
    for name, ms in times.items():
        name = name if name in KERNELS else name.replace("_", "-")
        rec.candidates[name] = {"ms": ms, "layout": KERNELS[name].layout}
    return rec


def test_layout_choice_minimises_the_workload_time():
    # tinygemm: fastest decode, very slow prefill; ours: the other way round
    def recs(decode_runs):
        return {"decode": _rec("decode", decode_runs, **{"torch_int4pack": 1.0, "triton_int4_dot": 1.5}),
                "prefill": _rec("prefill", 1.0, **{"torch_int4pack": 100.0, "triton_int4_dot": 4.0})}
    plan = [("decode", 1, 127.0), ("prefill", 647, 1.0)]
    members = [_Member(), _Member()]
    r = recs(127.0)
    select._choose_layout(members, r, plan, "sig")
    assert r["decode"].layout == "ours" and members[1].choice == {"decode": "triton-int4-dot",
                                                                  "prefill": "triton-int4-dot"}
    assert r["decode"].layout_costs == pytest.approx({"tinygemm": 227.0, "ours": 194.5})
    plan = [("decode", 1, 127.0), ("prefill", 647, 0.0)]  # objective: decode only
    r = recs(127.0)
    select._choose_layout(members, r, plan, "sig")
    assert members[0].choice == {"decode": "torch-int4pack", "prefill": "torch-int4pack"}
    r = recs(0.0)
    select._choose_layout(members, r, [("decode", 1, 0.0), ("prefill", 647, 1.0)], "sig")  # prefill only
    assert r["prefill"].layout_costs == pytest.approx({"tinygemm": 100.0, "ours": 4.0})
    assert members[0].choice == {"decode": "triton-int4-dot", "prefill": "triton-int4-dot"}


def test_w4_layers_keep_a_4_bit_layout_unless_wide_layouts_are_allowed():
    """The memory rule: FP8 copies of 4-bit weights (``fp8w``, 8 bits a weight) are timed but not
    chosen by default, even when fastest; with ``wide_layouts`` they are. W8 codes take either."""
    assert real.admissible_layouts(4) == ("ours", "gemlite", "tinygemm")
    assert real.admissible_layouts(6) == ("ours", "gemlite", "tinygemm", "fp8w")
    assert real.admissible_layouts(4, wide=True) == real.LAYOUT_PREFERENCE
    assert [real.layout_bits(lay, 4) for lay in ("ours", "gemlite", "tinygemm", "fp8w", "float")] == [4, 4, 4, 8, 16]
    assert [real.layout_bits(lay, 8) for lay in ("ours", "gemlite", "fp8w")] == [8, 8, 8]

    def recs():
        return {"decode": _rec("decode", 63.0, **{"torch-scaled_mm-fp8w": 1.0, "triton_int4_dot": 1.2}),
                "prefill": _rec("prefill", 1.0, **{"torch-scaled_mm-fp8w": 10.0, "triton_fp8_gemm": 20.0})}
    plan = [("decode", 1, 63.0), ("prefill", 647, 1.0)]
    members = [_Member()]
    r = recs()
    select._choose_layout(members, r, plan, "sig", real.admissible_layouts(4))
    assert r["decode"].layout == "ours" and members[0].choice == {"decode": "triton-int4-dot",
                                                                  "prefill": "triton-fp8-gemm"}
    assert r["decode"].layout_costs == pytest.approx({"ours": 63 * 1.2 + 20})
    assert r["decode"].wider_layouts == pytest.approx({"fp8w": 63 * 1.0 + 10})
    r = recs()
    select._choose_layout(members, r, plan, "sig", real.admissible_layouts(4, wide=True))
    assert r["decode"].layout == "fp8w" and r["decode"].wider_layouts is None
    r = {"decode": _rec("decode", 1.0, **{"torch-scaled_mm-fp8w": 1.0})}
    with pytest.raises(RuntimeError, match="no layout among"):
        select._choose_layout(members, r, [("decode", 1, 1.0)], "sig", real.admissible_layouts(4))


def test_layout_choice_prefers_the_own_packing_within_the_margin():
    """Timing noise cannot flip the layout: the preferred layout (the state's own packing first)
    wins while within ``LAYOUT_MARGIN`` (5 %) of the fastest; beyond it the fastest wins."""
    members = [_Member()]
    for gemlite_ms, want in ((0.97, "ours"), (0.953, "ours"), (0.95, "gemlite"), (0.80, "gemlite")):
        r = {"decode": _rec("decode", 1.0, triton_int4_dot=1.0, gemlite=gemlite_ms)}
        select._choose_layout(members, r, [("decode", 1, 1.0)], "sig", real.admissible_layouts(4))
        assert r["decode"].layout == want, gemlite_ms


def test_objectives_weigh_the_phases():
    from harness.perf import benchmark as runner

    assert runner.OBJECTIVES == ("generate", "decode", "prefill")
    with pytest.raises(ValueError, match="objective must be one of generate, decode, prefill"):
        runner.run_perf("qvlm-tiny-llava", objective="ttft", out="/nonexistent", log=lambda *a: None)


def test_finalize_keeps_one_layout_and_the_codes_on_the_host():
    lq, lin = _layer(4, 4, None, False, seed=7)
    rl = RealLinear.from_quant(lq, lin, device="cpu", dtype=torch.float16)
    x = rand_acts(4, 128, 13)
    before = rl.simulated(x)
    rl.choice = {"decode": "torch-scaled_mm-fp8w", "prefill": "torch-scaled_mm-fp8w"}
    rl.finalize_storage()
    assert rl.wdata is None and rl.wdata_host is not None and set(rl.layouts) == {"fp8w"}
    assert rl.weight_bytes() == 48 * 128 + 2 * 48 * 4  # e4m3 weights + scale + zero, no int4 copy
    assert torch.equal(rl.simulated(x), before)  # the reference arithmetic still works
    rl.restore_ours()
    assert rl.wdata is not None and rl.wdata_host is None


@pytest.mark.parametrize("group,expect", [(None, 256), (64, 64), (32, 32), (512, 256)])
def test_tinygemm_operands_encode_the_same_weights(group, expect):
    from harness.kernels.packing import unpack_int4

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


def test_tinygemm_zero_point_exactness_decides_per_state():
    from harness.kernels.packing import unpack_int4

    lq, lin = _layer(4, None, 128, True, k=1024)  # symmetric: z = 8, tinygemm's zero is 0
    rl = RealLinear.from_quant(lq, lin, device="cpu", dtype=torch.float32)
    ok, bad = real.tinygemm_exact(rl.scale, rl.zero)
    assert ok and bad == 0
    swapped, sz = real.tinygemm_operands(rl.wdata, rl.scale, rl.zero, rl.group, 128)
    q = unpack_int4(rl.wdata).double()
    s = rl.scale.to(torch.bfloat16).double().repeat_interleave(128, dim=1)
    w = (q - 8) * sz[..., 0].double().t().repeat_interleave(128, 1) + sz[..., 1].double().t().repeat_interleave(128, 1)
    assert torch.equal(w, (q - rl.zero.double().repeat_interleave(128, 1)) * s)  # (q - z) * bf16(s), exactly
    lq, lin = _layer(4, None, 128, False, k=1024)  # asymmetric groups: z spreads, (8 - z) * s rarely fits
    rl = RealLinear.from_quant(lq, lin, device="cpu", dtype=torch.float32)
    ok, bad = real.tinygemm_exact(rl.scale, rl.zero)
    assert not ok and bad > 0
    assert "inexact" in rl.tinygemm_usable("cuda")
    assert rl.tinygemm_usable("cpu") == "CUDA only"


def test_candidates_by_device_and_state():
    lq, lin = _layer(4, None, 128, True, k=1024)
    rl = RealLinear.from_quant(lq, lin, device="cpu", dtype=torch.float16)
    assert real.TINYGEMM not in rl.candidates("decode", "cpu")
    assert real.TINYGEMM in rl.candidates("decode", "cuda")  # symmetric: exact
    lq, lin = _layer(4, None, 128, False, k=1024)
    rl = RealLinear.from_quant(lq, lin, device="cpu", dtype=torch.float16)
    assert real.TINYGEMM not in rl.candidates("decode", "cuda")  # zero points inexact in bf16
    lq, lin = _layer(4, 4, None, False)
    rl = RealLinear.from_quant(lq, lin, device="cpu", dtype=torch.float16)
    assert "torch-scaled_mm-fp8w" in rl.candidates("prefill", "cuda")
    assert rl.candidates("prefill", "cpu") == ["simulated"]
    for opt in real.OPT_IN_KERNELS:
        if not opt.startswith("gemlite"):  # plain "gemlite" is a default for 4-bit codes
            assert opt not in rl.candidates("decode", "cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch._weight_int4pack_mm runs on CUDA only")
def test_tinygemm_kernel_matches_float64_and_keeps_one_layout():
    lq, lin = _layer(4, None, 128, True, n=256, k=1024)
    rl = RealLinear.from_quant(lq, lin, device="cuda", dtype=torch.float16)
    x = torch.randn(4, 1024, device="cuda", dtype=torch.float16)
    want = x.double() @ lq.dequantized().cuda().double().t()
    assert rel_err(rl.run(real.TINYGEMM, x), want) < 1e-2
    rl.choice = {"decode": real.TINYGEMM, "prefill": real.TINYGEMM}
    before = rl.weight_bytes()
    rl.finalize_storage()
    assert rl.wdata is None and set(rl.layouts) == {"tinygemm"}
    assert rl.weight_bytes() < 1.1 * before
    assert rel_err(rl(x), want) < 1e-2


def test_gemlite_borrows_the_nearest_tuned_shape():
    from harness.kernels.gemlite_adapter import borrow_configs

    cfg = {"BLOCK_SIZE_N": 128}
    cache = {"GEMM": {"(768, 4096, 4096, 128, 8, 104)": {"BLOCK_SIZE_N": 64},
                      "(1024, 4096, 4096, 128, 8, 104)": {"BLOCK_SIZE_N": 32},
                      "(768, 14336, 4096, 128, 8, 104)": cfg,
                      "(768, 12288, 4096, 4096, 1, 408)": {"BLOCK_SIZE_N": 16}},  # another kind
             "GEMV": {}}
    got = borrow_configs(cache, 12288, 4096, 4096, 8, 104)
    assert got == ["GEMM from (14336, 4096, 128)"]  # nearest N at K 4096; group 128 over others
    assert cache["GEMM"]["(768, 12288, 4096, 4096, 8, 104)"] == cfg
    assert "(1024, 12288, 4096, 4096, 8, 104)" not in cache["GEMM"]  # only the rows it was tuned at
    assert borrow_configs(cache, 4096, 4096, 128, 8, 104) == []  # tuned already: nothing to borrow


@pytest.mark.parametrize("bits,group", [(4, None), (4, 32), (8, None), (6, 64)])
def test_dequant_kernel_is_the_simulated_weight_bit_for_bit(bits, group):
    """``dequant+cublas`` (``dequant+torch`` on the CPU) dequantizes in one fused pass: the same
    float weight as the eager reference, so the same output as ``simulated``, bit for bit."""
    lq, lin = _layer(bits, None, group, False, seed=3)
    for dtype in (torch.float16, torch.float32):
        rl = RealLinear.from_quant(lq, lin, device="cpu", dtype=dtype)
        x = rand_acts(5, 128, 4).to(dtype)
        w = real._dequant_impl(rl._ours(), rl.scale, rl.zero, rl.fmt == "int4", dtype)
        assert torch.equal(w, rl.dequantized(dtype))
        assert torch.equal(rl._run_fake("dequant+torch", x), rl._run_fake("simulated", x))
        torch.testing.assert_close(w.double(), lq.dequantized().double().to(dtype).double(), rtol=0, atol=0)


def _gemlite_pack(codes: torch.Tensor, nbits: int, word_bits: int = 32) -> torch.Tensor:
    """gemlite 0.6's ``pack_weights_over_cols_torch(..., transpose=True)`` as its source reads: word
    ``[n, j // per]`` ORs in ``code[n, j] << (j % per) * nbits``; the result transposed to ``[K/per, N]``."""
    per = word_bits // nbits
    n, k = codes.shape
    out = torch.zeros(n, k // per, dtype=torch.int64)
    for j in range(k):
        out[:, j // per] |= codes[:, j].long() << ((j % per) * nbits)
    out = out.to(torch.int32 if word_bits == 32 else torch.int8) if word_bits < 64 else out
    return out.t().contiguous()


@pytest.mark.parametrize("nbits,group,word_bits", [(4, 128, 32), (4, 32, 32), (8, 64, 32), (4, 64, 8)])
def test_gemlite_layout_dequantizes_to_the_simulated_weight(nbits, group, word_bits):
    """``gemlite-dequant+cublas`` (prefill of gemlite's layout): unpacking gemlite's words gives back the
    codes, and ``(q - zeros) * scales`` in fp16 is the simulated weight up to the scale's fp16
    rounding -- exactly ``fp16((q - z) * fp16(s))``, checked in float64."""
    from harness.kernels import gemlite_adapter as glk

    lq, _ = _layer(nbits, None, group, False, seed=5, n=48, k=256)
    codes = lq.codes.to(torch.uint8)
    g = lq.scale.shape[1]
    scales = lq.scale.to(torch.float16).t().contiguous()  # [G, N] as gemlite keeps them
    zeros = lq.zero.to(torch.float16).t().contiguous()
    wq = _gemlite_pack(codes, nbits, word_bits)
    w = glk.dequant_kn(wq, scales, zeros, nbits, word_bits // nbits, torch.float16)
    assert w.shape == (256, 48) and w.dtype == torch.float16
    rep = 256 // g
    want = ((codes.double() - lq.zero.double().repeat_interleave(rep, 1))
            * lq.scale.to(torch.float16).double().repeat_interleave(rep, 1)).to(torch.float16)
    assert torch.equal(w, want.t())
    # and against the state's own float weight: only the scale's rounding to fp16 apart
    torch.testing.assert_close(w.t().double(), lq.dequantized().double(), rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("nbits,group,k,word_bits,dtype", [
    (4, 128, 384, 32, torch.float16), (4, 32, 352, 32, torch.bfloat16), (8, 32, 352, 32, torch.float16),
    (4, 64, 320, 8, torch.float16)])
def test_triton_dequant_of_gemlite_words_equals_the_torch_reference(interp, nbits, group, k, word_bits, dtype):
    """The GPU path of ``gemlite-dequant+cublas`` (``dequant_words``, one Triton pass; the compiled
    torch reference failed on the GPU) gives the torch reference's fp16 weight bit for bit, for 4- and
    8-bit codes in 32-bit words and 4-bit codes in bytes, with K and N not multiples of its tile.
    bf16: Triton's interpreter truncates float32 to bf16 (the GPU rounds to nearest even), so there
    the check is against the exact product truncated to bf16, and within one bf16 step of torch's."""
    from harness.kernels import gemlite_adapter as glk

    lq, _ = _layer(nbits, None, group, False, seed=7, n=40, k=k)
    codes = lq.codes.to(torch.uint8)
    scales = lq.scale.to(dtype).t().contiguous()
    zeros = lq.zero.to(dtype).t().contiguous()
    wq = _gemlite_pack(codes, nbits, word_bits)
    per = word_bits // nbits
    want = glk.dequant_kn(wq, scales, zeros, nbits, per, dtype)
    got = interp.dequant_words(wq, scales, zeros, nbits, per, dtype)
    assert got.shape == (k, 40) and got.dtype == dtype
    if dtype == torch.float16:
        assert torch.equal(got, want)
        return
    rep = k // (k // group)
    exact = ((codes.double() - lq.zero.to(dtype).double().repeat_interleave(rep, 1))
             * lq.scale.to(dtype).double().repeat_interleave(rep, 1)).t().float()  # exact in float32
    truncated = (exact.view(torch.int32) & ~0xFFFF).view(torch.float32).to(dtype)
    assert torch.equal(got, truncated)
    step = want.float().abs().clamp_min(1e-30) * 2.0 ** -7
    assert bool(((got.float() - want.float()).abs() <= step).all())


@pytest.mark.parametrize("bits,group", [(8, None), (6, 128), (4, 64), (4, None)])
def test_splitk_gemv_sums_its_k_slices(interp, bits, group):
    """``gemv-splitk`` (a narrow layer with a long K: more programs than output tiles) under the
    interpreter: its float32 partials over K slices add up to the float64 product of the simulated
    weights, like the one-slice GEMV."""
    from harness.kernels import triton_matmul as tk

    n, k = 64, 2048
    assert tk.splitk_factor(n, 1, k, "cpu") == 4 and tk.splitk_factor(n, 1, 512, "cpu") == 1
    assert tk.splitk_factor(4096, 1, 11008, "cpu") == 1  # enough programs on 4 SMs already
    lq, lin = _layer(bits, None, group, False, seed=9, n=n, k=k)
    rl = RealLinear.from_quant(lq, lin, device="cpu", dtype=torch.float16)
    rl.act_dtype = torch.float16
    for rows in (1, 3):
        x = rand_acts(rows, k, rows + 20)
        want = _ref64(lq, x)
        split = rl.run(f"triton-{rl.fmt}-gemv-splitk", x)
        plain = rl.run(f"triton-{rl.fmt}-gemv", x)
        assert split.dtype == torch.float16 and split.shape == (rows, n)
        assert rel_err(split, want) < 2e-3 and rel_err(plain, want) < 2e-3
        torch.testing.assert_close(split.float(), plain.float(), rtol=2e-3, atol=2e-3)
    assert ("triton-int8-gemv-splitk" in rl.candidates("decode", "cpu")) == (rl.fmt == "int8")  # interpreter
