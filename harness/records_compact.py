"""``qvlm-bench compact-records``: each record's per-state parts into content-named gzip sidecars.

A method's meta (Q-VLM's dependencies, blocks, percentiles, VEO report) and the static ranges'
search (``act_ranges``: a percentile per layer) are written inline in every record of their state —
once per task, identical — and are most of a committed folder's bytes (a 12-layer Q-VLM record: 13
of its 15.5 KB; a ``+clip`` record: 4.8 of 6.8 KB). Compaction moves each such part
(``records.SIDECAR_FIELDS``) of at least ``min_bytes`` to ``meta/<digest>.json.gz``
(``records.deterministic_gzip`` of the JSON text; the name's 16 hex digits are the sha256 of that
text, checked when read), shared by every record with the same part, and puts ``<part>_file`` in
its place. ``records.read_records`` restores it, key order included, so tables, contrasts and tests
read the same records as before.

Safe like ``compact-samples``: it holds the folder's lock, writes every sidecar first, checks that
the new records file reads back to exactly the old records before replacing it atomically, keeps
unreadable lines byte for byte, and is idempotent. Runs append inline records afterwards as usual.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .records import (META_DIR, SIDECAR_FIELDS, SIDECAR_SUFFIX, content_digest, deterministic_gzip, json_default,
                      read_records, temp_name, write_atomic, write_shared_atomic)

MIN_BYTES = 1024  # smaller metas stay inline: a sidecar would not pay for its name and gzip header


def _canonical(records: list[dict]) -> list[str]:
    return [json.dumps(r, default=json_default) for r in records]


def compact_records(folder: str | Path, min_bytes: int = MIN_BYTES) -> dict[str, Any]:
    """Move the per-state parts of the records of ``folder``/records.jsonl to sidecars; returns
    counts and sizes (``records``, ``sidecars``, ``bytes_before``, ``bytes_after``)."""
    from .resultsdir import results_lock

    folder = Path(folder)
    path = folder / "records.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no records.jsonl: not a results folder")
    counts = {"records": 0, "sidecars": 0, "bytes_before": 0, "bytes_after": 0}
    with results_lock(folder):
        raw = path.read_bytes()
        before = read_records(path)
        lines, sidecars = [], {}
        for line in raw.split(b"\n"):
            try:
                rec = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                rec = None
            moved = {}
            for field, file_field in SIDECAR_FIELDS.items():
                part = rec.get(field) if isinstance(rec, dict) else None
                text = json.dumps(part, separators=(",", ":"), default=json_default) if isinstance(part, dict) else ""
                if text and len(text) >= min_bytes:
                    rel = f"{META_DIR}/{content_digest(text)}{SIDECAR_SUFFIX}"
                    sidecars[rel] = text
                    moved[field] = (file_field, rel)
            if not moved:
                lines.append(line)  # kept byte for byte: small or no parts, blank or unreadable lines
                continue
            rec = dict(moved[k] if k in moved else (k, v) for k, v in rec.items())
            lines.append(json.dumps(rec, default=json_default).encode())
            counts["records"] += 1
        if not counts["records"]:
            return counts
        for rel, text in sidecars.items():
            write_shared_atomic(folder / rel, deterministic_gzip(text))
        new = b"\n".join(lines)
        check = temp_name(path)
        try:
            check.write_bytes(new)
            if _canonical(read_records(check)) != _canonical(before):  # never expected
                raise RuntimeError(f"{path}: the compacted records do not read back as the old ones; "
                                   "the file is left as it was (please report this)")
        finally:
            check.unlink(missing_ok=True)
        write_atomic(path, new)
        counts["sidecars"] = len(sidecars)
        counts["bytes_before"] = len(raw)
        counts["bytes_after"] = len(new) + sum((folder / rel).stat().st_size for rel in sidecars)
    return counts
