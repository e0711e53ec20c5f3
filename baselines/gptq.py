"""GPTQ (Frantar et al., 2022): second-order weight rounding with error feedback, layer by layer.

For each linear layer, with ``X`` its calibration inputs (``[tokens, in]``) and ``H = 2 XᵀX / n``,
columns are quantized one at a time and each column's rounding error is spread over the columns
not yet quantized through the upper Cholesky factor of ``H⁻¹`` (lazy batches of ``blocksize``
columns), which minimizes ``‖W X − Ŵ X‖²`` greedily. As in IST-DASLab/gptq and AutoGPTQ:

- dampening ``H += percdamp · mean(diag H) · I``; columns never activated (``H_jj = 0``) are
  zeroed; per-channel ranges come from the original weight (min/max, ``w_clip``);
- groups: without act-order, a group's range is taken from the already error-updated weights
  when the loop reaches the group's first column; with act-order the groups are *static*
  (ranges from the original weight before any update, AutoGPTQ's ``static_groups``) because the
  state stores contiguous groups of input channels and has no permutation index;
- act-order processes columns by decreasing ``diag H``;
- true-sequential: within a transformer layer the linears are quantized in stages of those that
  share an input (q/k/v, o, gate/up, down), each stage's Hessian measured with the earlier stages
  already quantized; layers are processed one after another with inputs from the already
  quantized previous layers (``harness.quant.blockwise``). Linears sharing an input share one
  Hessian and are solved together (their rows are independent given H).

Activation quantization (A<16): GPTQ runs as the W4A4 pipelines of QuaRot and SpinQuant run it
— its own calibration stream has the activation quantizers off (each layer's inputs carry the
earlier layers' quantized *weights* only), H is built from those inputs, and the activation
quantizers are set afterwards: static ranges by the engine's rule shared by every method
(``harness.quant.ranges``). The Hessian thus describes the inputs the weights will multiply up to
activation rounding, which the weight solve cannot anticipate anyway.

Precision (``precision``): the Hessian and the solve run in float64 on the CPU and in float32 on
GPUs by default: the sequential solve amplifies summation-order differences on ill-conditioned
Hessians, so in float32 its codes depended on the CPU thread count (docs/benchmarks/gptq.md).

Projector and lm_head linears (when ``parts`` asks for them) are not in transformer layers:
they get GPTQ with Hessians from a full forward pass with everything quantized so far applied.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

import torch

from harness.models.layers import part_of
from harness.quant.blockwise import Block, part_inputs, run_blockwise
from harness.quant.capture import linear_inputs, shared_input_sets, token_rows
from harness.quant.build import act_quantizer, rtn_state, target_linears
from harness.quant.config import QuantConfig
from harness.quant.quantizer import weight_qparams
from harness.quant.state import LinearQuant, QuantState
from harness.registry import Method, register_method


# ---- the GPTQ update ----------------------------------------------------------------------------

@dataclass
class GPTQResult:
    codes: torch.Tensor  # uint8 [out, in]
    scale: torch.Tensor  # [out, n_groups]
    zero: torch.Tensor  # [out, n_groups]
    loss: float  # Σ (w - q)² / (2 [H⁻¹]_jj²), the reference's error estimate
    damp: float  # the dampening actually used (raised if H was not positive definite)


def _round_col(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int):
    q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
    return q, scale * (q - zero)


def _upper_cholesky_inverse(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp·I)⁻¹, raising damp tenfold until H is positive definite."""
    mean_diag = torch.mean(torch.diag(H)).item()
    frac = percdamp
    for _ in range(6):
        Hd = H.clone()
        Hd.diagonal().add_(frac * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U, frac
        frac = max(frac * 10, 1e-6)
    raise RuntimeError("GPTQ: Hessian is not positive definite even after strong dampening")


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, sym: bool = False,
                  group_size: int | None = None, clip: float = 1.0, *, percdamp: float = 0.01,
                  blocksize: int = 128, act_order: bool = False,
                  static_groups: bool = False) -> GPTQResult:
    """Quantize ``W`` [out, in] given ``H`` [in, in]; computes in float64 if ``W`` is, else float32."""
    dt = torch.float64 if W.dtype == torch.float64 else torch.float32
    W = W.detach().to(dt).clone()
    H = H.detach().to(device=W.device, dtype=dt).clone()
    out_f, n = W.shape
    maxq = 2 ** bits - 1
    grouped = group_size is not None and 0 < group_size < n
    if grouped and n % group_size:
        raise ValueError(f"group size {group_size} does not divide the input width {n}")
    gs = group_size if grouped else n
    n_groups = n // gs
    if not grouped:  # per channel, from the original weight (before dead columns are zeroed)
        s, z = weight_qparams(W, bits, sym, None, clip)
        scale = s.to(dt).expand(out_f, 1).clone()
        zero = z.to(dt).expand(out_f, 1).clone()
    else:
        scale = torch.zeros(out_f, n_groups, dtype=dt, device=W.device)
        zero = torch.zeros_like(scale)

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if grouped and (static_groups or act_order):
        static_groups = True
        s, z = weight_qparams(W, bits, sym, gs, clip)
        scale.copy_(s)
        zero.copy_(z)
    else:
        static_groups = False

    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    Hinv, damp = _upper_cholesky_inverse(H, percdamp)
    del H

    if grouped and not static_groups:
        # align lazy batches with groups so a group's columns are fully updated when its range is taken
        if blocksize % gs and gs % blocksize:
            blocksize = math.gcd(blocksize, gs)
    Q = torch.zeros(out_f, n, dtype=torch.uint8, device=W.device)
    loss = torch.zeros((), dtype=dt, device=W.device)
    col_group = (perm if perm is not None else torch.arange(n, device=W.device)) // gs
    col_group = col_group.tolist()
    s_col, z_col = scale[:, 0], zero[:, 0]
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            col = i1 + i
            if grouped:
                g = col_group[col]
                if not static_groups and col % gs == 0:
                    src = W1[:, i:i + gs] if i + gs <= count else W[:, col:col + gs]
                    s, z = weight_qparams(src, bits, sym, None, clip)
                    scale[:, g:g + 1] = s.to(dt)
                    zero[:, g:g + 1] = z.to(dt)
                s_col, z_col = scale[:, g], zero[:, g]
            w = W1[:, i]
            q, deq = _round_col(w, s_col, z_col, maxq)
            Q1[:, i] = q
            err = (w - deq) / Hinv1[i, i]
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)
            Err1[:, i] = err
        Q[:, i1:i2] = Q1.to(torch.uint8)
        loss += Err1.pow(2).sum() / 2
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return GPTQResult(codes=Q, scale=scale.float(), zero=zero.float(), loss=float(loss), damp=damp)


# ---- Hessians from calibration inputs ----------------------------------------------------------

class HessianAccumulator:
    """``H = 2/n Σ x xᵀ`` over the real tokens seen, accumulated in ``dtype``."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        self.H: torch.Tensor | None = None
        self.n = 0
        self.dtype = dtype

    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        rows = token_rows(x, mask).to(self.dtype)
        if self.H is None:
            self.H = torch.zeros(rows.shape[1], rows.shape[1], dtype=self.dtype, device=rows.device)
        self.H.addmm_(rows.T, rows)
        self.n += rows.shape[0]

    def value(self) -> torch.Tensor:
        if self.H is None or self.n == 0:
            raise RuntimeError("no calibration tokens reached this linear layer")
        return self.H * (2.0 / self.n)


def _shared_input_sets(names: list[str], run) -> list[list[str]]:
    """Consecutive linears (in call order) that receive the very same input tensor.

    Inputs are held until the end, so a freed buffer cannot be reused by a later input and be
    mistaken for a shared one.
    """
    order: list[tuple[str, torch.Tensor]] = []
    seen: set[str] = set()

    def fn(name, x, _mask):
        if name not in seen:
            seen.add(name)
            order.append((name, x))
    run(names, fn, first_call_only=True)
    missing = [n for n in names if n not in seen]
    if missing:
        raise RuntimeError(f"calibration never reached {missing}")

    return shared_input_sets(order)


def _to_cpu(lq: LinearQuant) -> LinearQuant:
    for key in ("codes", "scale", "zero"):
        setattr(lq, key, getattr(lq, key).cpu())
    if lq.act is not None and lq.act.scale is not None:
        lq.act.scale, lq.act.zero = lq.act.scale.cpu(), lq.act.zero.cpu()
    return lq


# ---- the method --------------------------------------------------------------------------------

@register_method
class GPTQ(Method):
    name = "gptq"
    summary = "GPTQ: Hessian-based error-feedback rounding, sequential over layers"
    needs_calibration = True
    PRECISIONS = {"float32": torch.float32, "float64": torch.float64}

    @dataclass
    class Options:
        percdamp: float = 0.01
        blocksize: int = 128
        act_order: bool = False
        static_groups: bool = False
        true_sequential: bool = True
        propagate: Literal["quantized", "float"] = "quantized"  # inputs from the already-quantized layers
        precision: Literal["auto", "float32", "float64"] = "auto"  # Hessian and solve (see math_dtype)

    def math_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype of the Hessian and the GPTQ solve: ``auto`` is float64 on the CPU (small
        models; the float32 solve depended on the thread count) and float32 on GPUs, as the
        reference implementations."""
        choice = self.options["precision"]
        if choice == "auto":
            return torch.float64 if torch.device(device).type == "cpu" else torch.float32
        return self.PRECISIONS[choice]

    # one stage: Hessians for `sets` from the stream as it is, then GPTQ on each set
    def _solve_sets(self, sets, weights, run, qcfg, frag: QuantState, log: dict) -> None:
        o = self.options
        firsts = [s[0] for s in sets]
        dt = self.math_dtype(weights[firsts[0]].device)
        hess = {n: HessianAccumulator(dt) for n in firsts}
        run(firsts, lambda n, x, m: hess[n].add(x, m))
        for s in sets:
            H = hess[s[0]].value()
            ws = [weights[n].detach().to(dt) for n in s]  # gptq_quantize computes in W's dtype
            res = gptq_quantize(torch.cat(ws, 0), H, qcfg.w_bits, qcfg.w_sym, qcfg.w_group_size,
                                qcfg.w_clip, percdamp=o["percdamp"], blocksize=o["blocksize"],
                                act_order=o["act_order"], static_groups=o["static_groups"])
            log["loss"] += res.loss
            log["max_damp"] = max(log["max_damp"], res.damp)
            row = 0
            for n, w in zip(s, ws):
                r = slice(row, row + w.shape[0])
                row += w.shape[0]
                # activation quantizers stay off in GPTQ's own stream; set when quantize() ends.
                # Codes stay on the model's device until then: later stages apply them.
                frag.linears[n] = LinearQuant(
                    bits=qcfg.w_bits, codes=res.codes[r], scale=res.scale[r],
                    zero=res.zero[r], group_size=qcfg.w_group_size, sym=qcfg.w_sym, act=None)

    def _process_block(self, block: Block, qcfg: QuantConfig, targets: dict, log: dict) -> QuantState:
        frag = block.fragment(self.name, qcfg)
        names = [n for n in block.linears() if n in targets]
        if not names:
            return frag

        def run(hook_names, fn, first_call_only=False):
            calls = block.calls[:1] if first_call_only else None
            block.linear_inputs(hook_names, fn, state=frag, calls=calls)

        sets = _shared_input_sets(names, run)
        # true-sequential: one stage per shared-input set, measured with earlier stages quantized
        stages = [[s] for s in sets] if self.options["true_sequential"] else [sets]
        for ss in stages:
            self._solve_sets(ss, {n: targets[n].weight for s in ss for n in s}, run, qcfg, frag, log)
        return frag

    def _process_loose(self, model, names, batches, state, qcfg, targets, log) -> None:
        """Linears outside transformer layers (projector, lm_head): Hessians from a full forward."""
        if not names:
            return

        def run(hook_names, fn, first_call_only=False):
            linear_inputs(model, hook_names, batches[:1] if first_call_only else batches, fn, state=state)

        sets = [[n] for n in names]
        frag = QuantState(method=self.name, config=qcfg)
        self._solve_sets(sets, {n: targets[n].weight for n in names}, run, qcfg, frag, log)
        state.linears.update(frag.linears)

    def quantize(self, lm, qcfg: QuantConfig, calib) -> QuantState:
        t0 = time.perf_counter()
        model = lm.model
        o = self.options
        if not qcfg.quantizes_weights:  # activation-only schemes: nothing for GPTQ to solve
            state = rtn_state(model, qcfg, self.name)
            state.meta.update(options=dict(o), quantize_s=time.perf_counter() - t0)
            return state
        if calib is None:
            raise ValueError("gptq needs calibration data")
        targets = target_linears(model, qcfg)
        batches = list(calib.inputs())
        state = QuantState(method=self.name, config=qcfg)
        log = {"loss": 0.0, "max_damp": o["percdamp"]}
        timings = {}
        parts = [p for p in ("vision", "projector", "language", "lm_head") if p in qcfg.parts]
        for part in parts:
            tp = time.perf_counter()
            if part in ("vision", "language"):
                inputs = part_inputs(model, part, batches, state=state)
                frag = run_blockwise(
                    model, inputs, lambda blk: self._process_block(blk, qcfg, targets, log),
                    propagate=o["propagate"])
                state.linears.update(frag.linears)
            else:
                names = [n for n in targets if part_of(n) == part]
                self._process_loose(model, names, batches, state, qcfg, targets, log)
            timings[part] = round(time.perf_counter() - tp, 3)
        missing = [n for n in targets if n not in state.linears]
        if missing:
            raise RuntimeError(f"gptq left target linears unquantized: {missing[:5]}")
        state.linears = {n: _to_cpu(state.linears[n]) for n in targets}  # model order
        for lq in state.linears.values():
            lq.act = act_quantizer(qcfg)
        state.meta.update(options=dict(o), gptq_loss=log["loss"], max_percdamp_used=log["max_damp"],
                          part_s=timings, quantize_s=time.perf_counter() - t0)
        return state
