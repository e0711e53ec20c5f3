"""The associative-recall probe builds the data its model-card results describe."""

from __future__ import annotations

from pathlib import Path

import pytest
from script_helpers import load_script

REPO = Path(__file__).resolve().parents[1]


def _script(name: str):
    return load_script(name)


@pytest.mark.parametrize("layout,offset", [("kv", 1), ("after2", 2), ("after3", 3), ("before3", -3)])
def test_associative_recall_places_each_value_at_its_offset(layout, offset):
    import torch

    ar = _script("probe_associative_recall")
    x, y = ar.batch(200, layout, torch.Generator().manual_seed(0))
    for row, value in zip(x.tolist(), y.tolist()):
        query = row[-3]
        body = row[:-4]
        assert body.count(query) == 1  # keys are distinct within a row
        assert body[body.index(query) + offset] == value
        assert len(set(body) & set(ar.VALUES)) >= 1 and query in ar.KEYS
