"""VQAv2-style subsets read the chosen rows' images only: on local shards in the Hub's layout and
schema, through the same code as the Hub path (a fake shard resolver and a byte-counting opener
stand in for the Hub)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from tasks import sampling, sources, subset

N_SHARDS, ROWS, GROUP = 3, 40, 10  # 120 rows in 12 row groups of 10


def _features():
    import datasets

    return datasets.Features({
        "question_type": datasets.Value("string"),
        "multiple_choice_answer": datasets.Value("string"),
        "answers": [{"answer": datasets.Value("string"), "answer_confidence": datasets.Value("string"),
                     "answer_id": datasets.Value("int64")}],
        "image_id": datasets.Value("int64"),
        "answer_type": datasets.Value("string"),
        "question_id": datasets.Value("int64"),
        "question": datasets.Value("string"),
        "image": datasets.Image(),
    })


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """``data/validation-0000i-of-00003.parquet`` as the Hub stores lmms-lab/VQAv2, small images."""
    import datasets
    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    root = tmp_path_factory.mktemp("vqav2-hub") / "data"
    root.mkdir()
    rng = np.random.default_rng(0)
    kinds = ["yes/no"] * 5 + ["number"] * 2 + ["other"] * 3
    files = []
    for s in range(N_SHARDS):
        rows = {k: [] for k in _features()}
        for i in range(ROWS):
            qid = s * ROWS + i
            kind = kinds[int(rng.integers(0, len(kinds)))]
            rows["question_type"].append("what")
            rows["multiple_choice_answer"].append("yes" if kind == "yes/no" else "2")
            rows["answers"].append([{"answer": "yes", "answer_confidence": "yes", "answer_id": a}
                                    for a in range(1, 11)])
            rows["image_id"].append(qid // 3)
            rows["answer_type"].append(kind)
            rows["question_id"].append(qid)
            rows["question"].append(f"question {qid}?")
            rows["image"].append(Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)))
        table = datasets.Dataset.from_dict(rows, features=_features()).data.table
        path = root / f"validation-{s:05d}-of-{N_SHARDS:05d}.parquet"
        pq.write_table(table, path, row_group_size=GROUP)
        files.append(str(path))
    return files


def _reference(files, size, seed):
    """The previous implementation: load the whole split, then select stratified_indices."""
    import datasets

    ds = datasets.load_dataset("parquet", data_files={"validation": files}, split="validation")
    return ds.select(sampling.stratified_indices(list(ds["answer_type"]), size, seed))


class _Recorder:
    """An opener that records every byte range read, as the Hub's range requests would be."""

    def __init__(self):
        self.reads: dict[str, list[tuple[int, int]]] = {}
        self.opened = 0

    def __call__(self, path):
        self.opened += 1
        reads = self.reads.setdefault(path, [])
        raw = open(path, "rb")

        class File(io.RawIOBase):
            def readable(self):
                return True

            def seekable(self):
                return True

            def seek(self, off, whence=0):
                return raw.seek(off, whence)

            def tell(self):
                return raw.tell()

            def readinto(self, buf):
                start = raw.tell()
                n = raw.readinto(buf)
                reads.append((start, start + n))
                return n

            def close(self):
                raw.close()
                super().close()

        return File()


def _image_chunks(path):
    """``{row group: (start, end)}`` byte ranges of the image column's chunks in ``path``."""
    import pyarrow.parquet as pq

    md = pq.ParquetFile(path).metadata
    out = {}
    for j in range(md.num_row_groups):
        rg = md.row_group(j)
        cols = [rg.column(c) for c in range(rg.num_columns) if rg.column(c).path_in_schema.startswith("image.")]
        starts = [c.dictionary_page_offset or c.data_page_offset for c in cols]
        out[j] = (min(starts), max(s + c.total_compressed_size for s, c in zip(starts, cols)))
    return out


def test_local_subset_is_the_previous_selection(shards):
    got = sources.load_docs(path="lmms-lab/VQAv2", split="validation", data_files=shards,
                            subset_size=15, subset_seed=1234, stratify_by="answer_type")["validation"]
    want = _reference(shards, 15, 1234)
    assert got["question_id"] == want["question_id"] and len(got) == 15
    assert got["answers"] == want["answers"]
    assert [im.tobytes() for im in got["image"]] == [im.tobytes() for im in want["image"]]
    assert got.features == want.features  # images decode to PIL as from load_dataset


def test_hub_subset_reads_images_of_chosen_row_groups_only(shards, tmp_path, monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(subset, "hub_shards", lambda path, name, split, cache_dir=None: list(shards))
    monkeypatch.setattr(subset, "hub_open", rec)
    got = sources.load_docs(path="lmms-lab/VQAv2", split="validation", subset_size=6,
                            subset_seed=7, stratify_by="answer_type", cache_dir=str(tmp_path))["validation"]
    want = _reference(shards, 6, 7)
    assert got["question_id"] == want["question_id"]
    chosen = set(want["question_id"])
    touched = unread = 0
    for s, path in enumerate(shards):
        # pyarrow first reads the file's last 64 KiB for the footer: in these 110 KB shards that
        # tail covers the last image chunks too; in the Hub's shards (hundreds of MB) it is the
        # footer itself. Every other read is checked.
        size = Path(path).stat().st_size
        footer = [r for r in rec.reads[path] if r[1] == size]
        assert len(footer) == 1 and footer[0][1] - footer[0][0] <= 64 * 1024
        reads = [r for r in rec.reads[path] if r[1] != size]
        for j, (lo, hi) in _image_chunks(path).items():
            ids = set(range(s * ROWS + j * GROUP, s * ROWS + (j + 1) * GROUP))
            covered = sum(max(0, min(hi, b) - max(lo, a)) for a, b in reads)
            if ids & chosen:
                assert covered >= hi - lo  # the chosen rows' image chunk, whole
                touched += 1
            else:
                assert covered == 0, (path, j)  # never an unselected row group's images
                unread += 1
    assert touched <= 6 and unread >= 12 - 6
    # the subset is cached: a second load reads nothing from the "Hub"
    opened = rec.opened
    again = sources.load_docs(path="lmms-lab/VQAv2", split="validation", subset_size=6,
                              subset_seed=7, stratify_by="answer_type", cache_dir=str(tmp_path))["validation"]
    assert rec.opened == opened and again["question_id"] == want["question_id"]


def test_subset_stats_and_full_split_fallback(shards):
    table, stats = subset.parquet_subset(shards, 30, 0, "answer_type")
    assert (stats.rows, stats.chosen, stats.row_groups) == (120, 30, 12)
    assert table.num_rows == 30 and 0 < stats.row_groups_read <= 12
    assert subset.parquet_subset(shards, 120, 0, "answer_type")[0] is None  # whole split: load it whole
    full = sources.load_docs(path="x", split="validation", data_files=shards, subset_size=500)["validation"]
    assert len(full) == 120


def test_a_missing_stratify_column_is_named(shards):
    with pytest.raises(subset.SubsetColumnError, match="'answer_kind' .*stratify_by"):
        sources.load_docs(path="x", split="validation", data_files=shards, subset_size=5,
                          stratify_by="answer_kind")
