"""Storage formats of quantized weights for the real kernels, derived from ``LinearQuant`` codes.

* ``int4`` (bits <= 4): two codes a byte, ``byte[n, j] = code[n, 2j] | code[n, 2j+1] << 4``;
  the kernels subtract the zero point and multiply by the scale on the fly.
* ``int8`` (5..8 bits): one signed byte a code, ``code - 2**(bits-1)``; the zero point is kept as
  ``zc = zero - 2**(bits-1)`` so that ``(stored - zc) == (code - zero)`` exactly.

Both are exact: unpacking gives back the state's codes bit for bit (tests/test_perf_packing.py).
"""

from __future__ import annotations

import torch


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``[out, in]`` in 0..15 -> uint8 ``[out, in // 2]``, two codes a byte."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    if codes.shape[-1] % 2:
        raise ValueError(f"the input width {codes.shape[-1]} must be even to pack two codes a byte")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError("int4 packing needs codes in 0..15")
    lo = codes[..., 0::2]
    hi = codes[..., 1::2]
    return (lo | (hi << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_int4``: uint8 ``[out, in // 2]`` -> uint8 codes ``[out, in]``."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def to_int8_storage(codes: torch.Tensor, zero: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of ``bits <= 8`` as signed bytes ``code - 2**(bits-1)``, and the shifted zero ``zc``."""
    if not 1 <= bits <= 8:
        raise ValueError(f"int8 storage holds 1..8-bit codes, got {bits}")
    offset = 2 ** (bits - 1)
    stored = (codes.to(torch.int16) - offset).to(torch.int8).contiguous()
    return stored, (zero.float() - offset).contiguous()


def from_int8_storage(stored: torch.Tensor, bits: int) -> torch.Tensor:
    return (stored.to(torch.int16) + 2 ** (bits - 1)).to(torch.uint8)


def storage_format(bits: int) -> str:
    return "int4" if bits <= 4 else "int8"


def packed_bytes(codes_shape: tuple[int, int], bits: int) -> int:
    out_f, in_f = codes_shape
    return out_f * in_f // 2 if storage_format(bits) == "int4" else out_f * in_f
