"""Experiment loggers (config group ``logger``): history.csv, TensorBoard, MLflow and Weights & Biases.

Every run writes ``history.csv`` (one row per epoch, written by the trainer through :class:`CSVLogger`; resume and
the report read it). ``logger=`` adds trackers on top of it, one or several: ``logger=[csv,mlflow,wandb]``. Each
option file is ``# @package logger.<name>``, so ``cfg.logger`` maps a name to the spec of one logger and
:func:`build_loggers` builds them all (``csv`` builds nothing more: its file is history.csv).

A logger is told, in this order: the resolved config (:meth:`MetricLogger.log_config`), one row of metrics per epoch
(:meth:`MetricLogger.log_metrics`, called by the trainer), the run's final metrics and figures
(:meth:`MetricLogger.finish`, called by run.py after results.json and the PNGs are written) and :meth:`close`.
A run that stops before ``finish`` is closed as failed (also at interpreter exit).

Plain Python, no Hydra beyond ``instantiate``. Example::

    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp())
    >>> history = CSVLogger(out)
    >>> history.log_metrics(0, {"epoch": 0, "test/recall@1": 0.5})
    >>> history.log_metrics(1, {"epoch": 1, "train_loss": 0.3, "test/recall@1": 0.9})
    >>> (out / "history.csv").read_text().splitlines()
    ['epoch,test/recall@1,train_loss', '0,0.5,', '1,0.9,0.3']
"""

from __future__ import annotations

import atexit
import importlib
import importlib.util
import json
import logging
import math
import re
import time
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from dml_runner import DMLRunnerError
from dml_runner.rundir import CONFIG, HISTORY, RESULTS, flatten_config, write_csv_atomic

log = logging.getLogger(__name__)

# Files of the run directory a tracker stores next to the figures (when they exist).
RUN_FILES = (RESULTS, CONFIG, HISTORY)
# Folders the trackers write inside a run or sweep directory; copies of RUN_FILES in them are not runs.
TRACKER_DIRS = ("mlruns", "wandb", "tensorboard")


class MetricLogger:
    """The interface. Only ``log_metrics`` is required; metric values that are not finite numbers are skipped."""

    def log_config(self, config: Mapping[str, Any], run_name: str) -> None:
        """The resolved config of the run, before the first epoch."""

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def finish(self, results: Mapping[str, Any], figures: list[Path]) -> None:
        """The run completed: ``results`` is results.json (its ``metrics`` are the final ones), ``figures`` PNGs."""

    def close(self) -> None:
        """Flush and release files; logging after close is an error."""


def numeric_items(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of ``metrics`` (bools, strings, NaN and inf are left out)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        out[str(key)] = float(value)
    return out


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"trainer": {"epochs": 2}}`` -> ``{"trainer.epochs": 2}`` (:func:`dml_runner.rundir.flatten_config`);
    lists and empty mappings stay values, as JSON text."""
    return {f"{prefix}{k}": v for k, v in flatten_config(config, leaf=_json_if_container).items()}


def _json_if_container(value: Any) -> Any:
    return json.dumps(value, default=str) if isinstance(value, (list, tuple, Mapping)) else value


def default_run_name(out_dir: Path, choices: Mapping[str, Any] | None) -> str:
    """``<dataset>-<loss>-<run directory name>`` (the run directory name alone without Hydra's choices)."""
    parts = [str((choices or {}).get(group)) for group in ("dataset", "loss") if (choices or {}).get(group)]
    return "-".join([*parts, Path(out_dir).name])


def _missing_package(option: str, module: str, extra: str) -> DMLRunnerError:
    return DMLRunnerError(f"logger={option} needs {module}: pip install dml-runner[{extra}] "
                          f"(or leave {option} out of logger=[...])")


def _import(option: str, module: str, extra: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise _missing_package(option, module, extra) from err


# ------------------------------------------------------------------------------------------------ history.csv
class CSVLogger(MetricLogger):
    """``<out_dir>/history.csv``: every row as given, all columns (non-numeric values too), rewritten atomically.

    The trainer's own record of the run (resume and the report read it), so every run has it; ``logger=csv`` names
    it and writes no second file. Columns are every key in order of first appearance; missing cells are empty.
    """

    def __init__(self, out_dir: Path | str, filename: str = HISTORY) -> None:
        self.path = Path(out_dir) / filename
        self.rows: list[dict[str, Any]] = []
        self.closed = False

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append one row (``epoch`` is ``step`` unless the row has its own) and rewrite the file."""
        if self.closed:
            raise RuntimeError("CSVLogger.log_metrics after close()")
        self.rows.append({"epoch": int(step), **metrics})
        self._write()

    def write_rows(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Replace every row (a resumed run starts from its checkpoint's history) and rewrite the file."""
        self.rows = [dict(row) for row in rows]
        self._write()

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_csv_atomic(self.rows, self.path)

    def close(self) -> None:
        self.closed = True


# ------------------------------------------------------------------------------------------------ TensorBoard
class TensorBoardLogger(MetricLogger):
    """TensorBoard scalars under ``<out_dir>/<subdir>`` (needs the ``tensorboard`` package)."""

    def __init__(self, out_dir: Path | str, subdir: str = "tensorboard") -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise DMLRunnerError("logger=tensorboard needs tensorboard: pip install tensorboard "
                                 "(or leave tensorboard out of logger=[...])") from err
        self.log_dir = Path(out_dir) / subdir
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def log_config(self, config: Mapping[str, Any], run_name: str) -> None:
        text = "\n".join(f"    {k}: {v}" for k, v in flatten(config).items())  # indented: a code block in TB
        self.writer.add_text("config", text, global_step=0)

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        for key, value in numeric_items(metrics).items():
            self.writer.add_scalar(key, value, global_step=int(step))

    def finish(self, results: Mapping[str, Any], figures: list[Path]) -> None:
        step = int(results.get("final_epoch") or 0)
        for key, value in numeric_items(results.get("metrics") or {}).items():
            self.writer.add_scalar(f"final/{key}", value, global_step=step)
        if figures:
            import numpy as np
            from PIL import Image

            for path in figures:
                image = np.asarray(Image.open(path).convert("RGB"))
                self.writer.add_image(f"figures/{path.stem}", image, global_step=step, dataformats="HWC")

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


# ------------------------------------------------------------------------------------------------ MLflow
RUN_DIR_TAG = "dml_runner.run_dir"
_MLFLOW_BAD = re.compile(r"[^\w\-. :/]")


def mlflow_key(name: str) -> str:
    """An MLflow metric or param name: ``@`` becomes ``_at_`` (``test/recall@1`` -> ``test/recall_at_1``)."""
    return _MLFLOW_BAD.sub("_", name.replace("@", "_at_"))


def mlflow_store_dir(run_dir: Path) -> Path:
    """Where ``tracking_uri=null`` keeps the MLflow store: ``<sweep dir>/mlruns`` for a job of a sweep (its parent
    holds Hydra's multirun.yaml), so one ``mlflow ui`` compares every job; ``<run dir>/mlruns`` for a single run."""
    run_dir = Path(run_dir)
    if (run_dir.parent / "multirun.yaml").is_file():
        return run_dir.parent / "mlruns"
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:  # a sweeper that writes no yaml
        return Path(HydraConfig.get().sweep.dir).resolve() / "mlruns"
    return run_dir / "mlruns"


class MLflowLogger(MetricLogger):
    """An MLflow run: params (the flattened config), per-epoch metrics, ``final/<metric>``, figures as artifacts.

    ``tracking_uri=null`` keeps everything in the run directory: ``sqlite:///<run dir>/mlruns/mlflow.db`` with
    artifacts in ``<run dir>/mlruns/artifacts`` (``mlflow ui --backend-store-uri sqlite:///<that file>``); the jobs
    of a sweep share the sweep directory's ``mlruns/`` (:func:`mlflow_store_dir`). Any
    other URI (a server, a database, ``databricks``) is used as given. A resumed run continues the MLflow run that
    carries the same run directory (tag ``dml_runner.run_dir``).
    """

    def __init__(self, out_dir: Path | str, tracking_uri: str | None = None, experiment_name: str = "dml-runner",
                 run_name: str | None = None, artifact_location: str | None = None,
                 tags: Mapping[str, Any] | None = None) -> None:
        _import("mlflow", "mlflow", "mlflow")
        from mlflow.tracking import MlflowClient

        self.out_dir = Path(out_dir).resolve()
        if tracking_uri is None:
            for module in ("sqlalchemy", "alembic"):  # MLflow's database store; mlflow-skinny does not require them
                if importlib.util.find_spec(module) is None:
                    raise DMLRunnerError(f"logger=mlflow's store in the run directory (SQLite) needs {module}: pip "
                                         "install sqlalchemy alembic, or set logger.mlflow.tracking_uri=<server>")
            store = mlflow_store_dir(self.out_dir)
            store.mkdir(parents=True, exist_ok=True)
            tracking_uri = f"sqlite:///{store / 'mlflow.db'}"
            artifact_location = artifact_location or (store / "artifacts").as_uri()
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        experiment = self.client.get_experiment_by_name(experiment_name)
        self.experiment_id = experiment.experiment_id if experiment is not None else \
            self.client.create_experiment(experiment_name, artifact_location=artifact_location)
        self.run_name = run_name
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.run_id: str | None = None
        self.resumed = False

    def log_config(self, config: Mapping[str, Any], run_name: str) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        earlier = self.client.search_runs([self.experiment_id],
                                          f"tags.`{RUN_DIR_TAG}` = '{self.out_dir}'", max_results=1)
        if earlier:
            self.run_id, self.resumed = earlier[0].info.run_id, True
            self.client.update_run(self.run_id, status="RUNNING")
            known = earlier[0].data.params
        else:
            run = self.client.create_run(self.experiment_id, run_name=self.run_name or run_name,
                                         tags={RUN_DIR_TAG: str(self.out_dir), **self.tags})
            self.run_id, known = run.info.run_id, {}
        # a resumed run keeps the params it started with (MLflow refuses to change one; trainer.resume differs)
        params = [Param(mlflow_key(k), str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in flatten(config).items()
                  if mlflow_key(k) not in known]
        for i in range(0, len(params), 100):  # MLflow's batch limit for params
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        if self.resumed:
            self.client.log_batch(self.run_id, tags=[RunTag("dml_runner.resumed", "true")])

    def _log(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(mlflow_key(prefix + k), v, now, int(step)) for k, v in numeric_items(metrics).items()]
        for i in range(0, len(batch), 1000):  # MLflow's batch limit for metrics
            self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._log(step, metrics)

    def finish(self, results: Mapping[str, Any], figures: list[Path]) -> None:
        from mlflow.entities import RunTag

        self._log(int(results.get("final_epoch") or 0), results.get("metrics") or {}, prefix="final/")
        choices = results.get("choices") or {}
        tags = [RunTag(f"choice.{k}", str(v)[:5000]) for k, v in choices.items() if v is not None]
        if tags:
            self.client.log_batch(self.run_id, tags=tags)
        for path in figures:
            self.client.log_artifact(self.run_id, str(path), "figures")
        for name in RUN_FILES:
            if (self.out_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(self.out_dir / name))
        self.client.set_terminated(self.run_id, "FINISHED")
        self.run_id = None

    def close(self) -> None:
        if self.run_id is not None:  # closed without finish: the run stopped early
            self.client.set_terminated(self.run_id, "FAILED")
            self.run_id = None


# ------------------------------------------------------------------------------------------------ W&B
class WandbLogger(MetricLogger):
    """A Weights & Biases run in ``<out_dir>/wandb``: config, per-epoch metrics, final metrics, figures as images.

    ``mode=offline`` (the default) talks to no server: ``wandb sync <out_dir>/wandb/offline-run-*`` uploads it
    later. ``mode=online`` needs a login (``wandb login`` or ``WANDB_API_KEY``). A resumed run continues the W&B
    run found in ``<out_dir>/wandb`` (same run id).
    """

    def __init__(self, out_dir: Path | str, mode: str = "offline", project: str = "dml-runner",
                 entity: str | None = None, run_name: str | None = None, group: str | None = None,
                 tags: list[str] | None = None) -> None:
        if mode not in ("offline", "online", "disabled"):
            raise DMLRunnerError(f"logger.wandb.mode={mode}: not a W&B mode; use offline, online or disabled")
        self.wandb = _import("wandb", "wandb", "wandb")
        self.out_dir = Path(out_dir).resolve()
        self.options = {"mode": mode, "project": project, "entity": entity, "group": group,
                        "tags": list(tags) if tags else None}
        self.run_name = run_name
        self.run: Any = None

    def _earlier_run_id(self) -> str | None:
        runs = sorted((self.out_dir / "wandb").glob("*run-*-*"), key=lambda p: p.stat().st_mtime)
        return runs[-1].name.rsplit("-", 1)[-1] if runs else None

    def log_config(self, config: Mapping[str, Any], run_name: str) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        earlier = self._earlier_run_id()
        self.run = self.wandb.init(dir=str(self.out_dir), config=dict(config), name=self.run_name or run_name,
                                   id=earlier, resume="allow" if earlier else None, reinit="create_new",
                                   settings=self.wandb.Settings(console="off"), **self.options)

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        self.run.log(numeric_items(metrics), step=int(step))

    def finish(self, results: Mapping[str, Any], figures: list[Path]) -> None:
        for key, value in numeric_items(results.get("metrics") or {}).items():
            self.run.summary[f"final/{key}"] = value
        if results.get("choices"):
            self.run.config.update({"choices": dict(results["choices"])}, allow_val_change=True)
        if figures:
            step = max(int(results.get("final_epoch") or 0), self.run.step)
            self.run.log({f"figures/{p.stem}": self.wandb.Image(str(p)) for p in figures}, step=step)
        self.run.finish(exit_code=0)
        self.run = None

    def close(self) -> None:
        if self.run is not None:  # closed without finish: the run stopped early
            self.run.finish(exit_code=1)
            self.run = None


# ------------------------------------------------------------------------------------------------ several at once
_OPEN: weakref.WeakSet[LoggerSet] = weakref.WeakSet()
_AT_EXIT = False


class LoggerSet(MetricLogger):
    """The trackers chosen with ``logger=[...]``, fed together. ``close()`` (the trainer's, at the end of training)
    only flushes; ``finish()`` ends them; one never finished is closed as failed when the next run builds its
    loggers (a sweep in one process) or at interpreter exit."""

    def __init__(self, loggers: Mapping[str, MetricLogger]) -> None:
        self.loggers = dict(loggers)
        self.finished = False
        _OPEN.add(self)
        global _AT_EXIT
        if not _AT_EXIT:  # registered after the trackers' imports, so it runs before their own exit hooks
            atexit.register(_close_unfinished)
            _AT_EXIT = True

    def __bool__(self) -> bool:
        return bool(self.loggers)

    def log_config(self, config: Mapping[str, Any], run_name: str) -> None:
        for logger in self.loggers.values():
            logger.log_config(config, run_name)

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        for logger in self.loggers.values():
            logger.log_metrics(step, metrics)

    def finish(self, results: Mapping[str, Any], figures: list[Path] | None = None, out_dir: Path | None = None,
               ) -> None:
        """Final metrics and figures (default: the PNGs in ``out_dir`` or results.json's ``output_dir``)."""
        if figures is None:
            folder = Path(out_dir or results.get("output_dir") or ".")
            figures = sorted(folder.glob("*.png"))
        for name, logger in self.loggers.items():
            try:
                logger.finish(results, figures)
            except Exception as err:  # noqa: BLE001 - a tracker failing at the end never fails a finished run
                log.warning("logger %s could not record the end of the run: %s", name, err)
        self.finished = True
        self.close_all()

    def close(self) -> None:
        """Training ended; the trackers stay open for :meth:`finish` (run.py calls it after the figures)."""

    def close_all(self) -> None:
        for name, logger in self.loggers.items():
            try:
                logger.close()
            except Exception as err:  # noqa: BLE001
                log.warning("logger %s did not close cleanly: %s", name, err)
        self.loggers = {}
        _OPEN.discard(self)


def _close_unfinished() -> None:
    for logger_set in list(_OPEN):
        logger_set.close_all()


def _specs(node: Any) -> dict[str, Any]:
    """``cfg.logger`` as {name: spec}: a mapping of specs, one spec with ``_target_``, or nothing."""
    from omegaconf import DictConfig, OmegaConf

    if node is None:
        return {}
    tree = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    if not isinstance(tree, Mapping):
        raise DMLRunnerError(f"logger: expected logger options (logger=[csv,mlflow]), got {tree!r}")
    if "_target_" in tree:
        return {str(tree["_target_"]).rsplit(".", 1)[-1]: dict(tree)}
    for name, spec in tree.items():
        if not isinstance(spec, Mapping) or "_target_" not in spec:
            raise DMLRunnerError(f"logger.{name}: not a logger (no _target_); choose from conf/logger, "
                                 "e.g. logger=[csv,mlflow]")
    return {str(k): dict(v) for k, v in tree.items()}


def build_loggers(node: Any, out_dir: Path | str, config: Mapping[str, Any] | None = None,
                  choices: Mapping[str, Any] | None = None) -> LoggerSet:
    """Every logger of ``cfg.logger`` except history.csv's (the trainer writes it), started with ``config``.

    A missing package stops here, before training, with the ``pip install`` line.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import get_object, instantiate

    for earlier in list(_OPEN):  # a run of this process that never finished (a failed job of a sweep)
        earlier.close_all()
    built: dict[str, MetricLogger] = {}
    try:
        for name, spec in _specs(node).items():
            target = get_object(spec["_target_"])
            if isinstance(target, type) and issubclass(target, CSVLogger):
                continue  # history.csv: the trainer writes it on every run
            try:
                built[name] = instantiate(spec, _convert_="all", out_dir=Path(out_dir))
            except InstantiationException as err:  # Hydra wraps the logger's own one-line error
                if isinstance(err.__cause__, DMLRunnerError):
                    raise err.__cause__ from None
                raise DMLRunnerError(f"could not build logger.{name} from its config: {err}") from err
        loggers = LoggerSet(built)
        loggers.log_config(config or {}, default_run_name(Path(out_dir), choices))
    except BaseException:
        for logger in built.values():
            logger.close()
        raise
    return loggers
