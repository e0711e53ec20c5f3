"""Synthetic visual-QA tasks mirroring ScienceQA-IMG, VizWiz-VQA and VQAv2 (issue 4).

Generated procedurally from a seed: no files are needed at run time. Rows carry exactly the
columns of the real datasets, so the real tasks' prompt builders and scorers apply unchanged.

    from tasks.synth import load_split
    rows = load_split("synth_vqav2", "test")          # list of dicts, "image" a PIL image

Splits are cached after the first generation as parquet under
``$QVLM_BENCH_CACHE/synth/v<VERSION>/`` (default ``~/.cache/qvlm-bench``) and in process memory.
This module imports only numpy and Pillow (pandas/pyarrow for the disk cache, when installed).
"""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

from .generators import COLUMNS, ROW_FNS, canonical_answer  # noqa: F401

SYNTH_VERSION = "4"  # bump whenever generated rows change (3 was a reverted trial)
DEFAULT_SEED = 1234
TASKS = tuple(ROW_FNS)
SPLITS = ("train", "validation", "test")
# Evaluation splits are small so that the default suite stays fast on a laptop CPU.
# The train split as the lm-eval tasks serve it: what calibration samples from (32 rows by default).
# Row i is the same whatever the size, so training uses more (scripts/train_tiny_llava.py). 2,000
# rather than 20,000: lm-eval's Task reads every row (decoding its image) when it loads a split, and
# a fresh clone generates and caches the split first, ~50 s of a 5-minute default suite.
SPLIT_SIZES = {"train": 2_000, "validation": 150, "test": 150}

# Prompts of the real protocols (docs/protocols.md): LLaVA-1.5's single-pred ScienceQA prompt, and the
# LLaVA VizWiz / VQAv2 short-answer prompts.
SQA_INSTRUCTION = "Answer with the option's letter from the given choices directly."
VIZWIZ_INSTRUCTION = ("When the provided information is insufficient, respond with 'Unanswerable'.\n"
                      "Answer the question using a single word or phrase.")
VQA_INSTRUCTION = "Answer the question using a single word or phrase."

_MEMO: dict[tuple, list[dict]] = {}
_LOCK = threading.Lock()


def prompt_text(task: str, row: dict) -> str:
    """The user prompt (without the image placeholder) exactly as the real protocol builds it."""
    if task == "synth_scienceqa":
        parts = []
        if row["hint"]:
            parts.append(f"Context: {row['hint']}\n")
        parts.append(f"{row['question']}\n")
        parts.append("\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(row["choices"])))
        parts.append(f"\n{SQA_INSTRUCTION}")
        return "".join(parts)
    if task == "synth_vizwiz":
        return f"{row['question']}\n{VIZWIZ_INSTRUCTION}"
    if task == "synth_vqav2":
        return f"{row['question']}\n{VQA_INSTRUCTION}"
    raise KeyError(f"unknown synthetic task {task!r}; valid: {', '.join(TASKS)}")


def generate_rows(task: str, split: str, n: int | None = None, seed: int = DEFAULT_SEED,
                  start: int = 0) -> list[dict]:
    """Rows ``start .. start+n-1`` of a split, freshly generated (no cache)."""
    if task not in ROW_FNS:
        raise KeyError(f"unknown synthetic task {task!r}; valid: {', '.join(TASKS)}")
    if split not in SPLITS:
        raise KeyError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    n = SPLIT_SIZES[split] if n is None else int(n)
    fn = ROW_FNS[task]
    return [fn(seed, split, i) for i in range(start, start + n)]


def cache_dir() -> Path:
    root = os.environ.get("QVLM_BENCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qvlm-bench")
    return Path(root) / "synth" / f"v{SYNTH_VERSION}"


def load_split(task: str, split: str, n: int | None = None, seed: int = DEFAULT_SEED,
               cache: bool = True) -> list[dict]:
    """A split as a list of row dicts (images decoded), generated once and then cached."""
    n = SPLIT_SIZES[split] if n is None else int(n)
    key = (task, split, n, seed)
    with _LOCK:
        if key in _MEMO:
            return _MEMO[key]
    rows = None
    path = _cache_path(task, split, n, seed)
    if cache and path.is_file():
        try:
            rows = _read_parquet(path)
        except Exception:  # corrupt or unreadable cache: regenerate
            rows = None
    if rows is None:
        rows = generate_rows(task, split, n, seed)
        if cache:
            try:
                _write_parquet(rows, path)
            except ImportError:  # no pandas/pyarrow: memory cache only
                pass
    with _LOCK:
        _MEMO[key] = rows
    return rows


def _cache_path(task: str, split: str, n: int, seed: int) -> Path:
    return cache_dir() / f"{task}-{split}-seed{seed}-n{n}.parquet"


def split_parquet(task: str, split: str, n: int | None = None, seed: int = DEFAULT_SEED) -> Path | None:
    """The cache file of a split (generated and written first if missing); None if it can't be written."""
    n = SPLIT_SIZES[split] if n is None else int(n)
    path = _cache_path(task, split, n, seed)
    if not path.is_file():
        load_split(task, split, n=n, seed=seed)
    return path if path.is_file() else None


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def rows_to_records(rows: list[dict]) -> list[dict]:
    """Rows with the image as {"bytes", "path"} (the HF datasets Image encoding)."""
    return [{**r, "image": {"bytes": _png(r["image"]), "path": None}} for r in rows]


def _write_parquet(rows: list[dict], path: Path) -> None:
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")
    pd.DataFrame(rows_to_records(rows)).to_parquet(tmp, index=False)
    os.replace(tmp, path)  # atomic: concurrent readers see the old file or the whole new one


def _read_parquet(path: Path) -> list[dict]:
    import pandas as pd
    from PIL import Image

    df = pd.read_parquet(path)
    rows = []
    for rec in df.to_dict("records"):
        rec = {k: _plain(v) for k, v in rec.items()}
        img = Image.open(io.BytesIO(rec["image"]["bytes"]))
        img.load()
        rec["image"] = img.convert("RGB")
        rows.append(rec)
    return rows


def _plain(v):
    """numpy arrays / numpy scalars from parquet back to Python lists / scalars."""
    import numpy as np

    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()]
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, np.generic):
        return v.item()
    return v
