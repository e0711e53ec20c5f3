"""A seeded subset of a parquet split that reads the images of the chosen rows only.

Why: VQAv2's validation split is ~34 GB with images, and the suite evaluates a few thousand of
its 214,354 questions. ``datasets.load_dataset`` downloads every shard before it can select
rows. Here the selection reads only the stratification column of each shard (a column-projected
read: the footer, then that column's chunks), draws the same rows ``stratified_indices`` draws
over the whole split, and then reads every column, images included, of only the row groups
that hold a chosen row.

The unit of a parquet read is a row group's column chunk, so a chosen row costs the images of its
whole row group: with ``k`` rows chosen uniformly from ``n``, in row groups of ``r`` rows, about
``1 - (1 - k/n)**r`` of the image bytes are read (docs/protocols.md has the numbers). Each call
logs what it read.

Sources: local parquet files (``open``), or a Hub dataset's shards as ``datasets`` resolves them
(``hub_shards``), opened through ``huggingface_hub.HfFileSystem`` with exact range requests.
Subsets drawn from the Hub are kept as one parquet file in the datasets cache, keyed by the
shards' URLs (which name the dataset revision) and the draw.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Sequence

from .sampling import stratified_indices

log = logging.getLogger("qvlm_bench.tasks")

Opener = Callable[[str], BinaryIO]


class SubsetColumnError(KeyError):
    """The stratification column is not in the data: a suite/task setting to fix, not a download."""

    def __str__(self) -> str:
        return self.args[0]


@dataclass
class SubsetRead:
    """What a subset read touched: enough to state its cost."""

    rows: int = 0
    chosen: int = 0
    row_groups: int = 0
    row_groups_read: int = 0
    bytes_read: int = 0
    bytes_total: int = 0
    files: list[str] = field(default_factory=list)


def _local_open(path: str) -> BinaryIO:
    return open(path, "rb")


def hub_shards(path: str, name: str | None, split: str, cache_dir: str | None = None) -> list[str]:
    """The split's parquet shards as ``datasets`` resolves them for ``load_dataset(path, name)``
    (``hf://`` URLs at the resolved revision, in load order). Fetches the repo listing only."""
    import datasets

    builder = datasets.load_dataset_builder(path, name, cache_dir=cache_dir)
    files = (builder.config.data_files or {}).get(split)
    if not files:
        raise FileNotFoundError(f"dataset {path!r} (config {name!r}) lists no data files for split {split!r}")
    bad = [f for f in files if not str(f).endswith(".parquet")]
    if bad:
        raise ValueError(f"dataset {path!r} split {split!r} is not stored as parquet ({bad[0]})")
    return [str(f) for f in files]


def hub_open(url: str) -> BinaryIO:
    """An ``hf://`` file whose reads are exact HTTP range requests (no read-ahead block, which
    would fetch megabytes of images around each small column chunk)."""
    from huggingface_hub import HfFileSystem

    return HfFileSystem().open(url, "rb", cache_type="none")


def parquet_subset(files: Sequence[str], size: int, seed: int, stratify_by: str | None,
                   opener: Opener = _local_open):
    """``(table, SubsetRead)``: the rows ``stratified_indices`` picks from the concatenated
    ``files`` (in file order, sorted like a full load), or ``(None, SubsetRead)`` when ``size``
    covers the whole split (load it whole instead)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    stats = SubsetRead(files=list(files))
    handles = [opener(f) for f in files]
    try:
        pfs = [pq.ParquetFile(h) for h in handles]
        starts: list[int] = []  # global index of each row group's first row
        groups: list[tuple[int, int]] = []  # (file, row group)
        for i, pf in enumerate(pfs):
            md = pf.metadata
            for j in range(md.num_row_groups):
                starts.append(stats.rows)
                groups.append((i, j))
                stats.rows += md.row_group(j).num_rows
                stats.bytes_total += md.row_group(j).total_byte_size
        stats.row_groups = len(groups)
        if size >= stats.rows:
            return None, stats
        if stratify_by:
            missing = [f for f, pf in zip(files, pfs) if stratify_by not in pf.schema_arrow.names]
            if missing:
                raise SubsetColumnError(f"column {stratify_by!r} (the task's stratify_by) is not in "
                                        f"{missing[0]}; columns: {pfs[0].schema_arrow.names}")
            labels: list[Any] = []
            for pf in pfs:
                labels += pf.read(columns=[stratify_by]).column(0).to_pylist()
        else:
            labels = [0] * stats.rows
        chosen = stratified_indices(labels, size, seed)
        stats.chosen = len(chosen)
        by_group: dict[int, list[int]] = {}
        for g in chosen:
            k = bisect.bisect_right(starts, g) - 1
            by_group.setdefault(k, []).append(g - starts[k])
        parts = []
        for k in sorted(by_group):
            i, j = groups[k]
            rg = pfs[i].read_row_group(j)
            stats.bytes_read += pfs[i].metadata.row_group(j).total_byte_size
            parts.append(rg.take(pa.array(by_group[k], type=pa.int64())))
        stats.row_groups_read = len(by_group)
        schema = pfs[0].schema_arrow
        table = pa.concat_tables([p.cast(schema) for p in parts])
    finally:
        for h in handles:
            h.close()
    log.info("subset of %d/%d rows: read %s and the row groups of the chosen rows, %d/%d "
             "(%.1f%% of the split's %.2f GB uncompressed)", stats.chosen, stats.rows,
             f"column {stratify_by!r}" if stratify_by else "the footers", stats.row_groups_read,
             stats.row_groups, 100 * stats.bytes_read / max(stats.bytes_total, 1),
             stats.bytes_total / 1e9)
    return table, stats


def _cache_file(cache_dir: str | None, files: Sequence[str], size: int, seed: int,
                stratify_by: str | None) -> Path:
    import datasets

    key = hashlib.sha256(json.dumps([list(files), size, seed, stratify_by]).encode()).hexdigest()[:20]
    root = Path(cache_dir) if cache_dir else Path(datasets.config.HF_DATASETS_CACHE)
    return root / "qvlm-bench-subsets" / f"{key}.parquet"


def hub_subset(path: str, name: str | None, split: str, size: int, seed: int,
               stratify_by: str | None, cache_dir: str | None = None):
    """A ``datasets.Dataset`` of the subset, drawn from the Hub shards once and then cached; None
    when ``size`` covers the whole split."""
    import datasets
    import pyarrow.parquet as pq

    files = hub_shards(path, name, split, cache_dir)
    cached = _cache_file(cache_dir, files, size, seed, stratify_by)
    if not cached.is_file():
        table, _ = parquet_subset(files, size, seed, stratify_by, opener=hub_open)
        if table is None:
            return None
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        pq.write_table(table, tmp)
        tmp.replace(cached)
    return datasets.Dataset(datasets.table.InMemoryTable(pq.read_table(cached)))
