"""Per-question sample logs: one gzip file per (cell, task), the prompts stored once per task.

A results folder's ``samples/`` holds (format 1)::

    <cellkey>-<task>.jsonl.gz            one cell's rows, one per question
    prompts-<task>-<digest>.jsonl.gz     the prompts of those questions, by doc_id

A cell file's first line is a header, ``{"samples_format": 1, "prompts":
"prompts-<task>-<digest>.jsonl.gz"}`` (the name is relative to the cell file's folder), then
one JSON line per question as the evaluation logged it (``harness.evaluate.sample_rows``) less
its ``prompt``: ``{"doc_id", "generation", <the task's fields: "question_id", "parsed">,
"score", "cluster"}``. A prompts file's first line is ``{"samples_format": 1, "task": ...,
"digest": ...}``, then ``{"doc_id": ..., "prompt": ...}`` per question in doc_id order. The
digest (16 hex digits of the sha256 of the JSON list of ``[doc_id, prompt]`` pairs in that order)
names the file: every cell that saw the same prompts shares one file, cells that saw others
(another model family's prompt format) get another, and the reader checks it.

Rows that cannot be split exactly (``doc_id`` not the first key and ``prompt`` the second, a
doc_id that is not an int or a string, one doc_id with two prompts) are kept whole: the header
says ``"prompts": null``. ``read_samples`` returns the rows as they were written, key order
included, and still reads the plain ``<cellkey>-<task>.jsonl`` files of older runs (no header,
the prompt on every line); ``qvlm-bench compact-samples`` rewrites those (``compact_samples``).

Writes are atomic (``records.write_atomic``; the prompts file before the cell file that points
to it) and deterministic: gzip with mtime 0 and no file name, JSON as ``json.dumps`` writes it,
so the same rows give the same bytes (with the same zlib).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import zlib
from pathlib import Path
from typing import Any, Iterable, Sequence

from .records import deterministic_gzip as _gzip
from .records import json_default, read_records, write_atomic, write_shared_atomic

FORMAT = 1
SUFFIX = ".jsonl.gz"
PLAIN_SUFFIX = ".jsonl"  # written before format 1: the prompt on every line
PROMPTS_PREFIX = "prompts-"
HEADER_KEY = "samples_format"
SAMPLES_DIR = "samples"


class SamplesError(ValueError):
    """A samples file (or the prompts file it points to) cannot be read; the message names the
    file and the fix."""


def samples_path(folder: str | Path, key: str, task: str) -> Path:
    """Where a cell's rows for ``task`` go in the results folder ``folder``."""
    return Path(folder) / SAMPLES_DIR / f"{key}-{task}{SUFFIX}"


def _dumps(obj: Any) -> str:
    return json.dumps(obj, default=json_default)


def _doc_order(doc_id: int | str) -> tuple:
    return (isinstance(doc_id, str), doc_id)


def _split(rows: Sequence[dict]) -> dict | None:
    """``{doc_id: prompt}`` when every row can give its prompt away exactly, else None."""
    prompts: dict = {}
    for row in rows:
        keys = list(row)[:2] if isinstance(row, dict) else []
        if keys != ["doc_id", "prompt"]:
            return None
        doc_id = row["doc_id"]
        if isinstance(doc_id, bool) or not isinstance(doc_id, (int, str)):
            return None
        if _dumps(prompts.setdefault(doc_id, row["prompt"])) != _dumps(row["prompt"]):
            return None
    return prompts if rows else None


def _pairs(prompts: dict) -> list[list]:
    return [[d, prompts[d]] for d in sorted(prompts, key=_doc_order)]


def prompts_digest(prompts: dict) -> str:
    """The digest naming a prompts file: 16 hex digits of sha256 over ``[[doc_id, prompt], ...]``
    in doc_id order (ints first, then strings)."""
    return hashlib.sha256(_dumps(_pairs(prompts)).encode()).hexdigest()[:16]


def prompts_name(task: str, digest: str) -> str:
    return f"{PROMPTS_PREFIX}{task}-{digest}{SUFFIX}"


def encode_samples(rows: Iterable[dict], task: str) -> tuple[bytes, tuple[str, bytes] | None]:
    """The bytes of a cell file for ``rows`` and, when the prompts are split off, the (name,
    bytes) of the prompts file it points to. Pure: writes nothing."""
    rows = list(rows)
    prompts = _split(rows)
    shared = None
    if prompts is not None:
        digest = prompts_digest(prompts)
        name = prompts_name(task, digest)
        head = {HEADER_KEY: FORMAT, "task": task, "digest": digest}
        body = "".join(_dumps({"doc_id": d, "prompt": p}) + "\n" for d, p in _pairs(prompts))
        shared = (name, _gzip(_dumps(head) + "\n" + body))
        rows = [{k: v for k, v in row.items() if k != "prompt"} for row in rows]
    head = {HEADER_KEY: FORMAT, "prompts": shared[0] if shared else None}
    text = _dumps(head) + "\n" + "".join(_dumps(row) + "\n" for row in rows)
    return _gzip(text), shared


def write_samples(path: str | Path, rows: Iterable[dict], task: str) -> Path:
    """Write a cell's rows for ``task`` to ``path`` (a ``.jsonl.gz`` name, see
    ``samples_path``) in format 1, atomically: first the shared prompts file beside it (left
    alone when it already holds these bytes), then the cell file. Returns ``path``."""
    path = Path(path)
    if not path.name.endswith(SUFFIX):
        raise ValueError(f"{path}: samples files are written as *{SUFFIX} (harness.samples)")
    data, shared = encode_samples(rows, task)
    if shared is not None:
        name, blob = shared
        write_shared_atomic(path.with_name(name), blob)
    write_atomic(path, data)
    return path


def _fix(path: Path) -> str:
    return (f"restore {path} (e.g. `git checkout -- {path}` where it is committed), or delete the "
            "cell's samples file and its record line in records.jsonl so that the next run recomputes "
            "the cell")


def _lines(path: Path) -> list[tuple[int, Any]]:
    """(line number, parsed JSON) of the non-blank lines of a samples or prompts file."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SamplesError(f"{path}: cannot be read ({exc.strerror or exc}); {_fix(path)}") from None
    if path.name.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise SamplesError(f"{path}: not a complete gzip file ({exc}): it was cut short or damaged "
                               f"(an interrupted copy, a full disk?); {_fix(path)}") from None
    out = []
    for lineno, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((lineno, json.loads(line)))
        except ValueError as exc:
            raise SamplesError(f"{path} line {lineno}: not JSON ({exc}); {_fix(path)}") from None
    return out


@functools.lru_cache(maxsize=64)
def _read_prompts(path: Path, stamp: tuple) -> dict:
    """``{doc_id: prompt}`` of a prompts file, its digest checked (cached per file version)."""
    lines = _lines(path)
    if not lines or not isinstance(lines[0][1], dict) or lines[0][1].get(HEADER_KEY) != FORMAT:
        raise SamplesError(f"{path}: no prompts header (first line {{\"{HEADER_KEY}\": {FORMAT}, ...}}); "
                           f"{_fix(path)}")
    head = lines[0][1]
    prompts = {}
    for lineno, row in lines[1:]:
        if not isinstance(row, dict) or "doc_id" not in row or "prompt" not in row:
            raise SamplesError(f"{path} line {lineno}: not a {{\"doc_id\", \"prompt\"}} row; {_fix(path)}")
        prompts[row["doc_id"]] = row["prompt"]
    if prompts_digest(prompts) != head.get("digest") or not path.name.endswith(f"-{head.get('digest')}{SUFFIX}"):
        raise SamplesError(f"{path}: its prompts do not match the digest in its name and header (edited or "
                           f"mixed up with another file); {_fix(path)}")
    return prompts


def read_samples(path: str | Path) -> list[dict]:
    """The rows of a samples file as they were written, prompts included: format 1
    (``.jsonl.gz``, module doc) or a plain ``.jsonl`` file of an older run. Raises
    ``SamplesError`` naming the file (and the line) and the fix when it cannot be read whole:
    a truncated or corrupt gzip, a line that is not JSON, a missing or mismatched prompts file."""
    path = Path(path)
    lines = _lines(path)
    if not path.name.endswith(".gz"):
        for lineno, row in lines:
            if not isinstance(row, dict):
                raise SamplesError(f"{path} line {lineno}: not a JSON object; {_fix(path)}")
        return [row for _, row in lines]
    if not lines or not isinstance(lines[0][1], dict) or HEADER_KEY not in lines[0][1]:
        raise SamplesError(f"{path}: no samples header (first line {{\"{HEADER_KEY}\": {FORMAT}, ...}}); "
                           f"{_fix(path)}")
    head, body = lines[0][1], lines[1:]
    if head[HEADER_KEY] != FORMAT:
        raise SamplesError(f"{path}: samples format {head[HEADER_KEY]!r}; this qvlm-bench reads format "
                           f"{FORMAT} (a newer version wrote it: update qvlm-bench)")
    for lineno, row in body:
        if not isinstance(row, dict) or "doc_id" not in row:
            raise SamplesError(f"{path} line {lineno}: not a row with a doc_id; {_fix(path)}")
    if head.get("prompts") is None:
        return [row for _, row in body]
    pfile = path.with_name(str(head["prompts"]))
    if "/" in str(head["prompts"]) or not pfile.is_file():
        raise SamplesError(f"{path}: the prompts file it points to, {pfile}, is missing (prompts files are "
                           f"shared by the cells of a task: keep them with the samples); {_fix(pfile)}")
    st = pfile.stat()
    prompts = _read_prompts(pfile, (st.st_mtime_ns, st.st_size, st.st_ino))
    rows = []
    for lineno, row in body:
        doc_id = row["doc_id"]
        if doc_id not in prompts:
            raise SamplesError(f"{path} line {lineno}: doc_id {doc_id!r} is not in its prompts file {pfile}; "
                               f"{_fix(path)}")
        rows.append({"doc_id": doc_id, "prompt": prompts[doc_id], **row})
    return rows


# ---- compacting the plain files of older runs ---------------------------------------------------


def _same(a: list[dict], b: list[dict]) -> bool:
    """Equal rows, key order and NaN included (compared as the JSON they serialize to)."""
    return _dumps(a) == _dumps(b)


def _task_of(name: str, tasks: set[str]) -> str:
    if len(tasks) == 1:
        return next(iter(tasks))
    return name[:-len(PLAIN_SUFFIX)].split("-", 1)[-1]  # <cellkey>-<task>.jsonl: keys hold no '-'


def compact_samples(folder: str | Path) -> dict[str, Any]:
    """Rewrite every plain ``samples/*.jsonl`` file of the results folder ``folder`` in format 1,
    holding the folder's lock (``resultsdir.results_lock``; ``ResultsDirError`` if a run holds
    it). Each new file is read back and must give exactly the old rows before anything else
    changes; then the records' ``samples_file`` fields are repointed (records.jsonl rewritten
    atomically, other lines kept byte for byte, unreadable ones included), and only then are the
    old files deleted. A plain file that cannot be read whole is left as it is and named in
    ``skipped``. Idempotent; safe to run again after a kill at any point. Returns counts, byte
    sizes and the skipped files (``files``, ``prompt_files``, ``records``, ``bytes_before``,
    ``bytes_after``, ``skipped``)."""
    from .resultsdir import results_lock

    folder = Path(folder)
    if not (folder / "records.jsonl").is_file() and not (folder / SAMPLES_DIR).is_dir():
        raise SamplesError(f"{folder} is not a results folder (no records.jsonl, no samples/)")
    counts: dict[str, Any] = {"files": 0, "prompt_files": 0, "records": 0, "bytes_before": 0,
                              "bytes_after": 0, "skipped": []}
    sdir = folder / SAMPLES_DIR
    if not sdir.is_dir():
        return counts
    with results_lock(folder):
        plain = sorted(p for p in sdir.iterdir() if p.is_file() and p.name.endswith(PLAIN_SUFFIX)
                       and not p.name.startswith("."))
        if not plain:
            return counts
        records_path = folder / "records.jsonl"
        tasks: dict[str, set[str]] = {}
        for rec in read_records(records_path):
            rel = rec.get("samples_file")
            if isinstance(rel, str) and rec.get("task"):
                tasks.setdefault(rel, set()).add(str(rec["task"]))
        prompt_files_before = {p.name for p in sdir.glob(f"{PROMPTS_PREFIX}*{SUFFIX}")}
        moved: dict[str, str] = {}
        skipped: list[str] = []
        for old in plain:
            rel = old.relative_to(folder).as_posix()
            try:
                rows = read_samples(old)
            except SamplesError as exc:  # kept as it is; the leaderboard names it too
                skipped.append(str(exc))
                continue
            new = old.with_name(old.name + ".gz")
            write_samples(new, rows, _task_of(old.name, tasks.get(rel, set())))
            if not _same(read_samples(new), rows):  # never expected: the old file is kept
                new.unlink(missing_ok=True)
                raise SamplesError(f"{new}: reading it back did not give the rows of {old}; {old} is kept "
                                   "(please report this)")
            moved[rel] = new.relative_to(folder).as_posix()
            counts["files"] += 1
            counts["bytes_before"] += old.stat().st_size
            counts["bytes_after"] += new.stat().st_size
        if records_path.is_file():
            counts["records"] = _repoint_records(records_path, moved)
        for rel in moved:
            (folder / rel).unlink()
        new_prompts = {p.name for p in sdir.glob(f"{PROMPTS_PREFIX}*{SUFFIX}")} - prompt_files_before
        counts["prompt_files"] = len(new_prompts)
        counts["bytes_after"] += sum((sdir / n).stat().st_size for n in new_prompts)
    counts["skipped"] = skipped
    return counts


def _repoint_records(path: Path, moved: dict[str, str]) -> int:
    """Point the records whose ``samples_file`` is a key of ``moved`` at its value; every other
    line (unreadable ones too) is kept byte for byte. Returns how many records changed."""
    raw = path.read_bytes()
    out, changed = [], 0
    for line in raw.split(b"\n"):
        try:
            rec = json.loads(line) if line.strip() else None
        except ValueError:
            rec = None
        if isinstance(rec, dict) and isinstance(rec.get("samples_file"), str) and rec["samples_file"] in moved:
            rec["samples_file"] = moved[rec["samples_file"]]
            line = _dumps(rec).encode()
            changed += 1
        out.append(line)
    if changed:
        write_atomic(path, b"\n".join(out))
    return changed
