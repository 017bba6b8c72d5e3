"""Metric loggers (config group ``logger``): ``log_metrics(step, {name: value})`` and ``close()``.

Plain Python, no Hydra: ``conf/logger/<name>.yaml`` is instantiated with ``out_dir=<run directory>``. Example::

    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp())
    >>> logger = CSVLogger(out)
    >>> logger.log_metrics(1, {"train/loss": 0.5, "test/recall@1": 0.9})
    >>> logger.close()
    >>> (out / "metrics.csv").read_text().splitlines()[0]
    'step,train/loss,test/recall@1'
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dml_runner import DMLRunnerError


class MetricLogger:
    """The interface: numbers only (non-numeric values are skipped), one call per step (epoch)."""

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Flush and release files; logging after close is an error."""


def numeric_items(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[str(key)] = float(value)
    return out


class CSVLogger(MetricLogger):
    """``<out_dir>/<filename>``: one row per call; the header grows when a new metric appears (file rewritten)."""

    def __init__(self, out_dir: Path | str, filename: str = "metrics.csv") -> None:
        self.path = Path(out_dir) / filename
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict[str, Any]] = []
        self.columns: list[str] = ["step"]
        self.closed = False

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self.closed:
            raise RuntimeError("CSVLogger.log_metrics after close()")
        row = {"step": int(step), **numeric_items(metrics)}
        new = [k for k in row if k not in self.columns]
        self.columns += new
        self.rows.append(row)
        if new or len(self.rows) == 1:
            self._rewrite()
        else:
            with open(self.path, "a", newline="") as fh:
                csv.DictWriter(fh, fieldnames=self.columns).writerow(row)

    def _rewrite(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(self.rows)
        tmp.replace(self.path)

    def close(self) -> None:
        self.closed = True


class TensorBoardLogger(MetricLogger):
    """TensorBoard scalars under ``<out_dir>/<subdir>`` (needs the ``tensorboard`` package)."""

    def __init__(self, out_dir: Path | str, subdir: str = "tensorboard") -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise DMLRunnerError("logger=tensorboard needs the tensorboard package: `pip install tensorboard` "
                                 "(or use the default logger=csv)") from err
        self.log_dir = Path(out_dir) / subdir
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        for key, value in numeric_items(metrics).items():
            if not math.isnan(value):
                self.writer.add_scalar(key, value, global_step=int(step))

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
