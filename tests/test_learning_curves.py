"""learning_curves.png: loss, R@1, MAP@R and NMI on an integer epoch axis, the selected checkpoint marked."""

from __future__ import annotations

import pandas as pd

from dml_runner.plots import plot_learning_curves


def test_learning_curves_show_every_panel_and_the_selected_epoch(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    saved = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (saved.append(fig), real(fig, *a, **k))[1])
    history = pd.DataFrame({"epoch": [0, 1, 2, 3], "train_loss": [float("nan"), 0.9, 0.5, 0.4],
                            "test/recall@1": [0.5, None, 0.7, 0.72], "test/map@r": [0.2, None, 0.3, 0.31],
                            "test/nmi": [0.4, None, 0.5, 0.52], "val/recall@1": [0.4, None, 0.6, 0.55]})
    out = plot_learning_curves(history, tmp_path / "c.png", best={"epoch": 2, "split": "val"}, title="t")
    assert out.is_file()
    axes = saved[0].axes
    assert [ax.get_ylabel() for ax in axes] == ["training loss", "recall@1 (%)", "map@r (%)", "nmi (%)"]
    for ax in axes:
        ticks = [t for t in ax.get_xticks() if 0 <= t <= 3]
        assert all(float(t).is_integer() for t in ticks)
        assert any(line.get_label() == "selected: epoch 2 (best on val)" for line in ax.get_lines())
    labels = {line.get_label() for line in axes[1].get_lines()}
    assert {"test", "val"} <= labels
