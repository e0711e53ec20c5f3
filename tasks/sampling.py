"""Seeded, stratified row sampling: which rows of a split a subset holds.

Below ``sources.py`` (the Hub or a local copy), ``subset.py`` (a parquet subset that reads the
chosen rows' images only) and the synthetic tasks, which all draw the same rows with it.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any


def stratified_indices(labels: list[Any], size: int, seed: int) -> list[int]:
    """Seeded sample of `size` row indices, proportional per label (largest-remainder rounding).

    Deterministic for a given (labels, size, seed); returned sorted so rows keep split order.
    """
    groups: dict[Any, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        groups[label].append(i)
    total = len(labels)
    if size >= total:
        return list(range(total))
    keys = sorted(groups, key=str)
    quotas = {k: size * len(groups[k]) / total for k in keys}
    alloc = {k: int(quotas[k]) for k in keys}
    short = size - sum(alloc.values())
    for k in sorted(keys, key=lambda k: (-(quotas[k] - alloc[k]), str(k)))[:short]:
        alloc[k] += 1
    rng = random.Random(seed)
    chosen = [i for k in keys for i in rng.sample(groups[k], alloc[k])]
    return sorted(chosen)
