"""The clipping-percentile grid and the order statistics every clipping search reads.

One definition for the engine's layer-wise search (``harness.quant.ranges``) and Q-VLM's joint
search (``methods.qvlm.search``), so a row's "percentile 0.99" means the same tensor entry in
both: the order statistic at index ``round(p * (n - 1))`` of the ascending order.
"""

from __future__ import annotations

from typing import Sequence

import torch

PERCENTILE_GRID = (1.0, 0.995, 0.99, 0.985, 0.98)  # Q-VLM paper: 1.0 down to 0.98 by 0.005


def quantile_index(n: int, p: float) -> int:
    """Index of the ``p`` order statistic among ``n`` ascending values."""
    return min(n - 1, max(0, int(round(p * (n - 1)))))


def upper_quantiles(x: torch.Tensor, grid: Sequence[float]) -> tuple[torch.Tensor, dict[float, torch.Tensor]]:
    """``(max, {p: q_p})`` of ``x`` along the last dim (kept), for percentiles near 1.

    ``topk`` of the few largest values instead of a full sort (the grid stays near 1).
    """
    n = x.shape[-1]
    idx = {p: quantile_index(n, p) for p in grid}
    k = n - min(idx.values())
    top = x.topk(k, dim=-1).values  # descending
    return top[..., :1], {p: top[..., n - 1 - i:n - i] for p, i in idx.items()}


def clip_ratios(absx: torch.Tensor, grid: Sequence[float]) -> dict[float, torch.Tensor]:
    """``q_p(|x|) / max|x|`` along the last dim (kept; exactly 1 at ``p >= 1``)."""
    mx, q = upper_quantiles(absx, grid)
    mx = mx.clamp_min(1e-12)
    return {p: torch.ones_like(mx) if p >= 1.0 else q[p] / mx for p in grid}


def unclipped_first(grid: Sequence[float]) -> tuple[float, ...]:
    """The grid without repeats and with 1.0 first: the unclipped candidate wins near-ties."""
    grid = tuple(dict.fromkeys(float(p) for p in grid))
    return (1.0,) + tuple(p for p in grid if p != 1.0)
