"""Result records: one JSON line per (model, method, scheme, task) cell in ``records.jsonl``.

Lines are appended with a single ``write`` on an ``O_APPEND`` descriptor and fsynced, so a run
killed at any moment leaves every finished record intact. A torn last line (the machine died or
the disk filled mid-write) is never glued to the next record: an append starts on a fresh line, a
short write is rolled back (``RecordWriteError``), and unreadable lines are reported on the console
(file and line) when read, and moved aside by ``set_aside_unreadable`` when a run starts
(docs/reliability.md). The key names below are a published contract (docs/design.md): add keys
freely, never rename.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import io
import json
import logging
import os
import platform
import subprocess
import time
import uuid
import zlib
from pathlib import Path
from typing import Any, Iterable

try:  # POSIX; elsewhere appends are not serialized
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

log = logging.getLogger("qvlm_bench")

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


class RecordWriteError(OSError):
    """A record could not be appended (full disk, read-only folder); the file is left as it was."""


def append_record(path: str | Path, record: dict) -> None:
    """Append one record as one line, fsynced. If the file ends in a torn line the record starts on
    a fresh one (never glued to it); a short or failed write is rolled back to the previous end
    and raised as ``RecordWriteError`` naming the file, so the file only ever gains whole lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, default=json_default, sort_keys=False) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        # the torn-line check, the write and a rollback are one step for every writer of the file
        # (threads of one process too: each open is its own lock holder); without it a concurrent
        # append could land between the check and the write (a spurious blank line) or be truncated
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        end = os.fstat(fd).st_size
        if end and os.pread(fd, 1, end - 1) != b"\n":
            line = b"\n" + line
        try:
            view = memoryview(line)
            while view:
                n = os.write(fd, view)
                if n <= 0:
                    raise OSError(28, "No space left on device (a write wrote nothing)")
                view = view[n:]
            os.fsync(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, end)
                os.fsync(fd)
            raise RecordWriteError(exc.errno, f"could not append a record to {path}: "
                                   f"{exc.strerror or exc}; the file was rolled back to its last complete "
                                   "record. Free space (or make the folder writable) and run again: "
                                   "finished cells are kept, this one is recomputed") from exc
    finally:
        os.close(fd)


def json_default(obj):
    """``json.dumps``'s ``default`` for records and samples: arrays and tensors as lists, paths and
    other objects as strings, sets and tuples as lists."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


_REPORTED: set[tuple] = set()


def _scan(path: Path) -> tuple[list[dict], list[tuple[int, str]]]:
    """(records, [(line number, text) of unreadable lines]) of a JSONL file."""
    records, bad = [], []
    for i, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        text = raw.decode("utf-8", errors="replace").strip()
        if not text:
            continue
        try:
            rec = json.loads(text)
        except json.JSONDecodeError:
            rec = None
        if isinstance(rec, dict):
            records.append(rec)
        else:
            bad.append((i, text))
    return records, bad


# A record's per-state parts (``method_meta``: a method's choices and reports; ``act_ranges``: the
# static ranges' search) may live in content-named gzip sidecars ``meta/<digest>.json.gz`` beside
# records.jsonl, each named by the record's ``<part>_file`` (``qvlm-bench compact-records``: the task
# cells of one quantization state share one copy). ``read_records`` puts them back, so every reader
# sees the record as it was written.
SIDECAR_FIELDS = {"method_meta": "method_meta_file", "act_ranges": "act_ranges_file"}
_PART_OF_FILE = {v: k for k, v in SIDECAR_FIELDS.items()}
META_DIR = "meta"
SIDECAR_SUFFIX = ".json.gz"


def _read_sidecar(folder: Path, rel: str, texts: dict[str, str | None]) -> str | None:
    if rel not in texts:
        path = folder / rel
        try:
            parts = Path(rel).parts
            if len(parts) != 2 or parts[0] != META_DIR or not rel.endswith(SIDECAR_SUFFIX):
                raise ValueError(f"{rel!r} is not a sidecar name ({META_DIR}/<digest>{SIDECAR_SUFFIX}): "
                                 "the record was edited")
            text = gzip.decompress(path.read_bytes()).decode()
            if content_digest(text) != parts[1][:-len(SIDECAR_SUFFIX)]:
                raise ValueError("its content does not match the digest in its name")
            texts[rel] = text
        except (OSError, ValueError, EOFError, zlib.error) as exc:
            texts[rel] = None
            key = (str(path.resolve()), "sidecar")
            if key not in _REPORTED:
                _REPORTED.add(key)
                log.warning("%s (a part of records in %s) cannot be read (%s): those records are read "
                            "without it; restore the file from the repository or re-run their cells",
                            path, folder, exc)
    return texts[rel]


def _resolve_sidecars(folder: Path, records: list[dict]) -> None:
    texts: dict[str, str | None] = {}
    for rec in records:
        back = {f: _read_sidecar(folder, rec[f], texts)
                for f in _PART_OF_FILE if isinstance(rec.get(f), str)}
        if not any(t is not None for t in back.values()):
            continue
        items = [(_PART_OF_FILE[k], json.loads(back[k])) if back.get(k) is not None else (k, v)  # in its place
                 for k, v in rec.items()]
        rec.clear()
        rec.update(items)


def read_records(path: str | Path) -> list[dict]:
    """All readable records in file order, the parts kept in sidecars put back (``SIDECAR_FIELDS``). Unreadable
    lines (a torn write) are skipped and reported once per process on the console, naming the file
    and line: a skipped line is a cell whose result will be recomputed, and the user should know why."""
    path = Path(path)
    if not path.exists():
        return []
    records, bad = _scan(path)
    for lineno, text in bad:
        key = (str(path.resolve()), lineno, hashlib.sha1(text.encode()).hexdigest())
        if key not in _REPORTED:
            _REPORTED.add(key)
            log.warning("%s line %d is not a complete record (a write cut short by a crash or a full "
                        "disk?): skipped, its cell is recomputed by the next run: %.80s", path, lineno, text)
    _resolve_sidecars(path.parent, records)
    return records


def set_aside_unreadable(path: str | Path) -> list[int]:
    """Move the unreadable lines of ``path`` to ``<path>.unreadable`` (kept, never deleted) and
    rewrite ``path`` atomically without them; returns their line numbers. Run by the driver that
    holds the results folder's lock, before its first append."""
    path = Path(path)
    if not path.exists():
        return []
    records, bad = _scan(path)
    if not bad:
        return []
    aside = path.with_name(path.name + ".unreadable")
    with open(aside, "a") as f:
        for lineno, text in bad:
            f.write(f"{path.name}:{lineno}: {text}\n")
        f.flush()
        os.fsync(f.fileno())
    write_jsonl(path, records)
    log.warning("%s: moved %d unreadable line(s) (line %s) to %s; their cells are recomputed", path,
                len(bad), ", ".join(str(n) for n, _ in bad), aside)
    return [n for n, _ in bad]


def temp_name(path: Path) -> Path:
    """A hidden temporary name beside ``path``, unique to this process and call: two writers of one
    file never share a temporary. ``clean_stale_temps`` recognizes it."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")


def is_reference(rec: dict) -> bool:
    """Whether a record (accuracy or perf) is its model's float reference row: the ``reference``
    key the engine writes (the registry's flag, ``Method.reference``), or for records written
    before that key, the registry's flag of the record's method (a method no longer registered is
    not the reference)."""
    if rec.get("reference") is not None:
        return bool(rec["reference"])
    from .registry import available_methods

    cls = available_methods().get(rec.get("method"))
    return bool(cls is not None and cls.reference)


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write a whole file through a temporary name and ``os.replace``: a reader (or a crash) sees
    the old file or the new one, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with tmp.open("xb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # never mask the write's own error
            tmp.unlink(missing_ok=True)
        raise
    return path


def write_shared_atomic(path: str | Path, data: bytes) -> Path:
    """``write_atomic`` unless the file already holds these bytes: a content-named file (shared
    prompts, a perf record's detail) that writers may reach at once is never rewritten in place."""
    path = Path(path)
    try:
        if path.read_bytes() == data:
            return path
    except OSError:
        pass
    return write_atomic(path, data)


def content_digest(text: str) -> str:
    """16 hex digits of the sha256 of ``text``: the name of a content-named sidecar (per-state record
    parts, perf detail), checked against the content when it is read."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def deterministic_gzip(text: str) -> bytes:
    """``text`` gzipped with level 9, no mtime and no file name: the same text gives the same bytes
    (with the same zlib). The compact sidecars (per-question samples, perf detail) are written so."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as f:
        f.write(text.encode())
    return buf.getvalue()


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """Write a whole JSONL file atomically (records.jsonl without its unreadable lines; per-sample
    logs have a format of their own, harness/samples.py), through ``write_atomic``: its
    temporary file has a name of its own, so two processes writing the same file (two drivers on
    one results folder) cannot interleave: the last complete write wins."""
    write_atomic(path, "".join(json.dumps(row, default=json_default) + "\n" for row in rows))


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
