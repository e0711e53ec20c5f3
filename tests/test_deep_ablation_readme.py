"""The README's Table 1 on the 12-layer model quotes the committed ablation: each Δ is the contrast
in results/ablation-deep/contrasts.csv, the baseline's Avg is the leaderboard's, and the partition
it names is the one the records' mining chose at W4A4 in every Q-VLM run."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from harness.records import read_records

REPO = Path(__file__).resolve().parents[1]
FOLDER = REPO / "results/ablation-deep"


def _fmt(v: float, lo: float, hi: float) -> str:
    def one(x):
        x = 0.0 if abs(x) < 0.05 else x
        return f"{x:+.1f}".replace("-", "−")
    return f"{one(v)} [{one(lo)}, {one(hi)}]"


def _section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("**Q-VLM's Table 1 on a 12-layer model**")
    return text[start:text.index("\n- **", start)]


def test_readme_table1_is_the_committed_contrasts():
    if not (FOLDER / "contrasts.csv").is_file():
        pytest.skip("results/ablation-deep is not in this checkout")
    contrasts = {(r["contrast"], r["scheme"]): r for r in csv.DictReader(open(FOLDER / "contrasts.csv"))}
    board = {(r["variant"], r["scheme"]): r for r in csv.DictReader(open(FOLDER / "leaderboard.csv"))}
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in _section().splitlines() if line.strip().startswith("| ") and "---" not in line}
    for label, variant in (("+ CDM", "qvlm-cdm"), ("+ VEO", "qvlm-veo"), ("both (`qvlm`)", "qvlm")):
        for col, scheme in ((1, "w4a4"), (3, "w6a6")):
            r = contrasts[(f"{variant} − qvlm-layerwise", scheme)]
            assert rows[label][col] == _fmt(*(float(r[k]) for k in ("Avg", "Avg lo", "Avg hi"))), (label, scheme)
    base = rows["baseline (layer-wise search)"]
    for col, scheme in ((1, "w4a4"), (3, "w6a6")):
        r = board[("qvlm-layerwise", scheme)]
        want = f"{float(r['Avg']):.1f} [{float(r['Avg lo']):.1f}, {float(r['Avg hi']):.1f}] (Avg)"
        assert base[col] == want
    rtn = board[("rtn", "w4a4")]
    assert f"loses only {-float(rtn['Δ ref']):.1f} points to RTN W4A4" in " ".join(_section().split())


def test_readme_partition_is_the_records():
    seeds = sorted(FOLDER.glob("seed*/records.jsonl"))
    if len(seeds) < 4:
        pytest.skip("results/ablation-deep's four seeds are not in this checkout")
    named = re.search(r"`([0-9|\-]+)` at W4A4", _section()).group(1)
    parts = {r["method_meta"]["summary"]["partition"] for p in seeds for r in read_records(p)
             if r["method"] in ("qvlm", "qvlm-cdm") and r["scheme"] == "w4a4"}
    assert parts == {named}
