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
        row["overrides"] = " ".join(res.get("overrides", []))
        if row["status"] == "completed":
            row.update({k: v for k, v in res["metrics"].items()})
            best = res.get("best") or {}
            if best:
                row["best_epoch"] = best.get("epoch")
                row["best_selected_on"] = best.get("split")
                row.update({f"best/{k}": v for k, v in best.get("test_metrics", {}).items()})
            row["wall_time_s"] = res.get("wall_time_s")
        else:
            row["error"] = res.get("error")
        rows.append(row)
    return rows


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
        frame.to_csv(sweep_dir / "summary.csv", index=False)
        shown = [c for c in ("job", "status", "overrides", "recall@1", "nmi", "map@r") if c in frame]
        log.info("sweep summary (%s):\n%s", sweep_dir / "summary.csv", frame[shown].to_string(index=False))
        print(f"sweep summary: {sweep_dir / 'summary.csv'}")
        print(frame[shown].to_string(index=False))
