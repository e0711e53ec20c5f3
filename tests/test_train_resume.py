"""scripts/train_tiny_llava.py: a run split by --stop-at / --resume equals one uninterrupted run.

The bundled model is trained on a lent GPU whose calls last at most ten minutes, so a longer
schedule runs as several calls; this checks (on CPU, a few steps of the real model at batch 8)
that resuming restores weights, optimizer, sampler and schedule exactly.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from script_helpers import load_script

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def train():
    return load_script("train_tiny_llava")


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


def test_resume_with_other_arguments_is_refused(train, data, tmp_path):
    """A resumed call checks that it continues the same run (arguments and data)."""
    common = ["train", "--data", str(data), "--steps", "3", "--batch", "4", "--warmup", "2", "--no-eval"]
    train.main(common + ["--out", str(tmp_path / "r"), "--stop-at", "1"])
    with pytest.raises(SystemExit, match=r"--lr 0\.002 there, 0\.001 now"):
        train.main(common + ["--out", str(tmp_path / "r"), "--resume", "--lr", "1e-3"])


# ---- scripts/device_train.sh across fresh machines: the state travels through $OUT and STATE_IN ----

TOY_PREP = "--per-task 12 --sqa-rows 12 --chunk 6 --relation-rows 12"
TOY_RUN = "T:--spec base --steps 4 --batch 4 --warmup 2 --no-eval --log-every 1"


def _device_call(tmp_path: Path, machine: str, run: str, state_in: Path | None = None):
    """One call of scripts/device_train.sh on a 'fresh machine' (its own STATE folder and $OUT)."""
    import os
    import subprocess
    import sys

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if not (bin_dir / "python").exists():  # the script calls `python`, as on the device
        (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        (bin_dir / "python").chmod(0o755)
    out = tmp_path / f"out-{machine}"
    out.mkdir()
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", OUT=str(out),
               STATE=str(tmp_path / f"machine-{machine}"), WORKERS="1", PREP_ARGS=TOY_PREP,
               MAX="100000", RESERVE="0", THREADS="1")
    if state_in is not None:
        env["STATE_IN"] = str(state_in)
    p = subprocess.run(["bash", str(REPO / "scripts" / "device_train.sh"), run], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    return p, out


def _fp32_state(path: Path) -> dict:
    import torch

    st = torch.load(path, map_location="cpu", weights_only=False)
    flat = {f"model.{k}": v for k, v in st["model"].items()} | {f"aux.{k}": v for k, v in st["aux"].items()}
    for i, s in st["opt"]["state"].items():
        flat |= {f"opt.{i}.{k}": v for k, v in s.items()}
    flat["gen"] = st["gen"]
    return flat


def test_device_calls_resume_bit_exact_from_a_carried_state(train, tmp_path):
    """Call 1 stops at step 2 on one machine; its state comes back in $OUT, is copied into another
    folder (the repository's .train-state/) and carried into call 2 on a fresh machine (new /tmp,
    data prepared again), which finishes the schedule: the fp32 weights, AdamW moments and sampler,
    and the saved fp16 model, equal those of one uninterrupted run."""
    import shutil

    import torch

    p1, out1 = _device_call(tmp_path, "a", TOY_RUN + " --stop-at 2")
    assert p1.returncode == 0, p1.stdout + p1.stderr
    pieces = sorted(f.name for f in out1.iterdir() if f.name.startswith("s-T."))
    # the base spec's state (52 MB, ~44 MB packed) comes back in 15 MiB pieces (at most 16 MiB a file)
    assert pieces[0] == "s-T.pack.aa" and pieces[1:] == ["s-T.pack.ab", "s-T.pack.ac", "s-T.sha256"]
    assert all((out1 / n).stat().st_size <= 15 * 2**20 for n in pieces)
    assert "state at step 2" in p1.stdout
    carried = tmp_path / "repo" / ".train-state"
    carried.mkdir(parents=True)
    for name in pieces:
        shutil.copy(out1 / name, carried / name)

    p2, out2 = _device_call(tmp_path, "b", TOY_RUN, state_in=carried)
    assert p2.returncode == 0, p2.stdout + p2.stderr
    assert "carried state at step 2 unpacked" in p2.stdout
    assert not any(f.name.startswith("s-T.") for f in out2.iterdir())  # finished: no state comes back
    assert any(f.name.startswith("m-T.tgz.") for f in out2.iterdir())

    whole = tmp_path / "whole"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the calls (THREADS=1): CPU reductions depend on the thread count
    try:
        train.main(["train", "--data", str(tmp_path / "machine-a" / "data"), "--out", str(whole)]
                   + TOY_RUN.split(":", 1)[1].split())
    finally:
        torch.set_num_threads(threads)
    split_run = tmp_path / "machine-b" / "runs" / "T"
    a, b = _fp32_state(whole / train.STATE_FILE), _fp32_state(split_run / train.STATE_FILE)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert _digest(split_run) == _digest(whole)
    info = json.loads((split_run / "training_info.json").read_text())
    assert [(c["from"], c["to"]) for c in info["calls"]] == [(0, 2), (2, 4)]


def test_device_call_refuses_a_stale_or_partial_carried_state(tmp_path):
    carried = tmp_path / ".train-state"
    carried.mkdir()
    (carried / "s-T.pack.aa").write_bytes(b"not the state")
    (carried / "s-T.sha256").write_text("0" * 64 + "  -\n")
    p, _ = _device_call(tmp_path, "c", TOY_RUN, state_in=carried)
    assert p.returncode == 1 and "do not match s-T.sha256" in p.stdout, p.stdout + p.stderr


def test_pack_state_is_lossless(train, tmp_path):
    """pack-state / unpack-state give back every tensor bit for bit (dtype, shape, NaN payloads),
    the containers' types (state_dict's OrderedDict with its _metadata, tuples) and plain values."""
    from collections import OrderedDict

    import torch

    sd = OrderedDict(w=torch.randn(5, 3), b=torch.tensor(float("nan")), e=torch.zeros(0, 4))
    sd._metadata = OrderedDict({"": {"version": 1}})
    st = {"model": sd, "opt": {"state": {0: {"step": torch.tensor(7.0), "exp_avg": torch.randn(3).double()}},
                               "param_groups": [{"betas": (0.9, 0.98), "lr": 2e-3, "params": [0]}]},
          "gen": torch.randint(0, 255, (16,), dtype=torch.uint8), "h": torch.randn(4).to(torch.bfloat16),
          "i": torch.arange(3), "step": 2, "ema": None, "calls": [{"from": 0, "to": 2}]}
    torch.save(st, tmp_path / "s.pt")
    train.main(["pack-state", "--state", str(tmp_path / "s.pt"), "--packed", str(tmp_path / "s.pack")])
    train.main(["unpack-state", "--state", str(tmp_path / "back.pt"), "--packed", str(tmp_path / "s.pack")])
    back = torch.load(tmp_path / "back.pt", weights_only=False)

    def same(x, y):
        assert type(x) is type(y) and getattr(x, "__dict__", None) == getattr(y, "__dict__", None)
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.shape == y.shape
            assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))
        elif isinstance(x, dict):
            assert list(x) == list(y)
            for k in x:
                same(x[k], y[k])
        elif isinstance(x, (list, tuple)):
            assert len(x) == len(y)
            for u, v in zip(x, y):
                same(u, v)
        else:
            assert x == y
    same(st, back)
    with pytest.raises(SystemExit, match="not a packed training state"):
        train.main(["unpack-state", "--state", str(tmp_path / "x.pt"), "--packed", str(tmp_path / "s.pt")])
