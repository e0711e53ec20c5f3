"""CPU micro-benchmarks of quantize, pack and unpack (pytest-benchmark).

Kept out of the default test run (tests/ is the default path and pyproject adds
``--benchmark-skip``). Run with::

    pip install -e ".[bench]" && pytest benchmarks --benchmark-only
"""

import pytest
import torch

from harness.kernels.packing import pack_int4, to_int8_storage, unpack_int4
from harness.kernels.real import RealLinear
from harness.quant.quantizer import dequantize_weight, rtn_weight
from harness.quant.state import LinearQuant

SHAPE = (1024, 4096)  # a slice of a 7B projection: big enough to be bandwidth-bound, quick on CPU


@pytest.fixture(scope="module")
def weight():
    return torch.randn(*SHAPE, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def codes4(weight):
    return rtn_weight(weight, 4, False, None)


@pytest.mark.parametrize("bits,group", [(4, None), (4, 128), (8, None)])
def test_quantize_rtn(benchmark, weight, bits, group):
    codes, scale, zero = benchmark(rtn_weight, weight, bits, False, group)
    assert codes.shape == SHAPE


def test_pack_int4(benchmark, codes4):
    packed = benchmark(pack_int4, codes4[0])
    assert packed.shape == (SHAPE[0], SHAPE[1] // 2)


def test_unpack_int4(benchmark, codes4):
    packed = pack_int4(codes4[0])
    out = benchmark(unpack_int4, packed)
    assert torch.equal(out, codes4[0])


def test_int8_storage(benchmark, weight):
    codes, scale, zero = rtn_weight(weight, 8, False, None)
    stored, zc = benchmark(to_int8_storage, codes, zero, 8)
    assert stored.dtype == torch.int8


def test_dequantize(benchmark, codes4):
    w = benchmark(dequantize_weight, *codes4)
    assert w.shape == SHAPE


def test_build_real_linear(benchmark, codes4):
    lq = LinearQuant(bits=4, codes=codes4[0], scale=codes4[1], zero=codes4[2])
    rl = benchmark(RealLinear.from_quant, lq, None, device="cpu", dtype=torch.float16)
    assert rl.fmt == "int4"
