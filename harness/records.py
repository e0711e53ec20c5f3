"""Result records: one JSON line per (model, method, scheme, task) cell in ``records.jsonl``.

Lines are appended with a single ``write`` on an ``O_APPEND`` descriptor and fsynced, so a run
killed at any moment leaves every finished record intact; a torn last line (if the machine died
mid-write) is skipped on reading. The key names below are a published contract (docs/design.md):
add keys freely, never rename.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable

RECORD_KEYS = (
    "suite", "model", "method", "scheme", "quant_config", "task", "metric", "value", "stderr",
    "n", "n_empty", "n_unparsed", "latency", "memory", "kernel", "quantize_s", "eval_s",
    "device", "seed", "versions", "git", "config_hash", "status", "error", "proof",
)


def new_record(**fields: Any) -> dict:
    """A record with every contract key present (None where unknown) plus any extra keys."""
    rec = {k: None for k in RECORD_KEYS}
    rec.update(fields)
    rec.setdefault("timestamp", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    return rec


def append_record(path: str | Path, record: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, default=_json_default, sort_keys=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_default(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


def read_records(path: str | Path) -> list[dict]:
    """All complete records in file order (a torn trailing line is ignored)."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """Write a whole JSONL file atomically (per-sample logs). The temporary file has a name of its
    own, so two processes writing the same file (two drivers on one results folder) cannot
    interleave: the last complete write wins."""
    import uuid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with tmp.open("x") as f:
            for row in rows:
                f.write(json.dumps(row, default=_json_default) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@functools.lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("qvlm-bench", "torch", "transformers", "lm_eval", "datasets"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


@functools.lru_cache(maxsize=1)
def git_describe() -> dict[str, Any] | None:
    """The commit the code ran at, and whether the tracked tree was dirty.

    ``QVLM_GIT_COMMIT`` in the environment wins, with ``dirty`` unknown: a copy of the tree made
    for another machine (the GPU's) may carry no history, or stale history that names an older
    commit (seen: the device copy reported the session's first commit, "dirty", for later code).
    """
    env = os.environ.get("QVLM_GIT_COMMIT") or None
    if env:
        return {"commit": env, "dirty": None}
    repo = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                                text=True, timeout=5).stdout.strip()
        if len(commit) != 40:  # no history: git answers "HEAD" or nothing
            return None
        # results/ is output, not code: regenerating it (`rm -rf results/default`) must not mark
        # the records it writes as coming from a dirty tree
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)results"], cwd=repo,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(dirty)}
