"""PNG figures (matplotlib, Agg): a run's learning curves, a sweep's metric-versus-parameter curves, the report's
curves per row, t-SNE panels and retrieval grids."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def wrap(text: str, width: int) -> str:
    """``text`` broken into lines of at most ``width`` characters (at spaces where it can): long row names as legend
    entries and titles stay inside their figure."""
    import textwrap

    return "\n".join(textwrap.fill(line, width, break_long_words=True, break_on_hyphens=False)
                     for line in str(text).splitlines() or [""])


def _save(fig, out_png: Path, title: str = "", dpi: int = 110) -> Path:
    """Title (wrapped to the figure's width), tight layout, write the PNG (grown to hold every legend and title),
    free the figure."""
    plt = _pyplot()
    if title:
        fig.suptitle(wrap(title, max(30, int(fig.get_figwidth() * 9))))
    fig.tight_layout()
    fig.savefig(out_png, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return Path(out_png)


LEARNING_CURVE_PANELS = ("train_loss", "recall@1", "map@r", "nmi")
SPLIT_STYLE = {"test": ("tab:blue", "o"), "val": ("tab:orange", "s")}


def plot_learning_curves(history: pd.DataFrame, out_png: Path, best: dict[str, Any] | None = None,
                         panels: Sequence[str] = LEARNING_CURVE_PANELS, title: str = "") -> Path | None:
    """A run's learning_curves.png: one panel per quantity (training loss, R@1, MAP@R and NMI by default; epochs on
    an integer axis, epoch 0 is the untrained network), one line per split.

    ``best`` is results.json's ``best`` entry: its epoch is marked in every panel with the split that chose it.
    """
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    if history.empty or "epoch" not in history:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.3), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "train_loss":
            rows = history[["epoch", "train_loss"]].dropna() if "train_loss" in history else history.iloc[:0]
            ax.plot(rows["epoch"], rows["train_loss"], marker=".", color="tab:gray", label="train")
            ax.set_ylabel("training loss")
        else:
            for split, (colour, marker) in SPLIT_STYLE.items():
                col = f"{split}/{panel}"
                if col in history:
                    rows = history[["epoch", col]].dropna()
                    ax.plot(rows["epoch"], 100 * rows[col], marker=marker, color=colour, label=split)
            ax.set_ylabel(f"{panel} (%)")
        if best and best.get("epoch") is not None:
            chosen = "final epoch" if best.get("split") == "final" else f"best on {best.get('split')}"
            ax.axvline(best["epoch"], color="tab:green", linestyle="--", linewidth=1,
                       label=f"selected: epoch {best['epoch']} ({chosen})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return _save(fig, out_png, title)


def plot_sweep(summary: pd.DataFrame, param: str, out_png: Path,
               metrics: Sequence[str] = ("recall@1", "nmi"), group_by: str | None = None) -> Path | None:
    """Mean (+/- std over repeated values, e.g. seeds) of each metric against a swept numeric parameter."""
    done = summary[summary["status"] == "completed"]
    metrics = [m for m in metrics if m in done]
    if done.empty or not metrics:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.5), squeeze=False)
    groups = done.groupby(group_by) if group_by else [("", done)]
    for ax, metric in zip(axes[0], metrics):
        for name, part in groups:
            stats = part.groupby(param)[metric].agg(["mean", "std"]).sort_index()
            ax.errorbar(stats.index, 100 * stats["mean"], yerr=100 * stats["std"].fillna(0), marker="o",
                        capsize=3, label=str(name) if group_by else None)
        ax.set_xlabel(param)
        ax.set_ylabel(f"{metric} (%)")
        ax.grid(alpha=0.3)
        if group_by:
            ax.legend()
    return _save(fig, out_png)


# --- paper-table figures: used by dml-report ------------------------------------------------------------------------

def plot_curves_by_group(histories: dict[str, list[pd.DataFrame]], out_png: Path,
                         metrics: Sequence[str] = ("recall@1",), split: str = "test", title: str = "") -> Path | None:
    """Mean (band: +/- std over seeds) of ``<split>/<metric>`` per epoch, one line per group (table row)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 3.8), squeeze=False)
    drawn = False
    for ax, metric in zip(axes[0], metrics):
        col = f"{split}/{metric}"
        for name, frames in histories.items():
            parts = [f[["epoch", col]].dropna().set_index("epoch")[col] for f in frames if col in f]
            if not parts:
                continue
            stacked = pd.concat(parts, axis=1)
            mean, std = 100 * stacked.mean(axis=1), 100 * stacked.std(axis=1).fillna(0)
            ax.plot(mean.index, mean, marker="o", ms=3, label=wrap(f"{name} (n={len(parts)})", 60))
            ax.fill_between(mean.index, mean - std, mean + std, alpha=0.2)
            drawn = True
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{split} {metric} (%)")
        ax.grid(alpha=0.3)
    if not drawn:
        plt.close(fig)
        return None
    # one legend for every panel, under them: long row names never cover the curves or squeeze the panels
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.tight_layout()
    fig.legend(handles, labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, 0.0), frameon=False,
               ncol=max(1, min(len(labels), int(fig.get_figwidth() // 4.5))))
    return _save(fig, out_png, title)


def tsne_2d(x: "np.ndarray", perplexity: float = 30.0, iterations: int = 300, exaggerated: int = 100,
            seed: int = 0) -> "np.ndarray":
    """Exact t-SNE (van der Maaten & Hinton 2008) of a few hundred points, vectorised in numpy.

    Gaussian affinities at the given perplexity (bisection on every row at once), symmetrised; Student-t affinities
    in 2-D; gradient descent with momentum 0.5 -> 0.8, per-coordinate gains, early exaggeration 12 for the first
    ``exaggerated`` iterations and PCA initialisation scaled to std 1e-4 (scikit-learn's settings, with fewer
    iterations: a few hundred points converge in 300). On 300 points it takes a fraction of a second, where
    scikit-learn's Barnes-Hut version takes seconds.
    """
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if n < 3:
        return np.zeros((n, 2))
    perplexity = float(min(perplexity, (n - 1) / 3))
    sq = np.square(x).sum(1)
    d = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0)
    np.fill_diagonal(d, np.inf)
    target = np.log(perplexity)
    lo, hi = np.full(n, 1e-20), np.full(n, 1e20)
    beta = np.ones(n) / max(np.median(d[np.isfinite(d)]), 1e-12)
    for _ in range(64):  # bisection on the precision of every row: entropy(P_i) = log(perplexity)
        logits = -d * beta[:, None]
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(1, keepdims=True)
        entropy = -(p * np.log(np.maximum(p, 1e-300))).sum(1)
        too_flat = entropy > target  # precision too low
        lo = np.where(too_flat, beta, lo)
        hi = np.where(too_flat, hi, beta)
        beta = np.where(hi >= 1e20, beta * 2, (lo + hi) / 2)
    p = (p + p.T) / (2 * n)
    p = np.maximum(p, 1e-12)
    centred = x - x.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    y = centred @ vt[:2].T if vt.shape[0] >= 2 else np.random.default_rng(seed).normal(size=(n, 2))
    y = y / max(y[:, 0].std(), 1e-12) * 1e-4
    p, y = p.astype(np.float32), y.astype(np.float32)
    p_exaggerated = 12.0 * p
    velocity, gains = np.zeros_like(y), np.ones_like(y)
    learning_rate = np.float32(max(n / 12.0 / 4.0, 50.0))
    num = np.empty((n, n), dtype=np.float32)
    for it in range(iterations):
        target_p, momentum = (p_exaggerated, 0.5) if it < exaggerated else (p, 0.8)
        sy = np.square(y).sum(1)
        np.matmul(y, y.T, out=num)  # Student-t kernel 1 / (1 + |y_i - y_j|^2), in place
        num *= -2.0
        num += sy[:, None]
        num += sy[None, :] + 1.0
        np.reciprocal(num, out=num)
        np.fill_diagonal(num, 0.0)
        w = num * (target_p - num / num.sum())  # (P - Q) * kernel
        grad = 4.0 * (w.sum(1)[:, None] * y - w @ y)
        same_sign = np.sign(grad) == np.sign(velocity)
        gains = np.maximum(np.where(same_sign, gains * 0.8, gains + 0.2), 0.01)
        velocity = momentum * velocity - learning_rate * gains * grad
        y = y + velocity
    return y - y.mean(0)


def subsample_by_class(labels: "np.ndarray", max_points: int, max_classes: int, seed: int = 0) -> "np.ndarray":
    """Indices of at most ``max_points`` items from at most ``max_classes`` classes (the most frequent), spread evenly
    over those classes so that each one shows."""
    import numpy as np

    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    keep = classes[np.argsort(-counts, kind="stable")[:max_classes]]
    per_class = max(1, max_points // max(len(keep), 1))
    idx = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in keep]
    return np.sort(np.concatenate(idx)) if idx else np.zeros(0, dtype=int)


def plot_tsne(embeddings: "np.ndarray", labels: "np.ndarray", out_png: Path, max_points: int = 300,
              max_classes: int = 20, seed: int = 0, title: str = "") -> Path:
    """2-D t-SNE of test embeddings coloured by class, on a class-balanced subsample (HDML paper Figure 8)."""
    return plot_tsne_panels([(title, embeddings, labels)], out_png, max_points, max_classes, seed)


def plot_tsne_panels(panels: Sequence[tuple[str, "np.ndarray", "np.ndarray"]], out_png: Path, max_points: int = 300,
                     max_classes: int = 20, seed: int = 0, title: str = "") -> Path:
    """One t-SNE panel per ``(title, embeddings, labels)``, side by side in one PNG (one per table row)."""
    import numpy as np

    plt = _pyplot()
    cols = min(len(panels), 4)
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.2 * rows), squeeze=False)
    cmap = plt.get_cmap("tab20")
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (name, embeddings, labels) in zip(axes.flat, panels):
        labels = np.asarray(labels)
        idx = subsample_by_class(labels, max_points, max_classes, seed)
        xy = tsne_2d(np.asarray(embeddings)[idx], seed=seed)
        classes = list(dict.fromkeys(np.sort(np.unique(labels[idx]))))
        for k, c in enumerate(classes):
            sel = labels[idx] == c
            ax.scatter(xy[sel, 0], xy[sel, 1], s=7, color=cmap(k % 20), label=str(c))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{wrap(name, 42)}\n({len(idx)} points, {len(classes)} classes)" if name else
                     f"t-SNE of test embeddings ({len(idx)} points, {len(classes)} classes)", fontsize=8)
        if len(classes) <= 10:
            ax.legend(fontsize=6, markerscale=1.5, loc="upper right")
    return _save(fig, out_png, title, dpi=80)


def _to_rgb(img, size: int) -> "np.ndarray":
    """An HxW / HxWxC array or PIL image as a ``size`` x ``size`` uint8 RGB array (aspect kept, padded white)."""
    import numpy as np
    from PIL import Image

    if not hasattr(img, "convert"):
        arr = np.asarray(img, dtype=np.float64)
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if arr.dtype != np.uint8:
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            arr = (255 * (arr - lo) / (hi - lo if hi > lo else 1.0)).astype(np.uint8)
        img = Image.fromarray(arr)
    img = img.convert("RGB")
    img.thumbnail((size, size), Image.Resampling.NEAREST if max(img.size) < size else Image.Resampling.BILINEAR)
    if max(img.size) < size:  # small images (digits: 8 x 8) are scaled up
        scale = size / max(img.size)
        img = img.resize((max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))),
                         Image.Resampling.NEAREST)
    canvas = Image.new("RGB", (size, size), "white")
    canvas.paste(img, ((size - img.size[0]) // 2, (size - img.size[1]) // 2))
    return np.asarray(canvas)


GRID_BORDER, GRID_CAPTION, GRID_PAD, GRID_GAP, GRID_TITLE = 4, 14, 4, 12, 22
GRID_COLOURS = {"query": (40, 40, 40), "hit": (44, 160, 44), "miss": (214, 39, 40), "unknown": (150, 150, 150)}


def retrieval_grid_size(n_queries: int, k: int, cell: int = 96, title: bool = True) -> tuple[int, int]:
    """``(width, height)`` in pixels of :func:`plot_retrieval_grid`'s PNG for ``n_queries`` rows of 1 + ``k`` cells."""
    w = GRID_PAD + (k + 1) * (cell + 2 * GRID_BORDER + GRID_PAD) + GRID_GAP
    h = (GRID_TITLE if title else 0) + GRID_PAD + n_queries * (cell + 2 * GRID_BORDER + GRID_CAPTION + GRID_PAD)
    return w, h


def retrieval_grid_cell(row: int, column: int, cell: int = 96, title: bool = True) -> tuple[int, int]:
    """``(x, y)`` of the top-left corner of the frame of a cell (column 0 = the query)."""
    x = GRID_PAD + column * (cell + 2 * GRID_BORDER + GRID_PAD) + (GRID_GAP if column else 0)
    y = (GRID_TITLE if title else 0) + GRID_PAD + row * (cell + 2 * GRID_BORDER + GRID_CAPTION + GRID_PAD)
    return x, y + GRID_CAPTION


def plot_retrieval_grid(queries: Sequence[int], neighbours: "np.ndarray", labels: "np.ndarray", load_image,
                        out_png: Path, title: str = "", cell: int = 96, names: Sequence[str] | None = None,
                        distances: "np.ndarray | None" = None) -> Path:
    """One row per query: the query image, then its top-k retrieved images framed green (same class) or red.

    ``neighbours[i]`` are the dataset indices retrieved for ``queries[i]``; ``load_image(index)`` returns an
    HxW or HxWxC array (or a PIL image). A query with a negative label (class unknown) frames its neighbours grey.
    Captions show ``names[index]`` (default: the label) and, when given, ``distances[i, j]``. Composed with PIL (no
    matplotlib axes: tens of grids take well under a second); the size is :func:`retrieval_grid_size`.
    """
    from PIL import Image, ImageDraw

    k = neighbours.shape[1]
    border = GRID_BORDER
    canvas = Image.new("RGB", retrieval_grid_size(len(queries), k, cell, bool(title)), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((GRID_PAD, 4), title, fill="black")

    def name(index: int) -> str:
        return str(labels[index]) if names is None else str(names[index])

    for r, q in enumerate(queries):
        for c, index in enumerate([q, *neighbours[r]]):
            x, y = retrieval_grid_cell(r, c, cell, bool(title))
            kind = "query" if c == 0 else "unknown" if labels[q] < 0 else \
                ("hit" if labels[index] == labels[q] else "miss")
            draw.rectangle([x, y, x + cell + 2 * border - 1, y + cell + 2 * border - 1], fill=GRID_COLOURS[kind])
            canvas.paste(Image.fromarray(_to_rgb(load_image(int(index)), cell)), (x + border, y + border))
            if c == 0:
                text = f"query ({name(q)})" if name(q) else "query"
            else:
                dist = f" {distances[r][c - 1]:.3f}" if distances is not None else ""
                text = f"#{c}{dist} {name(index)}" if distances is not None else f"#{c} ({name(index)})"
            draw.text((x, y - GRID_CAPTION), text[: (cell + 2 * border) // 6],
                      fill="black" if c == 0 else GRID_COLOURS[kind])
    canvas.save(out_png, optimize=False)
    return Path(out_png)
