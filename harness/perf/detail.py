"""A perf record's bulky detail in a gzip sidecar beside ``records.jsonl``; ``load_detail`` reads it back.

A perf record (``table.write_perf_record``) keeps in ``records.jsonl`` everything the perf table,
the leaderboard's join (``report.board._join_perf``, ``report.rows.row_identity``) and the
summaries read: identity, status and error, latency, memory, the chosen kernels per phase
(``kernel``, ``kernels.prefill`` / ``kernels.decode``), the gate's verdict and error figures
(``gate.passed``, ``gate.failed``, ``gate.layerwise_max_rel_err``, ``gate.e2e_rel_logit_err``,
``gate.producers.passed``, ``gate.trained.passed`` / ``.exact`` ...). The per-layer detail — the
parts named in ``DETAIL_PATHS`` (every gate layer's error, every fused quantizer's check, every
kernel candidate's time per layer shape) — is 80 % of a record's bytes; it goes to a sidecar,
``perf-detail/<run_id>-<digest>.json.gz`` in the records file's folder, which the record names in
``detail_file`` (relative to that folder). The name's digest (16 hex digits of the sha256 of the
sidecar's uncompressed text) makes it unique: two drivers or two children of one run appending at
once never write the same name for different content, and the reader checks it.

A sidecar (format 1) is gzip (``records.deterministic_gzip``: mtime 0, no file name) of one JSON
line: ``{"perf_detail_format": 1, "record": {"run_id", "config_hash", "batch_size",
"timestamp"}, "parts": [[path, value], ...], "order": [[path, [keys]], ...]}`` — each moved part
under its key path, the record it belongs to (checked when read), and the original key order of
each dict a part was taken from, so that ``load_detail`` gives back exactly the record as it was
before the split (key order included). Records written before the sidecar (the detail inline, no
``detail_file``) are returned as they are.

``load_detail`` is the one way to the detail: a missing or damaged sidecar raises
``PerfDetailError`` naming the file and the fix, or, for readers that can do without it
(``missing_ok``), reports the same message through ``note`` and returns the summary.
``compact_perf`` (``qvlm-bench compact-perf``) moves the inline detail of an existing folder's
records into sidecars.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from pathlib import Path
from typing import Any, Callable

from ..records import content_digest, deterministic_gzip, json_default, write_atomic, write_shared_atomic

FORMAT = 1
HEADER_KEY = "perf_detail_format"
DETAIL_KEY = "detail_file"
DETAIL_DIR = "perf-detail"
SUFFIX = ".json.gz"
RECORD_FIELDS = ("run_id", "config_hash", "batch_size", "timestamp")  # which record a sidecar belongs to

# the parts moved to the sidecar: per-layer and per-candidate detail no table or join reads
DETAIL_PATHS: tuple[tuple[str, ...], ...] = (
    ("gate", "layerwise"),                        # relative error per gate layer and phase
    ("gate", "token_mismatches"),                 # each differing greedy token, its gap and tie tolerance
    ("gate", "producers", "checks"),              # each fused activation quantizer's check
    ("gate", "trained", "layerwise"),
    ("gate", "trained", "producers", "checks"),
    ("gate", "trained", "kernels"),               # the kernels forced on the trained model, per role and phase
    ("gate", "trained", "not_accepted"),
    ("kernels", "selection"),                     # every candidate's time and error per layer shape and phase
    ("kernels", "layer_notes"),
    ("kernels", "online_timings"),                # fused vs eager online Hadamard per width and phase
)


class PerfDetailError(ValueError):
    """A perf record's detail sidecar cannot be read; the message names the file and the fix."""


def _dumps(obj: Any) -> str:
    return json.dumps(obj, default=json_default)


def _walk(rec: dict, path) -> dict | None:
    """The dict at ``path`` in ``rec``, or None where the path does not lead to a dict."""
    node: Any = rec
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None


def split_detail(rec: dict) -> tuple[dict, dict | None]:
    """(the record without the ``DETAIL_PATHS`` parts, the sidecar's payload or None when the record
    has none of them). Pure: ``rec`` is not changed (the summary is a JSON copy of it)."""
    summary = json.loads(_dumps(rec))
    parts, order = [], {}
    for path in DETAIL_PATHS:
        parent = _walk(summary, path[:-1])
        if parent is None or path[-1] not in parent:
            continue
        order.setdefault(path[:-1], list(parent))
        parts.append([list(path), parent.pop(path[-1])])
    if not parts:
        return summary, None
    payload = {HEADER_KEY: FORMAT, "record": {k: summary.get(k) for k in RECORD_FIELDS}, "parts": parts,
               "order": [[list(p), keys] for p, keys in order.items()]}
    return summary, payload


def restore_detail(summary: dict, payload: dict) -> dict:
    """The record ``summary`` with the parts of ``payload`` put back where they were (a copy)."""
    full = json.loads(_dumps(summary))
    for path, value in payload["parts"]:
        node = full
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    for path, keys in payload["order"]:
        parent = _walk(full, path)
        if parent is not None:
            items = dict(parent)
            parent.clear()
            parent.update({k: items.pop(k) for k in keys if k in items})
            parent.update(items)
    return full


def encode_detail(payload: dict) -> tuple[str, bytes]:
    """(file name, bytes) of the sidecar holding ``payload``. Pure and deterministic."""
    text = _dumps(payload) + "\n"
    run = re.sub(r"[^A-Za-z0-9]", "", str(payload["record"].get("run_id") or "")) or "norun"
    return f"{run}-{content_digest(text)}{SUFFIX}", deterministic_gzip(text)


def write_detail(folder: str | Path, rec: dict) -> dict:
    """Write ``rec``'s detail to a sidecar in ``folder/perf-detail`` (atomically; left alone when it
    already holds these bytes) and return the summary to append, with its ``detail_file``; a record
    without detail comes back as its JSON copy, without ``detail_file``."""
    summary, payload = split_detail(rec)
    if payload is None:
        return summary
    name, blob = encode_detail(payload)
    write_shared_atomic(Path(folder) / DETAIL_DIR / name, blob)
    summary[DETAIL_KEY] = f"{DETAIL_DIR}/{name}"
    return summary


def _fix(path: Path, folder: Path) -> str:
    return (f"restore {path} (`git checkout -- {path}` where it is committed, or copy it from where the "
            f"records came from); the record's summary in {folder / 'records.jsonl'} (gate verdict and "
            "errors, chosen kernels, latency, memory) reads without it, only the per-layer detail (gate "
            "errors per layer, fused-quantizer checks, kernel timings per candidate) is lost — running the "
            "variant again writes a new record with its own")


def _read(rec: dict, folder: Path) -> dict:
    rel = rec[DETAIL_KEY]
    if not isinstance(rel, str) or rel.startswith("/") or ".." in Path(rel).parts or not rel.endswith(SUFFIX):
        raise PerfDetailError(f"{folder / 'records.jsonl'}: record {rec.get('config_hash')} (run "
                              f"{rec.get('run_id')}) has detail_file {rel!r}, not a sidecar name "
                              f"({DETAIL_DIR}/<run>-<digest>{SUFFIX}); the record was edited: restore "
                              "records.jsonl")
    path = folder / rel
    try:
        raw = path.read_bytes()
    except OSError as exc:
        why = "is missing" if isinstance(exc, FileNotFoundError) else f"cannot be read ({exc.strerror or exc})"
        raise PerfDetailError(f"{path}: the detail sidecar of a perf record {why}; {_fix(path, folder)}") from None
    try:
        text = gzip.decompress(raw).decode()
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise PerfDetailError(f"{path}: not a complete gzip file ({exc}): cut short or damaged (an "
                              f"interrupted copy, a full disk?); {_fix(path, folder)}") from None
    digest = content_digest(text)
    if not path.name.endswith(f"-{digest}{SUFFIX}"):
        raise PerfDetailError(f"{path}: its content does not match the digest in its name (edited, or "
                              f"mixed up with another file); {_fix(path, folder)}")
    try:
        payload = json.loads(text)
    except ValueError as exc:
        raise PerfDetailError(f"{path}: not JSON ({exc}); {_fix(path, folder)}") from None
    if not isinstance(payload, dict) or HEADER_KEY not in payload:
        raise PerfDetailError(f"{path}: no {HEADER_KEY!r} header: not a perf detail sidecar; {_fix(path, folder)}")
    if payload[HEADER_KEY] != FORMAT:
        raise PerfDetailError(f"{path}: perf detail format {payload[HEADER_KEY]!r}; this qvlm-bench reads "
                              f"format {FORMAT} (a newer version wrote it: update qvlm-bench)")
    own = payload.get("record") or {}
    if any(own.get(k) != rec.get(k) for k in RECORD_FIELDS):
        raise PerfDetailError(f"{path}: belongs to another record (run {own.get('run_id')}, config "
                              f"{own.get('config_hash')}, batch {own.get('batch_size')}) than the one that "
                              f"names it (run {rec.get('run_id')}, config {rec.get('config_hash')}, batch "
                              f"{rec.get('batch_size')}): the record was edited; restore records.jsonl")
    return payload


def load_detail(rec: dict, folder: str | Path, *, missing_ok: bool = False,
                note: Callable[[str], Any] | None = None) -> dict:
    """The whole record ``rec`` of the records file in ``folder``, its sidecar's detail put back
    (``detail_file`` kept); a record without ``detail_file`` (written before the sidecar, or
    without detail) as it is. A missing or damaged sidecar raises ``PerfDetailError`` naming the
    file and the fix; with ``missing_ok`` the message goes to ``note`` instead and the summary
    comes back (for readers that can do without the detail)."""
    if not rec.get(DETAIL_KEY):
        return rec
    try:
        return restore_detail(rec, _read(rec, Path(folder)))
    except PerfDetailError as exc:
        if not missing_ok:
            raise
        if note is not None:
            note(f"note: {exc}")
        return rec


# ---- compacting the records of older runs ------------------------------------------------------


def compact_perf(folder: str | Path) -> dict[str, Any]:
    """Move the inline detail of every perf record of ``folder/records.jsonl`` into sidecars,
    holding the folder's lock (``resultsdir.results_lock``; ``ResultsDirError`` if a run holds it).
    Each sidecar is written first and the record read back through it must equal the old record
    (key order included) before records.jsonl is rewritten, atomically, once; every other line
    (accuracy records, unreadable lines, records already compact) is kept byte for byte.
    Idempotent; a kill at any point leaves the old records.jsonl and at most unreferenced sidecars,
    which the next run writes again with the same bytes. Returns ``records`` (rewritten),
    ``files`` (sidecars they name), ``bytes_before`` (records.jsonl) and ``bytes_after``
    (records.jsonl and those sidecars)."""
    from ..resultsdir import results_lock

    folder = Path(folder)
    path = folder / "records.jsonl"
    if not path.is_file():
        raise PerfDetailError(f"{folder} is not a perf results folder (no records.jsonl)")
    counts: dict[str, Any] = {"records": 0, "files": 0, "bytes_before": 0, "bytes_after": 0}
    with results_lock(folder):
        raw = path.read_bytes()
        counts["bytes_before"] = counts["bytes_after"] = len(raw)
        out, names = [], set()
        for line in raw.split(b"\n"):
            try:
                rec = json.loads(line) if line.strip() else None
            except ValueError:
                rec = None
            if not isinstance(rec, dict) or rec.get("metric") != "perf" or DETAIL_KEY in rec:
                out.append(line)
                continue
            summary = write_detail(folder, rec)
            if DETAIL_KEY not in summary:
                out.append(line)
                continue
            back = load_detail(json.loads(_dumps(summary)), folder)
            back.pop(DETAIL_KEY)
            if _dumps(back) != _dumps(rec):  # never expected: records.jsonl is left as it was
                raise PerfDetailError(f"{folder / summary[DETAIL_KEY]}: reading the record back through it did "
                                      f"not give the record of {path} (run {rec.get('run_id')}, config "
                                      f"{rec.get('config_hash')}); {path} is unchanged (please report this)")
            out.append(_dumps(summary).encode())
            names.add(summary[DETAIL_KEY])
            counts["records"] += 1
        if counts["records"]:
            data = b"\n".join(out)
            write_atomic(path, data)
            counts["bytes_after"] = len(data) + sum((folder / n).stat().st_size for n in names)
        counts["files"] = len(names)
    return counts
