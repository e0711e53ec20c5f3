"""Online input transforms of the real-kernel engine (a state's ``LinearQuant.input_transform``).

``hadamard``: ``x @ H`` along the last dim, the very arithmetic of
``harness.quant.transforms.apply_hadamard`` (a fast Walsh–Hadamard transform over the power-of-two
factor, a small dense product over the other, divided by √n), with every matrix it multiplies by
(the Sylvester blocks and the dense factor) kept on the layer's device per dtype: ``apply_hadamard``
copies them from the host on every call, which synchronizes, so a CUDA graph cannot capture it (on
an H100 QuaRot's prefill and decode then ran eager: 0.08× fp16 decode) and a decode step should
not pay for it. The engine applies it in front of the
layer's activation quantizer, as the simulated model's first forward pre-hook does, so its cost is
in every timed row of a state that has one; where Triton runs, through ``hadamard``'s kernel (the
transform and the quantizer in one launch), of which this class is the reference and the fallback.
"""

from __future__ import annotations

import math

import torch

from ..quant.transforms import ONLINE_TRANSFORMS, _dense_factor, _fwht, _sylvester, hadamard_factors

SUPPORTED = ("hadamard",)


class UnsupportedTransform(ValueError):
    """An ``input_transform`` the engine cannot apply (the state must not be timed without it)."""


class OnlineHadamard:
    """``apply_hadamard`` for inputs of width ``n``, with its dense factor cached on the device."""

    spec = "hadamard"

    def __init__(self, n: int):
        try:
            self.m, self.p = hadamard_factors(n)
        except ValueError as exc:
            raise UnsupportedTransform(str(exc)) from None
        self.n = n
        self._factor: dict[tuple, torch.Tensor] = {}

    def factor(self, device, dtype) -> torch.Tensor:
        key = (str(device), dtype)
        if key not in self._factor:  # made on the first (eager) call, before any graph capture
            self._factor[key] = _dense_factor(self.m).to(device=device, dtype=dtype)
        return self._factor[key]

    def block(self, b: int, device, dtype) -> torch.Tensor:
        """The Sylvester block of order ``b`` on ``device`` (cached like the dense factor)."""
        key = (b, str(device), dtype)
        if key not in self._factor:
            self._factor[key] = _sylvester(b).to(device=device, dtype=dtype)
        return self._factor[key]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.n:
            raise ValueError(f"online Hadamard of width {self.n} given an input of width {x.shape[-1]}")
        y = _fwht(x.reshape(*x.shape[:-1], self.m, self.p), block=self.block)
        if self.m > 1:
            y = torch.einsum("ik,...ij->...kj", self.factor(x.device, x.dtype), y)
        return (y / math.sqrt(self.n)).reshape(x.shape)


def make_transform(spec: str | None, n: int):
    """The callable for a state's ``input_transform`` on inputs of width ``n`` (None: identity);
    ``UnsupportedTransform`` for a spec this engine cannot run."""
    if spec is None:
        return None
    if spec == "hadamard":
        return OnlineHadamard(n)
    known = ", ".join(ONLINE_TRANSFORMS)
    raise UnsupportedTransform(f"input transform {spec!r} is not implemented by the real-kernel engine "
                               f"(engine: {', '.join(SUPPORTED)}; states may hold: {known})")
