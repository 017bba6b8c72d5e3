"""The sweep summary: failed jobs are listed, counted for the exit status and marked in the charts; charts have
titles, a log axis for learning rates and a bar chart for categorical sweeps."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from dml_runner.training import callbacks


def _job(sweep, num, overrides, status="completed", recall=None, hydra_only=False):
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if hydra_only:  # crashed before writing anything
        return
    res = {"status": status, "overrides": overrides}
    if status == "completed":
        res.update(metrics={"recall@1": recall, "map@r": recall / 2, "nmi": recall / 3}, best=None, wall_time_s=1)
    else:
        res["error"] = "DMLRunnerError: boom"
    (job / "results.json").write_text(json.dumps(res))


@pytest.fixture
def figures(monkeypatch):
    """Every figure the summary saves, kept for inspection instead of only written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    saved = {}
    real = Figure.savefig

    def keep(fig, path, *args, **kwargs):
        saved[str(path).rsplit("/", 1)[-1]] = fig
        return real(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return saved


def test_failed_jobs_are_listed_counted_and_marked(tmp_path, capsys, figures):
    sweep = tmp_path / "sweep"
    _job(sweep, 0, ["optimizer.lr=1e-05"], recall=0.5)
    _job(sweep, 1, ["optimizer.lr=0.0001"], recall=0.7)
    _job(sweep, 2, ["optimizer.lr=0.001"], status="failed")
    _job(sweep, 3, ["optimizer.lr=0.01"], hydra_only=True)
    callbacks.SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    err = capsys.readouterr().err
    assert "2 of 4 sweep jobs did not complete" in err
    assert "job 2 (optimizer.lr=0.001): failed: DMLRunnerError: boom" in err
    assert "job 3 (optimizer.lr=0.01): failed: no results.json" in err
    assert [r["job"] for r in callbacks.FAILED_JOBS] == [2, 3]
    fig = figures["sweep_optimizer.lr.png"]
    assert "2 failed" in fig._suptitle.get_text()
    for ax in fig.axes:
        assert ax.get_xscale() == "log"
        marks = [line for line in ax.get_lines() if line.get_label().startswith("failed")]
        assert len(marks) == 1 and sorted(marks[0].get_xdata()) == [0.001, 0.01]


def test_a_categorical_sweep_gets_a_bar_chart(tmp_path, figures):
    sweep = tmp_path / "sweep"
    for num, (loss, seed, recall) in enumerate([("contrastive", 0, 0.5), ("contrastive", 1, 0.6),
                                                ("triplet", 0, 0.8), ("triplet", 1, 0.9)]):
        _job(sweep, num, [f"loss={loss}", f"trainer.seed={seed}"], recall=recall)
    callbacks.SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    assert not callbacks.FAILED_JOBS and list(figures) == ["sweep_loss.png"]  # seeds are repeats, not a sweep
    ax = figures["sweep_loss.png"].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["contrastive", "triplet"]
    heights = [bar.get_height() for bar in ax.patches]
    assert heights == pytest.approx([55.0, 85.0])  # mean over the seeds


def test_log_axis_rule():
    assert callbacks.log_scale("optimizer.lr", [1e-4, 1e-3])
    assert callbacks.log_scale("method.num_clusters", [1, 1000])
    assert not callbacks.log_scale("method.num_clusters", [1, 2, 4, 8])
    assert not callbacks.log_scale("loss.margin", [0.0, 0.1])
