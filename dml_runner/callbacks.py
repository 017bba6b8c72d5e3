"""Hydra callbacks: one summary table for a multirun sweep."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def collect_sweep(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job directory under ``sweep_dir``: overrides, status, final and best test metrics."""
    rows = []
    for job_dir in sorted((p for p in Path(sweep_dir).iterdir() if p.is_dir() and p.name.isdigit()),
                          key=lambda p: int(p.name)):
        path = job_dir / "results.json"
        row: dict[str, Any] = {"job": int(job_dir.name), "dir": str(job_dir)}
        if not path.exists():
            row["status"] = "failed"
            row["error"] = "no results.json (the job crashed or was killed)"
            rows.append(row)
            continue
        res = json.loads(path.read_text())
        row["status"] = res.get("status", "unknown")
        overrides = res.get("overrides", [])
        row["overrides"] = " ".join(overrides)
        row["override_keys"] = [item.partition("=")[0].lstrip("+~") for item in overrides]
        for item in overrides:  # one column per overridden key, so sweeps can be grouped and plotted
            key, _, value = item.partition("=")
            row[key.lstrip("+~")] = _parse_value(value)
        if row["status"] == "completed":
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


def swept_numeric_params(frame: Any, rows: list[dict[str, Any]]) -> list[str]:
    """Override keys (seeds excepted) that take several numeric values across the jobs: the x axes of sweep plots."""
    keys = {k for r in rows for k in r.get("override_keys", [])}
    out = []
    for key in sorted(keys):
        if key.endswith("seed"):
            continue
        values = frame[key].dropna()
        if values.nunique() > 1 and all(isinstance(v, (int, float)) for v in values):
            out.append(key)
    return out


class SweepSummary(Callback):
    """Writes ``summary.csv`` into the sweep directory when a multirun ends (failed jobs included)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        import pandas as pd

        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = collect_sweep(sweep_dir)
        if not rows:
            return
        frame = pd.DataFrame(rows)
        frame.drop(columns=["override_keys"], errors="ignore").to_csv(sweep_dir / "summary.csv", index=False)
        from dml_runner.plots import plot_sweep

        for param in swept_numeric_params(frame, rows):
            png = plot_sweep(frame, param, sweep_dir / f"sweep_{param}.png")
            if png:
                print(f"sweep plot: {png}")
        shown = [c for c in ("job", "status", "overrides", "recall@1", "nmi", "map@r") if c in frame]
        print(f"sweep summary: {sweep_dir / 'summary.csv'}")
        print(frame[shown].to_string(index=False))
