"""Deployed weight formats are exact: packing gives back the state's codes bit for bit."""

import pytest
import torch

from harness.kernels.packing import (from_int8_storage, pack_int4, packed_bytes, storage_format,
                                  to_int8_storage, unpack_int4)
from harness.kernels.real import RealLinear, unpack_to
from harness.quant.quantizer import rtn_weight
from harness.quant.state import LinearQuant


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_int4_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2 ** bits, (7, 64), generator=g, dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (7, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)
    # layout: even column in the low nibble
    assert int(packed[0, 0]) == int(codes[0, 0]) | (int(codes[0, 1]) << 4)


def test_int4_rejects_bad_input():
    with pytest.raises(ValueError):
        pack_int4(torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(ValueError):
        pack_int4(torch.full((2, 4), 16, dtype=torch.uint8))
    with pytest.raises(TypeError):
        pack_int4(torch.zeros(2, 4, dtype=torch.int32))


@pytest.mark.parametrize("bits", [5, 6, 7, 8])
def test_int8_storage_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2 ** bits, (5, 48), generator=g, dtype=torch.uint8)
    zero = torch.randint(0, 2 ** bits, (5, 1), generator=g).float()
    stored, zc = to_int8_storage(codes, zero, bits)
    assert stored.dtype == torch.int8
    assert torch.equal(from_int8_storage(stored, bits), codes)
    # the kernels compute (stored - zc), which must equal (code - zero) exactly
    assert torch.equal(stored.float() - zc, codes.float() - zero)


def test_formats_and_bytes():
    assert storage_format(4) == "int4" and storage_format(3) == "int4" and storage_format(6) == "int8"
    assert packed_bytes((8, 64), 4) == 256 and packed_bytes((8, 64), 8) == 512


@pytest.mark.parametrize("bits,group", [(4, None), (4, 16), (6, None), (8, 32)])
def test_real_linear_dequantizes_like_the_state(bits, group):
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(0))
    codes, scale, zero = rtn_weight(w, bits, False, group)
    lq = LinearQuant(bits=bits, codes=codes, scale=scale, zero=zero, group_size=group)
    rl = RealLinear.from_quant(lq, None, device="cpu", dtype=torch.float32)
    assert torch.equal(rl.dequantized(torch.float32), lq.dequantized())
    expected = codes.numel() // 2 if bits <= 4 else codes.numel()
    assert rl.wdata.numel() * rl.wdata.element_size() == expected


def test_unpack_to_integer_operands():
    codes = torch.randint(0, 16, (8, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    zero = torch.randint(0, 16, (8, 1), generator=torch.Generator().manual_seed(2)).float()
    want = codes.float() - zero
    assert torch.equal(unpack_to(pack_int4(codes), zero, False).float(), want)
    if hasattr(torch, "float8_e4m3fn"):
        assert torch.equal(unpack_to(pack_int4(codes), zero, True).float(), want)  # exact in e4m3


def test_concat_keeps_each_part():
    g = torch.Generator().manual_seed(3)
    parts = []
    for n in (16, 8, 8):
        codes, s, z = rtn_weight(torch.randn(n, 32, generator=g), 4, False, None)
        parts.append(RealLinear.from_quant(LinearQuant(bits=4, codes=codes, scale=s, zero=z), None,
                                           device="cpu", dtype=torch.float32))
    fused = RealLinear.concat(parts)
    assert fused.out_features == 32
    x = torch.randn(3, 32, generator=g)
    want = torch.cat([p.simulated(x) for p in parts], dim=-1)
    assert torch.equal(fused.simulated(x), want)
