"""learning_curves.png of a run: training loss, R@1, MAP@R and NMI per epoch, the selected checkpoint marked."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

PANELS = ("train_loss", "recall@1", "map@r", "nmi")
SPLIT_STYLE = {"test": ("tab:blue", "o"), "val": ("tab:orange", "s")}


def plot_learning_curves(history: pd.DataFrame, out_png: Path, best: dict[str, Any] | None = None,
                         panels: Sequence[str] = PANELS, title: str = "") -> Path | None:
    """One panel per quantity (epochs on an integer axis; epoch 0 is the untrained network), one line per split.

    ``best`` is results.json's ``best`` entry: its epoch is marked in every panel with the split that chose it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)
