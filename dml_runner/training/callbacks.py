"""Hydra callbacks: one summary table and metric-versus-parameter charts for a multirun sweep.

Failed jobs are listed, marked in the charts and make ``dml-run -m`` exit non-zero (see :data:`FAILED_JOBS`).
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from dml_runner.rundir import COMPLETED, read_results, split_override

log = logging.getLogger(__name__)

# Rows of the failed jobs of the last sweep that ended in this process; dml-run exits non-zero when non-empty.
FAILED_JOBS: list[dict[str, Any]] = []
METRICS = ("recall@1", "map@r", "nmi")


def collect_sweep(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job directory under ``sweep_dir``: overrides, status, final and best test metrics."""
    rows = []
    for job_dir in sorted((p for p in Path(sweep_dir).iterdir() if p.is_dir() and p.name.isdigit()),
                          key=lambda p: int(p.name)):
        row: dict[str, Any] = {"job": int(job_dir.name), "dir": str(job_dir)}
        res = read_results(job_dir)
        row["status"] = res.get("status", "unknown")
        overrides = res.get("overrides", [])
        row["overrides"] = " ".join(overrides)
        row["override_keys"] = [split_override(item)[0] for item in overrides]
        for item in overrides:  # one column per overridden key, so sweeps can be grouped and plotted
            key, value = split_override(item)
            row[key] = _parse_value(value)
        if row["status"] == COMPLETED:
            row.update({k: v for k, v in res["metrics"].items()})
            best = res.get("best") or {}
            if best:
                row["best_epoch"] = best.get("epoch")
                row["best_selected_on"] = best.get("split")
                row[f"best_{best.get('split')}/{best.get('metric')}"] = best.get("value")
                row.update({f"best/{k}": v for k, v in best.get("test_metrics", {}).items()})
            row["wall_time_s"] = res.get("wall_time_s")
        else:
            row["error"] = res.get("error")
        rows.append(row)
    return rows


def _parse_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def swept_params(frame: Any, rows: list[dict[str, Any]]) -> list[tuple[str, bool]]:
    """(override key, numeric?) of every key (seeds excepted) that takes several values across the jobs."""
    keys = {k for r in rows for k in r.get("override_keys", [])}
    out = []
    for key in sorted(keys):
        if key.endswith("seed") or key not in frame:
            continue
        values = frame[key].dropna()
        if values.nunique() > 1:
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            out.append((key, numeric))
    return out


def log_scale(param: str, values: Any) -> bool:
    """Learning-rate-like parameters (and any positive values spanning more than two decades) get a log axis."""
    positive = [float(v) for v in values if isinstance(v, (int, float)) and v > 0]
    if not positive or len(positive) != len(list(values)):
        return False
    leaf = param.split(".")[-1]
    if leaf in ("lr", "weight_decay", "eps", "eta_min") or leaf.endswith(("_lr", "lr_mult")):
        return True
    return max(positive) / min(positive) > 100


def plot_sweep_summary(frame: Any, param: str, numeric: bool, out_png: Path, title: str) -> Path | None:
    """Mean (+/- std over repeats such as seeds) of R@1, MAP@R and NMI against one swept parameter.

    A numeric parameter gives a line (log axis for learning-rate-like ones), a categorical one a bar chart; the
    values whose jobs failed are marked with a red x on the axis and named in the legend.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = frame[frame["status"] == "completed"]
    failed = frame[(frame["status"] != "completed") & frame[param].notna()] if param in frame else frame.iloc[:0]
    metrics = [m for m in METRICS if m in done]
    if not metrics:
        metrics = list(METRICS[:1])
    values = sorted(frame[param].dropna().unique(), key=lambda v: (not numeric, v if numeric else str(v)))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.6), squeeze=False)
    use_log = numeric and log_scale(param, values)
    for ax, metric in zip(axes[0], metrics):
        stats = done.groupby(param)[metric].agg(["mean", "std"]) if metric in done and not done.empty else None
        if numeric:
            if stats is not None and not stats.empty:
                stats = stats.sort_index()
                ax.errorbar(stats.index, 100 * stats["mean"], yerr=100 * stats["std"].fillna(0), marker="o",
                            capsize=3, label="completed")
            if use_log:
                ax.set_xscale("log")
            positions = {v: v for v in values}
        else:
            positions = {v: i for i, v in enumerate(values)}
            if stats is not None and not stats.empty:
                shown = [v for v in values if v in stats.index]
                ax.bar([positions[v] for v in shown], [100 * stats.loc[v, "mean"] for v in shown],
                       yerr=[100 * (0 if math.isnan(stats.loc[v, "std"]) else stats.loc[v, "std"]) for v in shown],
                       capsize=3, color="tab:blue", label="completed")
            ax.set_xticks(range(len(values)))
            ax.set_xticklabels([str(v) for v in values], rotation=30 if len(values) > 4 else 0, ha="right"
                               if len(values) > 4 else "center", fontsize=8)
        if not failed.empty:
            xs = [positions[v] for v in failed[param] if v in positions]
            ax.plot(xs, [0.02] * len(xs), "x", color="tab:red", markersize=10, mew=2, linestyle="none",
                    transform=ax.get_xaxis_transform(), label=f"failed ({len(failed)} job(s))", clip_on=False)
        ax.set_xlabel(param + (" (log scale)" if use_log else ""))
        ax.set_ylabel(f"test {metric} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)


def _describe_failure(row: dict[str, Any]) -> str:
    text = f"job {row['job']} ({row.get('overrides') or 'no overrides'}): {row['status']}"
    return text + (f": {row['error']}" if row.get("error") else "")


def sweep_jobs(task_overrides: list[str]) -> list[list[str]]:
    """The override lists of the jobs a basic-sweeper multirun will launch (``a=1,2 b=x,y``: four jobs)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(task_overrides))
    return [job for batch in BasicSweeper.split_arguments(parsed, max_batch_size=None) for job in batch]


def check_sweep(config: DictConfig, config_name: str | None) -> list[str]:
    """Compose and check every job of a basic-sweeper multirun before the first one starts; one line per bad job."""
    from hydra import compose

    from dml_runner import DMLRunnerError
    from dml_runner.config import validate_config

    if not str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return []  # other sweepers (Optuna) draw their jobs as they go
    problems = []
    for num, overrides in enumerate(sweep_jobs(list(config.hydra.overrides.task))):
        try:
            validate_config(compose(config_name=config_name or "config", overrides=overrides))
        except DMLRunnerError as err:
            problems.append(f"job {num} ({' '.join(overrides)}): {err}")
    return problems


class SweepSummary(Callback):
    """Checks every job of a sweep before the first one starts; writes ``summary.csv`` and one chart per swept
    parameter into the sweep directory when a multirun ends, and lists the failed jobs (also recorded in
    :data:`FAILED_JOBS`, so that dml-run exits non-zero)."""

    def on_multirun_start(self, config: DictConfig, config_name: str | None = None, **kwargs: Any) -> None:
        problems = check_sweep(config, config_name)
        if problems:
            print(f"dml-run: error: {len(problems)} sweep job(s) would fail their config checks; no job was "
                  "started:", file=sys.stderr)
            for line in problems:
                print(f"  {line}", file=sys.stderr)
            raise SystemExit(1)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        import pandas as pd

        FAILED_JOBS.clear()
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = collect_sweep(sweep_dir)
        if not rows:
            return
        frame = pd.DataFrame(rows)
        frame.drop(columns=["override_keys"], errors="ignore").to_csv(sweep_dir / "summary.csv", index=False)
        failed = [r for r in rows if r["status"] != "completed"]
        FAILED_JOBS.extend(failed)
        for param, numeric in swept_params(frame, rows):
            title = f"sweep over {param}: {len(frame) - len(failed)} of {len(frame)} jobs completed"
            if failed:
                title += f", {len(failed)} failed (x)"
            try:
                png = plot_sweep_summary(frame, param, numeric, sweep_dir / f"sweep_{param}.png", title)
            except Exception as err:  # noqa: BLE001 - a plotting failure never hides the summary
                log.warning("could not plot the sweep over %s: %s", param, err)
                continue
            if png:
                print(f"sweep plot: {png}")
        shown = [c for c in ("job", "status", "overrides", "recall@1", "nmi", "map@r") if c in frame]
        print(f"sweep summary: {sweep_dir / 'summary.csv'}")
        print(frame[shown].to_string(index=False))
        if failed:
            print(f"dml-run: {len(failed)} of {len(rows)} sweep jobs did not complete:", file=sys.stderr)
            for row in failed:
                print(f"  {_describe_failure(row)}", file=sys.stderr)
