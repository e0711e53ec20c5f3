"""Synthetic results folders for the leaderboard tests: records plus per-question sample files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from harness.quant.config import parse_scheme


def record(method, scheme, task, scores=None, *, variant=None, reference=None, seed=0, samples_file=None,
           value=None, stderr=None, status="ok", **extra) -> dict:
    scores = None if scores is None else np.asarray(scores, float)
    if value is None and scores is not None:
        value = 100 * scores.mean()
    if stderr is None and scores is not None:
        stderr = 100 * scores.std(ddof=1) / np.sqrt(len(scores))
    q = parse_scheme(scheme)
    rec = {"suite": "synthetic", "model": "m", "method": method, "scheme": scheme, "task": task,
           "metric": "accuracy", "value": value if status == "ok" else None, "stderr": stderr,
           "n": None if scores is None else len(scores), "status": status, "device": "cpu (1 threads)",
           "kernel": "fp32" if scheme == "w16a16" else "simulated", "seed": seed,
           "quant_config": {"w_bits": q.w_bits, "a_bits": q.a_bits}, "git": {"commit": "abcdef1234567890" * 2 + "abcdefgh", "dirty": False},
           "calibration": {"split": "train", "n": 32, "seed": seed, "task": task, "data_version": "v1"},
           "versions": {"torch": "2.x"}, "timestamp": "2026-01-02T03:04:05+0000",
           "error": "boom" if status == "failed" else None, "samples_file": samples_file}
    if variant is not None:
        rec["variant"] = variant
    if reference is not None:
        rec["reference"] = reference
    rec.update(extra)
    return rec


def write_run(folder: Path, cells: dict[tuple, np.ndarray], seed: int = 0, with_samples: bool = True,
              keys: dict[tuple, dict] | None = None, extra_records: list[dict] = (),
              clusters: dict[str, list] | None = None) -> Path:
    """cells[(method, scheme, task)] or cells[(method, variant, scheme, task)]: per-question scores.

    ``clusters[task]``: each question's image id, logged in the samples as the harness does
    (``cluster``), and the task's records declare ``cluster_unit: image``."""
    folder.mkdir(parents=True, exist_ok=True)
    recs = []
    for j, (key, scores) in enumerate(cells.items()):
        method, variant, scheme, task = key if len(key) == 4 else (key[0], None, key[1], key[2])
        rel = None
        if with_samples:
            rel = f"samples/{j}-{method}-{scheme}-{task}.jsonl"
            (folder / "samples").mkdir(exist_ok=True)
            img = (clusters or {}).get(task)
            (folder / rel).write_text("".join(json.dumps({"doc_id": i, "score": float(s)}
                                                         | ({"cluster": img[i]} if img is not None else {})) + "\n"
                                              for i, s in enumerate(scores)))
        unit = {"cluster_unit": "image"} if task in (clusters or {}) else {}
        lever = {"clip": True} if variant and variant.endswith("+clip") else {}  # as the harness records it
        recs.append(record(method, scheme, task, scores, variant=variant, seed=seed, samples_file=rel,
                           **unit, **lever, **((keys or {}).get(key, {}))))
    recs += list(extra_records)
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return folder


def scores(n: int, correct: int, seed: int = 0) -> np.ndarray:
    x = np.zeros(n)
    x[:correct] = 1.0
    return np.random.default_rng(seed).permutation(x)
