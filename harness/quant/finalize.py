"""The engine's step after every ``Method.quantize``: check the state, fill what it left open.

``finalize_state`` runs once per quantization state, before it is cached or evaluated:

1. the model must be as the method found it (parameters and buffers unchanged);
2. the state must be well formed: every target linear present (unless the method is a control
   that changes float weights only), codes within ``2**bits``, scales finite and positive, zero
   points integer, shapes that match the layer, and the scheme's bit widths and activation
   quantizers — a row must be what its label says;
3. undecided activation quantizers are filled by the suite's rule (``harness.quant.ranges``);
4. the proof of quantization (``QuantState.proof``) is computed once and kept in ``meta``.
"""

from __future__ import annotations

import torch
from torch import nn

from .build import target_linears
from .config import QuantConfig
from .ranges import fill_static_ranges
from .state import QuantState
from .transforms import online


class StateError(ValueError):
    """A method returned a state the engine cannot run as the row's scheme; names the layer."""


def param_checksum(model: nn.Module) -> dict[str, tuple[float, float]]:
    """Per parameter and buffer, the float64 sum and sum of squares: equal before and after a
    method runs when the method left the model as it found it (same device, same reduction)."""
    out = {}
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point():
                d = t.detach().double()
                out[name] = (float(d.sum()), float(d.pow(2).sum()))
    return out


def check_model_unchanged(before: dict, after: dict, method: str) -> None:
    changed = sorted(n for n in before.keys() | after.keys() if before.get(n) != after.get(n))
    if changed:
        raise StateError(f"method {method!r} changed the model it was given ({len(changed)} tensors, "
                         f"e.g. {changed[:3]}): quantize() must leave lm.model as it found it and put "
                         "float changes in QuantState.float_params")


def validate_state(model: nn.Module, state: QuantState, qcfg: QuantConfig, *, quantizes: bool = True) -> None:
    """Raise ``StateError`` naming the first layers that break the contract (module doc, item 2)."""
    problems: list[str] = []
    targets = target_linears(model, qcfg)
    if quantizes:
        missing = [n for n in targets if n not in state.linears]
        if missing:
            problems.append(f"{len(missing)} target linears missing, e.g. {missing[:3]}")
    for name, lq in state.linears.items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            problems.append(f"{name}: no such module in the model")
            continue
        if not isinstance(mod, nn.Linear):
            problems.append(f"{name}: a {type(mod).__name__}, not nn.Linear")
            continue
        if lq.input_transform is not None:
            try:
                online(lq.input_transform)
            except ValueError as exc:
                problems.append(f"{name}: {exc}")
        if lq.codes is not None:
            problems += [f"{name}: {p}" for p in _code_problems(lq, mod, qcfg)]
        elif quantizes and qcfg.quantizes_weights:
            problems.append(f"{name}: no weight codes at w{qcfg.w_bits}")
        if quantizes and qcfg.quantizes_acts:
            act = lq.act
            if act is None:
                problems.append(f"{name}: no activation quantizer at a{qcfg.a_bits}")
            elif act.bits != qcfg.a_bits or act.granularity != qcfg.a_granularity:
                problems.append(f"{name}: activation quantizer a{act.bits} {act.granularity}, "
                                f"scheme says a{qcfg.a_bits} {qcfg.a_granularity}")
    if problems:
        raise StateError(f"state of {state.method!r} at {qcfg.scheme} is not valid: " + "; ".join(problems[:5])
                         + (f"; and {len(problems) - 5} more" if len(problems) > 5 else ""))


def _code_problems(lq, mod: nn.Linear, qcfg: QuantConfig) -> list[str]:
    out = []
    codes, scale, zero = lq.codes, lq.scale, lq.zero
    if tuple(codes.shape) != tuple(mod.weight.shape):
        return [f"codes {tuple(codes.shape)} do not match the weight {tuple(mod.weight.shape)}"]
    if codes.dtype != torch.uint8:
        out.append(f"codes are {codes.dtype}, not uint8")
    if lq.bits != qcfg.w_bits:
        out.append(f"{lq.bits}-bit codes, scheme says w{qcfg.w_bits}")
    if int(codes.max()) >= 2 ** lq.bits:
        out.append(f"a code {int(codes.max())} ≥ 2^{lq.bits}")
    if scale is None or zero is None or scale.shape != zero.shape or scale.dim() != 2 \
            or scale.shape[0] != codes.shape[0] or codes.shape[1] % scale.shape[1]:
        return out + ["scale/zero must be [out, n_groups] with n_groups dividing the input width"]
    if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        out.append("scales must be finite and positive")
    if not bool((zero == zero.round()).all()) or float(zero.min()) < 0 or float(zero.max()) > 2 ** lq.bits - 1:
        out.append(f"zero points must be integers in [0, {2 ** lq.bits - 1}]")
    return out


def finalize_state(model: nn.Module, state: QuantState, qcfg: QuantConfig, batches: list[dict] | None,
                   rule: dict | None, *, quantizes: bool = True, device=None) -> QuantState:
    """Validate ``state``, fill its undecided activation ranges by ``rule`` and record both, with
    the proof of quantization, in ``state.meta`` (module doc). Returns the same state."""
    validate_state(model, state, qcfg, quantizes=quantizes)
    if rule is not None:
        state.meta["act_ranges"] = fill_static_ranges(model, state, list(batches or []), rule)
    state.meta["proof"] = state.proof(device=device)
    return state
