"""Choosing among nearly equal candidates the same way on every machine.

Searches (clipping percentiles, AWQ's α, block-wise coordinates) pick an argmin over errors that
are often nearly equal. Two machines compute those errors with different rounding (other SIMD
paths, thread counts), so a plain ``<`` can pick different candidates on each. The rule here: a
candidate replaces the current best only when it is better by more than a relative tolerance,
and among near-ties the one listed first wins. Candidates should therefore be listed in order
of preference (e.g. the unclipped range first).
"""

from __future__ import annotations

import math
from typing import Iterable

# Relative margin a later candidate must win by. Errors computed in float64 (the CPU default)
# differ between machines by ~1e-15 relative; float32 by ~1e-6. 1e-6 keeps real improvements
# (searches here resolve differences of 1e-3 and more) and absorbs float64 noise entirely.
RTOL = 1e-6


def improves(candidate: float, best: float, rtol: float = RTOL) -> bool:
    """Whether ``candidate`` beats ``best`` by more than ``rtol`` of ``best`` (errors ≥ 0)."""
    if math.isnan(candidate):
        return False
    if math.isnan(best) or math.isinf(best):
        return not math.isinf(candidate) or candidate < best
    return candidate < best - rtol * abs(best)


def stable_argmin(values: Iterable[float], rtol: float = RTOL) -> int:
    """Index of the first value within ``rtol`` of the minimum: earlier candidates win near-ties.

    Unlike a running comparison, the result does not depend on the order in which small
    improvements accumulate: it is the earliest candidate that is as good as the best one.
    """
    vals = [float(v) for v in values]
    finite = [v for v in vals if not math.isnan(v)]
    if not finite:
        raise ValueError("stable_argmin needs at least one value that is not NaN")
    best = min(finite)
    bound = best + rtol * abs(best)
    return next(i for i, v in enumerate(vals) if not math.isnan(v) and v <= bound)
