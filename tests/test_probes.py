"""The look-up probe scripts build the data their model-card results describe."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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


def test_context_probe_family_rows_are_context_questions():
    probe = _script("probe_context_lookup")
    rows = probe.family_rows(60, seed=3, workers=1)
    assert rows == probe.family_rows(60, seed=3, workers=1)  # deterministic in the seed
    assert {r["skill"] for r in rows} == {"context_labels", "context_owner", "context_material"}
    for r in rows:
        answer = r["choices"][r["answer"]]
        assert re.search(rf"\b{answer}\b", r["hint"]), r  # stated in the hint
    owner = probe.family_rows(30, seed=3, workers=1, families=("owner",))
    assert {r["skill"] for r in owner} == {"context_owner"}
