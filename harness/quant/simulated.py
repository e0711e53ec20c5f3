"""The simulated (fake-quant) model: a float model that computes exactly what the state says.

``apply_state`` swaps each quantized ``nn.Linear`` for a ``FakeQuantLinear`` holding the
dequantized weight and the input activation quantizer (behind the state's online input
transform, if any, or the one the replaced linear had inside ``transforms.edited``), and loads
the method's float overrides.
It returns a handle whose ``restore()`` puts the float model back, so one loaded model serves
every (method, scheme) cell without a second copy in memory.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .quantizer import fake_quant, wide
from .state import ActQuant, LinearQuant, QuantState
from .transforms import add_online_hook, online_transform_of


def quantize_activation(x: torch.Tensor, act: ActQuant) -> torch.Tensor:
    """Fake-quantize a linear layer's input as the activation quantizer prescribes."""
    if act.granularity == "per_token":
        return fake_quant(x, act.bits, act.sym, act.clip_ratio, dim=-1)
    if act.scale is None:
        raise ValueError("a per-tensor activation quantizer needs a calibrated scale")
    xw = wide(x)
    scale = act.scale.to(device=x.device, dtype=xw.dtype)
    zero = act.zero.to(device=x.device, dtype=xw.dtype)
    q = torch.round(xw / scale) + zero
    return ((q.clamp_(0, 2 ** act.bits - 1) - zero) * scale).to(x.dtype)


class FakeQuantLinear(nn.Module):
    """``y = Q_a(x) @ dequant(codes).T + b``; counts how often its activation quantizer fired."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, act: ActQuant | None,
                 quant: LinearQuant | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.act = act
        self.quant = quant  # the state entry, for real-kernel backends and proofs
        self.act_calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = quantize_activation(x, self.act)
            self.act_calls += 1
        return nn.functional.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        wb = self.quant.bits if self.quant is not None and self.quant.codes is not None else 16
        ab = self.act.bits if self.act is not None else 16
        return f"in={self.in_features}, out={self.out_features}, w{wb}a{ab}"


def build_fake_linear(linear: nn.Linear, lq: LinearQuant) -> FakeQuantLinear:
    """The simulated replacement of ``linear`` described by ``lq``."""
    ref = linear.weight
    if lq.codes is not None:
        weight = lq.dequantized()
    elif lq.weight is not None:
        weight = lq.weight
    else:
        weight = ref.detach()
    weight = weight.to(device=ref.device, dtype=ref.dtype)
    bias = None if linear.bias is None else linear.bias.detach()
    return FakeQuantLinear(weight, bias, lq.act, lq)


def _split(name: str) -> tuple[str, str]:
    parent, _, child = name.rpartition(".")
    return parent, child


@dataclass
class AppliedState:
    """Handle on a model that currently runs a state; ``restore()`` undoes ``apply_state``."""

    model: nn.Module
    state: QuantState
    replaced: dict[str, nn.Module] = field(default_factory=dict)
    saved_params: dict[str, torch.Tensor] = field(default_factory=dict)
    restored: bool = False

    def fake_linears(self) -> dict[str, FakeQuantLinear]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, FakeQuantLinear)}

    def act_quantizers_fired(self) -> int:
        """How many activation quantizers ran at least once since the state was applied."""
        return sum(1 for m in self.fake_linears().values() if m.act is not None and m.act_calls > 0)

    def restore(self) -> None:
        if self.restored:
            return
        for name, original in self.replaced.items():
            parent, child = _split(name)
            setattr(self.model.get_submodule(parent), child, original)
        with torch.no_grad():
            for name, value in self.saved_params.items():
                self.model.get_parameter(name).copy_(value)
        self.restored = True


def apply_state(model: nn.Module, state: QuantState, device=None) -> AppliedState:
    """Make ``model`` compute what ``state`` describes (in place, reversible).

    ``device``: where to dequantize (e.g. the GPU for 7B/13B states kept on the CPU); the
    modules keep the original, un-moved state entries for real-kernel backends and proofs.
    """
    handle = AppliedState(model=model, state=state)
    try:
        with torch.no_grad():
            for name, value in state.float_params.items():
                param = model.get_parameter(name)
                handle.saved_params[name] = param.detach().clone()
                param.copy_(value.to(device=param.device, dtype=param.dtype))
        for name, lq in state.linears.items():
            linear = model.get_submodule(name)
            if not isinstance(linear, nn.Linear):
                raise TypeError(f"state entry {name!r} is a {type(linear).__name__}, not nn.Linear")
            source = lq if device is None else replace(lq, **{
                k: getattr(lq, k).to(device) for k in ("codes", "scale", "zero", "weight")
                if getattr(lq, k) is not None})
            fake = build_fake_linear(linear, source)
            fake.quant = lq
            # inside ``transforms.edited`` the linear may carry an online transform the entry
            # (made from the edited weight, e.g. by GPTQ) does not name: the fake keeps it
            spec, inherited = lq.input_transform, online_transform_of(linear)
            if spec is not None and inherited is not None and spec != inherited:
                raise ValueError(f"{name}: input transform {spec!r} on top of {inherited!r}")
            if (spec or inherited) is not None:
                add_online_hook(fake, spec or inherited)
            parent, child = _split(name)
            setattr(model.get_submodule(parent), child, fake)
            handle.replaced[name] = linear
    except Exception:
        handle.restore()
        raise
    return handle


@contextmanager
def applied(model: nn.Module, state: QuantState):
    """``with applied(model, state): ...`` — the model runs the state inside the block only."""
    handle = apply_state(model, state)
    try:
        yield handle
    finally:
        handle.restore()
