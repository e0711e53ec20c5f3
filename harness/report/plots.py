"""Leaderboard plots (matplotlib, Agg): accuracy by scheme per variant, and accuracy against
memory and decode latency with the Pareto front, as PNG and SVG beside the tables.

Error bars are the table's intervals. Output is byte-identical across reruns with the same
matplotlib: the SVG id salt is fixed and the date/software metadata left out.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .board import AVG, Board

SVG_SALT = "qvlm-bench"
_RC = {"svg.hashsalt": SVG_SALT, "font.size": 9, "axes.grid": True, "grid.alpha": 0.3,
       "axes.spines.top": False, "axes.spines.right": False, "figure.dpi": 100,
       "svg.fonttype": "none"}  # text as text: a third of the bytes, and searchable in a paper
_META = {"png": {"Software": None}, "svg": {"Date": None, "Creator": "qvlm-bench"}}


def pareto_front(cost: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Mask of the points no other point beats: none has cost ≤ and value ≥ with one strictly better."""
    cost, value = np.asarray(cost, float), np.asarray(value, float)
    le = cost[None, :] <= cost[:, None]
    ge = value[None, :] >= value[:, None]
    strict = (cost[None, :] < cost[:, None]) | (value[None, :] > value[:, None])
    return ~(le & ge & strict).any(axis=1)


def _save(fig, output: Path, stem: str) -> dict[str, Path]:
    paths = {}
    for ext in ("png", "svg"):
        path = output / f"{stem}.{ext}"
        # constrained layout already fits the outside legend: no bbox_inches="tight" (another draw)
        # 100 dpi: a screen's worth (the SVG beside it is the print copy); 150 doubled the bytes
        fig.savefig(path, format=ext, metadata=_META[ext], dpi=100 if ext == "png" else None)
        paths[f"{stem}.{ext}"] = path
    return paths


def _colors(names: list[str]) -> dict[str, tuple]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {n: cmap(i % cmap.N) for i, n in enumerate(names)}


def _yerr(t, idx, col):
    v, lo, hi = t.at[idx, col], t.at[idx, f"{col} lo"], t.at[idx, f"{col} hi"]
    if np.isnan(lo) or np.isnan(hi):
        return v, (0.0, 0.0)
    return v, (max(v - lo, 0.0), max(hi - v, 0.0))


def plot_by_scheme(board: Board, output: Path) -> dict[str, Path]:
    """Per model (rows) and column (Avg, then each task): accuracy of each variant per scheme."""
    import matplotlib.pyplot as plt

    t = board.table
    cols = [AVG, *board.tasks]
    models = list(dict.fromkeys(i[0] for i in t.index))
    refs = set(board.references.values())
    variants = list(dict.fromkeys(i[1] for i in t.index if i not in refs))
    colors = _colors(variants)
    fig, axes = plt.subplots(len(models), len(cols), figsize=(3.6 * len(cols), 3.2 * len(models)),
                             squeeze=False, sharex="row", layout="constrained")
    for m, model in enumerate(models):
        rows = [i for i in t.index if i[0] == model and i not in refs]
        schemes = sorted({i[2] for i in rows}, key=lambda s: board.bits.get(next(i for i in rows if i[2] == s)))
        pos = {s: j for j, s in enumerate(schemes)}
        vs = [v for v in variants if any(i[1] == v for i in rows)]
        width = 0.6 / max(len(vs), 1)
        for c, col in enumerate(cols):
            ax = axes[m, c]
            ref = board.references.get(model)
            if ref is not None and ref in t.index and not np.isnan(t.at[ref, col]):
                v, lo, hi = t.at[ref, col], t.at[ref, f"{col} lo"], t.at[ref, f"{col} hi"]
                ax.axhline(v, color="0.3", ls="--", lw=1, label=ref[1] if "reference" in ref[1] else f"{ref[1]} (reference)")
                if not np.isnan(lo):
                    ax.axhspan(lo, hi, color="0.5", alpha=0.12, lw=0)
            for k, variant in enumerate(vs):
                pts = sorted((pos[i[2]], i) for i in rows if i[1] == variant and not np.isnan(t.at[i, col]))
                if not pts:
                    continue
                x = np.array([p for p, _ in pts]) + (k - (len(vs) - 1) / 2) * width
                vals = [_yerr(t, i, col) for _, i in pts]
                y = [v for v, _ in vals]
                err = np.array([e for _, e in vals]).T
                ax.errorbar(x, y, yerr=err, fmt="-o", ms=3.5, lw=1, capsize=2, color=colors[variant],
                            label=variant)
            ax.set_xticks(range(len(schemes)), [s.upper() for s in schemes])
            ax.set_title(f"{model}: {col}" if len(models) > 1 else col, fontsize=10)
            if c == 0:
                ax.set_ylabel("accuracy (%)")
            if m == len(models) - 1:
                ax.set_xlabel("scheme (weight / activation bits)")
    handles: dict = {}  # legend label -> its first handle
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), loc="outside right center", fontsize=8, frameon=False)
    fig.suptitle(f"Accuracy by scheme ({100 * board.level:g} % intervals)", fontsize=11)
    try:
        return _save(fig, output, "accuracy_by_scheme")
    finally:
        plt.close(fig)


def plot_cost(board: Board, output: Path) -> dict[str, Path]:
    """Avg accuracy against peak memory and decode latency, Pareto front marked; {} without perf.

    Colour: variant (as in the scheme plot; the reference in black); marker: scheme. Only the
    front's points are labelled, so a crowded plot stays readable.
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    t = board.table
    axes_spec = [(c, lab) for c, lab in (("peak GiB", "peak memory (GiB)"), ("decode ms/tok", "decode latency (ms/token)"))
                 if c in t and t[c].notna().any()]
    if not axes_spec:
        return {}
    refs = set(board.references.values())
    models = list(dict.fromkeys(i[0] for i in t.index))
    colors = _colors(list(dict.fromkeys(i[1] for i in t.index if i not in refs)))
    schemes = sorted(dict.fromkeys(i[2] for i in t.index), key=lambda s: max(
        board.bits.get(i, (0, 0)) for i in t.index if i[2] == s), reverse=True)
    markers = dict(zip(schemes, "*osD^vPX<>ph"))
    fig, axes = plt.subplots(1, len(axes_spec), figsize=(5.2 * len(axes_spec), 4.2), squeeze=False,
                             layout="constrained")
    used = set()
    for ax, (col, label) in zip(axes[0], axes_spec):
        rows = [i for i in t.index if not np.isnan(t.at[i, col]) and not np.isnan(t.at[i, AVG])]
        if not rows:
            ax.set_visible(False)
            continue
        cost = np.array([t.at[i, col] for i in rows])
        acc = np.array([t.at[i, AVG] for i in rows])
        front = pareto_front(cost, acc)
        order = np.argsort(cost[front], kind="stable")
        ax.step(cost[front][order], acc[front][order], where="post", color="k", lw=1, alpha=0.5, zorder=1)
        for i, x, on_front in zip(rows, cost, front):
            v, err = _yerr(t, i, AVG)
            color = "k" if i in refs else colors[i[1]]
            ax.errorbar([x], [v], yerr=np.array(err)[:, None], fmt=markers[i[2]], ms=6 if i[2] != schemes[0] else 9,
                        capsize=2, lw=0.8, color=color, zorder=3)
            used.add((i[1], i in refs))
            if on_front:
                ax.scatter([x], [v], s=170, facecolors="none", edgecolors="k", lw=1, zorder=2)
            if on_front or len(models) > 1:
                name = (f"{i[1]} {i[2].upper()}" if on_front else "") + (f" ({i[0]})" if len(models) > 1 else "")
                ax.annotate(name.strip(), (x, v), xytext=(6, 4), textcoords="offset points", fontsize=7)
        ax.set_xlabel(label)
        ax.set_ylabel(f"{AVG} accuracy (%)")
    handles = [Line2D([], [], color="k" if ref else colors[v], marker="o", ls="", label=v + (" (reference)" if ref and "reference" not in v else ""))
               for v, ref in sorted(used, key=lambda u: (not u[1], u[0]))]
    handles += [Line2D([], [], color="0.4", marker=markers[s], ls="", label=s.upper()) for s in schemes]
    handles.append(Line2D([], [], color="k", lw=1, alpha=0.5, marker="o", mfc="none", ms=9, label="Pareto front"))
    fig.legend(handles=handles, loc="outside right center", fontsize=8, frameon=False)
    fig.suptitle("Accuracy against cost (circled: Pareto front — nothing cheaper is more accurate)", fontsize=11)
    try:
        return _save(fig, output, "accuracy_vs_cost")
    finally:
        plt.close(fig)


def write_plots(board: Board, output: str | Path) -> dict[str, Path]:
    """Write every plot the board has data for into ``output``; returns {file name: path}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    with plt.rc_context(_RC):
        paths = plot_by_scheme(board, output)
        paths.update(plot_cost(board, output))
    return paths
