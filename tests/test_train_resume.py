"""scripts/train_tiny_llava.py: a run split by --stop-at / --resume equals one uninterrupted run.

The bundled model is trained on a lent GPU whose calls last at most ten minutes, so a longer
schedule runs as several calls; this checks (on CPU, a few steps of the real model at batch 8)
that resuming restores weights, optimizer, sampler and schedule exactly.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def train():
    spec = importlib.util.spec_from_file_location("train_tiny_llava", REPO / "scripts" / "train_tiny_llava.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def data(train, tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    train.main(["prepare", "--data", str(d), "--per-task", "12", "--sqa-rows", "12", "--chunk", "6",
                "--workers", "1", "--relation-rows", "12"])
    return d


def test_relations_drill_rows_are_two_object_questions(data):
    """The drill source: alternately ScienceQA's relation question (an option letter) and a
    VQAv2-style two-object question (an open answer), all in the training data."""
    text = json.loads((data / "text.json").read_text())
    rows = [(p, a) for p, a, t in zip(text["prompts"], text["answers"], text["tasks"]) if t == "relations"]
    assert len(rows) == 12
    for k, (prompt, answer) in enumerate(rows):
        if k % 2 == 0:
            assert re.search(r"Where is the [\w ]+ compared to the ", prompt) and answer in ("A", "B", "C"), prompt
        else:
            assert re.search(r"left or right of|above or below|to the (left|right) of|(above|below) the|bigger than",
                             prompt), prompt
            assert answer in ("left", "right", "above", "below", "yes", "no")


def _digest(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def test_resumed_run_equals_uninterrupted_run(train, data, tmp_path):
    common = ["train", "--data", str(data), "--steps", "5", "--batch", "8", "--warmup", "2", "--no-eval",
              "--log-every", "1"]
    train.main(common + ["--out", str(tmp_path / "whole")])
    train.main(common + ["--out", str(tmp_path / "split"), "--stop-at", "2"])
    stopped = json.loads((tmp_path / "split" / "training_info.json").read_text())
    assert stopped["stopped_at"] == 2 and _digest(tmp_path / "split") != _digest(tmp_path / "whole")
    train.main(common + ["--out", str(tmp_path / "split"), "--resume"])
    assert _digest(tmp_path / "split") == _digest(tmp_path / "whole")
    info = json.loads((tmp_path / "split" / "training_info.json").read_text())
    assert info["stopped_at"] is None and [(c["from"], c["to"]) for c in info["calls"]] == [(0, 2), (2, 5)]


def test_resume_without_a_saved_run_names_the_fix(train, data, tmp_path):
    with pytest.raises(SystemExit, match="run without --resume"):
        train.main(["train", "--data", str(data), "--out", str(tmp_path / "none"), "--resume", "--no-eval"])
