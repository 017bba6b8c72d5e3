"""PNG figures: learning curves of a run and metric-versus-parameter curves of a sweep (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_png: Path, title: str = "", dpi: int = 110) -> Path:
    """Title, tight layout, write the PNG, free the figure."""
    plt = _pyplot()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=dpi)
    plt.close(fig)
    return Path(out_png)


def plot_learning_curves(history: pd.DataFrame, out_png: Path,
                         metrics: Sequence[str] = ("recall@1", "nmi"), title: str = "") -> Path | None:
    """R@1 and NMI (by default) per evaluation, for every split in the history (HDML paper Figures 4-5)."""
    columns = [c for c in history.columns if "/" in c and c.split("/", 1)[1] in metrics]
    if not columns:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for col in [c for c in columns if c.endswith("/" + metric)]:
            rows = history[["epoch", col]].dropna()
            ax.plot(rows["epoch"], 100 * rows[col], marker="o", label=col.split("/")[0])
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{metric} (%)")
        ax.grid(alpha=0.3)
        ax.legend()
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


# --- paper-table figures (issue 9): used by dml-report -------------------------------------------------------------

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
            ax.plot(mean.index, mean, marker="o", ms=3, label=f"{name} (n={len(parts)})")
            ax.fill_between(mean.index, mean - std, mean + std, alpha=0.2)
            drawn = True
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{split} {metric} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if not drawn:
        plt.close(fig)
        return None
    return _save(fig, out_png, title)


def plot_tsne(embeddings: "np.ndarray", labels: "np.ndarray", out_png: Path, max_points: int = 1000,
              max_classes: int = 20, seed: int = 0, title: str = "") -> Path:
    """2-D t-SNE (scikit-learn) of test embeddings coloured by class, on a subsample (HDML paper Figure 8).

    Keeps at most ``max_classes`` classes (the most frequent) and ``max_points`` points so it stays fast on a CPU.
    """
    import numpy as np
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    keep_classes = classes[np.argsort(-counts, kind="stable")[:max_classes]]
    idx = np.flatnonzero(np.isin(labels, keep_classes))
    if idx.size > max_points:
        idx = np.sort(rng.choice(idx, max_points, replace=False))
    x = np.asarray(embeddings, dtype=np.float32)[idx]
    perplexity = float(max(1.0, min(30.0, (len(idx) - 1) / 3)))
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x) \
        if len(idx) > 2 else np.zeros((len(idx), 2))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    cmap = plt.get_cmap("tab20")
    for k, c in enumerate(keep_classes):
        sel = labels[idx] == c
        ax.scatter(xy[sel, 0], xy[sel, 1], s=8, color=cmap(k % 20), label=str(c))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"t-SNE of test embeddings ({len(idx)} points, {len(keep_classes)} classes)", fontsize=9)
    if len(keep_classes) <= 20:
        ax.legend(fontsize=6, markerscale=1.5, ncol=2, loc="best")
    return _save(fig, out_png)


def plot_retrieval_grid(queries: Sequence[int], neighbours: "np.ndarray", labels: "np.ndarray", load_image,
                        out_png: Path, title: str = "") -> Path:
    """One row per query: the query image, then its top-k retrieved images framed green (same class) or red.

    ``neighbours[i]`` are the dataset indices retrieved for ``queries[i]``; ``load_image(index)`` returns an
    HxW or HxWxC array (or a PIL image).
    """
    import numpy as np

    plt = _pyplot()
    k = neighbours.shape[1]
    fig, axes = plt.subplots(len(queries), k + 1, figsize=(1.6 * (k + 1), 1.7 * len(queries)), squeeze=False)
    for r, q in enumerate(queries):
        for c, index in enumerate([q, *neighbours[r]]):
            ax = axes[r][c]
            img = np.asarray(load_image(int(index)))
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                colour, width = "black", 2
                ax.set_title(f"query ({labels[q]})", fontsize=7)
            else:
                colour = "tab:green" if labels[index] == labels[q] else "tab:red"
                width = 4
                ax.set_title(f"#{c} ({labels[index]})", fontsize=7)
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(width)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)
