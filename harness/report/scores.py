"""A cell's per-question scores from its record's samples file, and the clusters of a task's
questions (the unit its bootstrap resamples whole: VQAv2's images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..samples import SamplesError, read_samples
from .rows import record_field, variant_of
from .stats import QUESTION, cluster_index

FALLBACK = "interval from the record's stderr (normal, unpaired)"


def load_scores(folder: Path, rec: dict, problems: dict[str, list[str]]) -> tuple[dict, dict | None] | None:
    """(doc_id -> score, doc_id -> cluster or None where the rows carry no cluster) of a record's
    samples file, or None (noted in ``problems``) when unusable."""
    rel = record_field(rec, "samples_file")
    where = f"{rec.get('model')}/{variant_of(rec)}/{rec.get('scheme')}/{rec.get('task')}"
    if not rel:
        problems.setdefault("no samples_file in the record", []).append(where)
        return None
    path = folder / rel
    if not path.is_file():
        problems.setdefault("samples file missing", []).append(f"{where} ({path})")
        return None
    scores, clusters = {}, {}
    unreadable = "samples file unreadable (delete it and the cell's record line to recompute it)"
    try:
        rows = read_samples(path)
    except SamplesError as exc:  # names the file (and line) and the fix
        problems.setdefault(unreadable, []).append(f"{where} ({exc})")
        return None
    for i, row in enumerate(rows, 1):
        try:
            scores[row["doc_id"]] = float(row["score"])
        except (ValueError, KeyError, TypeError) as exc:  # named, not a bare "Expecting value"
            problems.setdefault(unreadable, []).append(f"{where} ({path} row {i}: {exc})")
            return None
        if row.get("cluster") is not None:
            clusters[row["doc_id"]] = row["cluster"]
    if not scores:
        problems.setdefault("samples file empty", []).append(f"{where} ({path})")
        return None
    mean = 100 * sum(scores.values()) / len(scores)
    value = record_field(rec, "value")
    if value is not None and abs(mean - value) > 1e-6 * max(1.0, abs(value)):
        problems.setdefault("samples file disagrees with its record (a file from another run?)", []).append(
            f"{where} ({path}: mean {mean:.4f}, record {value:.4f})")
        return None
    return scores, (clusters if len(clusters) == len(scores) else None)


def task_clusters(task: str, ids: list, cells: list[tuple[str, dict | None]],
                   notes: list[str]) -> tuple[np.ndarray | None, str]:
    """The clusters of a task's questions ``ids`` from its cells' (declared unit, doc_id -> cluster).

    The unit is the one the records declare (``cluster_unit``; records without it: questions);
    the cluster of a question is a property of the data, so every row uses the ids any cell
    logged. Questions resampled one by one (with a note) where cells disagree or ids are missing.
    """
    declared = sorted({unit for unit, _ in cells if unit != QUESTION})
    if not declared:
        return None, QUESTION
    if len(declared) > 1:
        notes.append(f"{task}: the records declare different cluster units {declared}; its intervals "
                     "resample questions")
        return None, QUESTION
    unit = declared[0]
    label: dict = {}
    for u, found in cells:
        for doc, c in (found or {}).items() if u == unit else ():
            if label.setdefault(doc, c) != c:
                notes.append(f"{task}: question {doc} is in {unit} {label[doc]!r} in one record and {c!r} in "
                             "another (records from different data?); its intervals resample questions")
                return None, QUESTION
    missing = sum(1 for d in ids if d not in label)
    if missing:
        notes.append(f"{task}: {missing} question(s) have no {unit} id in any samples file (written before "
                     f"clusters were logged?); its intervals resample questions")
        return None, QUESTION
    return cluster_index([label[d] for d in ids]), unit
