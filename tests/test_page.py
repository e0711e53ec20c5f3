"""leaderboard.html is a complete, self-contained page: what ran, the table with intervals and marks,
the plots inline, nothing fetched from a network."""

from urllib.parse import unquote
from html.parser import HTMLParser

import numpy as np
from board_data import scores, write_run

from harness.report.write import write_leaderboard


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text, self.stack, self.rows = [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "tr":
            self.rows.append([])
        if tag in ("td", "th"):
            self.rows[-1].append(dict(attrs).get("class", ""))

    def handle_data(self, data):
        self.text.append(data)


def test_page_is_complete_and_self_contained(tmp_path):
    base = scores(150, 120, 1)
    worse = base.copy()
    worse[np.flatnonzero(base)[:30]] = 0.0
    folder = write_run(tmp_path / "run", {("fp16", "w16a16", "t"): base, ("awq", "w4a4", "t"): base,
                                          ("rtn", "w4a4", "t"): worse})
    page = write_leaderboard(folder)["html"].read_text()
    p = _Tags()
    p.feed(page)
    text = " ".join(p.text)
    tags = [t for t, _ in p.tags]
    assert page.startswith("<!DOCTYPE html>") and "title" in tags and "style" in tags and "caption" in tags
    assert "script" not in tags and "link" not in tags
    for _, attrs in p.tags:  # nothing loads from elsewhere
        for key in ("src", "href"):
            assert not attrs.get(key, "data:").startswith(("http", "//", "file:"))
    imgs = [a["src"] for t, a in p.tags if t == "img"]
    assert imgs and all(s.startswith("data:image/svg+xml;charset=utf-8,") for s in imgs)
    svg = unquote(imgs[0].split(",", 1)[1])
    assert svg.lstrip().startswith("<?xml") and svg == (folder / "accuracy_by_scheme.svg").read_text()
    # what ran: model, scheme, calibration, device, commit; the caption explains bold and intervals
    for fact in ("qvlm-bench leaderboard: synthetic", "W4A4", "32 train questions of t", "cpu (1 threads)",
                 "abcdef123456", "t (150 questions)", "Bold:", "percentile interval", "Δ ref"):
        assert fact in text, fact
    # one row per (model, variant, scheme) plus the header; awq leads rtn significantly
    assert len(p.rows) == 4
    assert any("lead" in c for c in p.rows[2]) and not any("lead" in c or "tie" in c for c in p.rows[3])
