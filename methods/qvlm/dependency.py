"""Cross-layer dependency mining (CDM): Q-VLM §1, paper Eq. 4–7.

The dependency between consecutive language-model layers k and k+1 is the conditional entropy of
their quantized activations, D(k, k+1) = H(X_q^{k+1} | X_q^k) (Eq. 4), and consecutive layers are
grouped into blocks of at most ``max_block`` layers when the summed dependency exceeds
``(k_s - k_r) * h0`` (Eq. 6–7).

Choices the paper leaves open, and ours:

* **Which activation.** ``X^k`` is the hidden state layer k hands to layer k+1 (its output), on
  the float model, quantized on the grid of a per-token b-bit quantizer (b = the scheme's activation
  bits, or ``fallback_bits`` when activations stay in float): code coordinate ``u = x / s_t``
  with ``s_t = max|x_t| / (2**(b-1) - 1)`` (symmetric) or ``u = (x - min_t) / s_t`` (asymmetric),
  levels the integers of the code range.
* **Soft assignment (Eq. 5).** ``a_m(x) = softmax_m(-(u - m)**2 / tau)``: the paper's
  ``exp(-(x - q_m)**2 / Δ)`` measured in units of the step Δ (the literal formula is not scale
  invariant), with a temperature ``tau`` (code units squared). ``tau -> 0`` is hard rounding.
* **Joint distribution.** A soft-binned plug-in (kernel-histogram) estimator that pairs the two
  layers' activations position by position (same token, same channel; the residual stream keeps
  its channels across layers): ``P(m, n) = 1/N Σ_i a_m(x_i) a_n(y_i)`` over ``N`` positions drawn
  at random (seeded) from the real (non-padding) tokens, the same positions for every layer.
  ``H(Y|X) = H(X, Y) - H(X)`` in nats. The soft kernel blurs: a copy gives a small floor rather
  than exactly 0 (about 0.06 nats at the default tau=0.01 on Gaussian data, 2.5% of
  the 4-bit marginal entropy; it vanishes as tau -> 0, see the tests), an independent
  layer gives the marginal entropy H(Y) up to the plug-in bias (M-1)^2 / 2N.
* **h0.** Not given by the paper; the rule is an option (``h0_rule``), the resolved value is
  recorded. ``"median"`` (default): the median of the model's adjacent dependencies on the
  calibration set, so roughly half the adjacent pairs may join. ``"mean"``: their mean — the
  official code's threshold (its quant_modules.py compares a layer's dependency with the running
  mean of the entropies it has collected); it is pulled up by a few strong dependencies where the
  median is not. ``"absolute"``: a fixed ``h0`` in nats. Median and mean are *relative* rules:
  scaling every dependency by c > 0 scales h0 by c and leaves the blocks unchanged, so only the
  absolute rule lets lower dependency (VEO's aim) give smaller blocks (tested).
* **Partition.** Greedy left to right: a block starting at k_r grows to k_s while
  ``Σ_{k_r<=k<k_s} D(k, k+1) > (k_s - k_r) * h0`` and it holds fewer than ``max_block`` layers.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def code_units(x: torch.Tensor, bits: int, sym: bool = True) -> tuple[torch.Tensor, int, int]:
    """``x`` ([..., channels]) in code units of a per-token b-bit quantizer, clamped to its range.

    Returns ``(u, lo, hi)``: the levels are the integers ``lo..hi``. The per-token scale is
    treated as a constant (detached), as the rounding grid is.
    """
    x = x if x.dtype == torch.float64 else x.float()  # float64 stays float64 (reproducible partitions)
    if sym:
        qmax = 2 ** (bits - 1) - 1
        scale = (x.detach().abs().amax(dim=-1, keepdim=True) / qmax).clamp_min(1e-8)
        return (x / scale).clamp(-qmax, qmax), -qmax, qmax
    levels = 2 ** bits - 1
    xmin = x.detach().amin(dim=-1, keepdim=True).clamp(max=0)
    xmax = x.detach().amax(dim=-1, keepdim=True).clamp(min=0)
    scale = ((xmax - xmin) / levels).clamp_min(1e-8)
    return ((x - xmin) / scale).clamp(0, levels), 0, levels


def soft_assign(u: torch.Tensor, lo: int, hi: int, tau: float) -> torch.Tensor:
    """``[N] -> [N, M]``: soft assignment of code coordinates to the levels ``lo..hi`` (Eq. 5)."""
    u = u if u.dtype == torch.float64 else u.float()
    levels = torch.arange(lo, hi + 1, device=u.device, dtype=u.dtype)
    return torch.softmax(-(u.reshape(-1, 1) - levels) ** 2 / tau, dim=-1)


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of a distribution given as a tensor of probabilities."""
    return -(p * torch.log(p.clamp_min(1e-12))).sum()


def joint_distribution(a_x: torch.Tensor, a_y: torch.Tensor) -> torch.Tensor:
    """``P(m, n) = 1/N Σ_i a_m(x_i) a_n(y_i)`` from paired soft assignments ``[N, M]``."""
    return a_x.t() @ a_y / a_x.shape[0]


def conditional_entropy(joint: torch.Tensor) -> torch.Tensor:
    """``H(Y|X) = -Σ P(x, y) log P(y|x) = H(X, Y) - H(X)`` (Eq. 4) for ``joint[x, y]``."""
    return entropy(joint) - entropy(joint.sum(dim=1))


def dependency(x: torch.Tensor, y: torch.Tensor, bits: int, sym: bool = True,
               tau: float = 0.01) -> torch.Tensor:
    """D(k, k+1) for paired activations ``x`` (layer k) and ``y`` (layer k+1).

    ``x`` and ``y`` are ``[tokens, channels]`` of the same shape (quantization ranges are per
    token over the channels) or already-computed code coordinates via :func:`dependency_from_units`.
    """
    ux, lo, hi = code_units(x, bits, sym)
    uy, _, _ = code_units(y, bits, sym)
    return dependency_from_units(ux.reshape(-1), uy.reshape(-1), lo, hi, tau)


def dependency_from_units(ux: torch.Tensor, uy: torch.Tensor, lo: int, hi: int,
                          tau: float) -> torch.Tensor:
    return conditional_entropy(joint_distribution(soft_assign(ux, lo, hi, tau),
                                                  soft_assign(uy, lo, hi, tau)))


class PositionSampler:
    """The same random (token, channel) positions for every layer's activation.

    ``masks`` are the calibration batches' attention masks ``[B, T]`` (1 = real token); ``n``
    positions are drawn uniformly from the real tokens' channels with a seeded generator (without
    replacement up to 2**24 real positions, with replacement beyond), all of them when ``n`` is
    at least their number.
    """

    def __init__(self, masks: Sequence[torch.Tensor], channels: int, n: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        tokens = [m.reshape(-1).bool().cpu().nonzero().squeeze(1) for m in masks]
        counts = torch.tensor([len(t) for t in tokens])
        starts = torch.cumsum(counts, 0) - counts
        total = int(counts.sum()) * channels
        if n >= total:
            flat = torch.arange(total)
        elif total <= 2 ** 24:
            flat = torch.randperm(total, generator=gen)[:n]
        else:
            flat = torch.randint(total, (n,), generator=gen)
        flat = flat.sort().values
        token, channel = flat // channels, flat % channels
        batch = torch.searchsorted(starts, token, right=True) - 1
        self.index: list[torch.Tensor] = []
        for b, toks in enumerate(tokens):
            sel = batch == b
            self.index.append(toks[token[sel] - starts[b]] * channels + channel[sel])
        self.n = len(flat)

    def take(self, hidden: Sequence[torch.Tensor], bits: int, sym: bool) -> torch.Tensor:
        """Code coordinates of the sampled positions of one layer's hidden states (one per batch)."""
        out = []
        for h, idx in zip(hidden, self.index):
            u, _, _ = code_units(h, bits, sym)
            out.append(u.reshape(-1)[idx.to(u.device)])
        return torch.cat(out)


def level_range(bits: int, sym: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if sym else (0, 2 ** bits - 1)


H0_RULES = ("median", "mean", "absolute")


def check_h0(rule: str, value: float | None) -> None:
    """Raise ValueError unless (``rule``, ``value``) is a valid threshold choice: a rule of
    :data:`H0_RULES`, with a finite number for ``"absolute"`` and no number for the others."""
    if rule not in H0_RULES:
        raise ValueError(f"h0_rule must be one of {H0_RULES}, got {rule!r}")
    if rule == "absolute":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"h0_rule 'absolute' needs h0, a finite number of nats, got h0={value!r}")
    elif value is not None:
        raise ValueError(f"h0={value!r} is a fixed threshold: set h0_rule: absolute to use it "
                         f"(h0_rule {rule!r} derives h0 from the dependencies; leave h0 null)")


def resolve_h0(deps: Sequence[float], rule: str | float = "median", value: float | None = None) -> float:
    """The numeric threshold of Eq. 7 by ``rule`` (:data:`H0_RULES`): the median or the mean of
    ``deps``, or ``value`` for ``"absolute"``. A number as ``rule`` is a fixed threshold."""
    if not isinstance(rule, str):
        rule, value = "absolute", rule
    check_h0(rule, value)
    if rule == "absolute":
        return float(value)
    if not deps:
        return 0.0
    d = torch.tensor(list(deps), dtype=torch.float64)
    return float(d.median() if rule == "median" else d.mean())


def partition(deps: Sequence[float], h0: float, max_block: int = 3) -> list[list[int]]:
    """Blocks of consecutive layers (Eq. 6–7), greedy left to right.

    ``deps[k]`` is D(k, k+1) for ``n = len(deps) + 1`` layers. A block starting at ``k_r`` takes
    layer ``k_s`` while ``sum(deps[k_r:k_s]) > (k_s - k_r) * h0`` and it has room (``max_block``).
    """
    if max_block < 1:
        raise ValueError(f"max_block must be >= 1, got {max_block}")
    n = len(deps) + 1
    blocks: list[list[int]] = []
    start = 0
    while start < n:
        end = start  # inclusive
        while end + 1 < n and end + 1 - start < max_block:
            if sum(deps[start:end + 1]) > (end + 1 - start) * h0:
                end += 1
            else:
                break
        blocks.append(list(range(start, end + 1)))
        start = end + 1
    return blocks


@torch.no_grad()
def mine_dependencies(layers: Sequence[torch.nn.Module], calls: Sequence, masks: Sequence[torch.Tensor],
                      bits: int, sym: bool = True, tau: float = 0.01, n_samples: int = 65536,
                      seed: int = 0) -> list[float]:
    """D(k, k+1) for every pair of consecutive ``layers`` on the float model's activations.

    ``calls`` are the first layer's captured calls (one per calibration batch); the layers run in
    sequence, and each layer's output is sampled at the same positions (:class:`PositionSampler`).
    """
    from harness.models.capture import layer_output

    hidden = [c.hidden for c in calls]
    sampler = PositionSampler(masks, hidden[0].shape[-1], n_samples, seed)
    lo, hi = level_range(bits, sym)
    deps: list[float] = []
    prev = None
    for layer in layers:
        hidden = [layer_output(layer, c.with_hidden(h)) for c, h in zip(calls, hidden)]
        cur = soft_assign(sampler.take(hidden, bits, sym), lo, hi, tau)
        if prev is not None:
            deps.append(float(conditional_entropy(joint_distribution(prev, cur))))
        prev = cur
    return deps
