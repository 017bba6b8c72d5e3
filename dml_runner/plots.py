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
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)


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
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)
