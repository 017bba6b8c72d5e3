"""Build every object of a run from its composed config, train, evaluate and write the run directory.

The objects are built by :mod:`dml_runner.build`; ``@hydra.main`` is the command's (:mod:`dml_runner.cli.run`), so
tests and notebooks can call :func:`run` with a config composed by Hydra's compose API.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dml_runner import DMLRunnerError, __version__, rundir
from dml_runner.build import (build_dataset, build_evaluate, build_loss, build_model, build_scheduler, instantiate,
                              sampler_factory)
from dml_runner.config import (default_choices, eval_settings, resume_free_keys, to_container, trainer_settings,
                               validate_config)
from dml_runner.training.checkpoint import checkpoint_epoch, resume_point

log = logging.getLogger(__name__)


def git_info() -> dict[str, Any]:
    """Commit and dirty flag of the checkout dml_runner was imported from (None outside a git checkout)."""
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10).stdout.strip())
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`RunInterrupted` (in the main thread; elsewhere the handlers stay).

    After the first signal, further ones are ignored until the block ends, so recording where the run stopped
    is not itself interrupted by an impatient second Ctrl-C.
    """
    from dml_runner.training.trainer import RunInterrupted

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        raise RunInterrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def resume_command(hydra_meta: dict[str, Any] | None, run_dir: Path) -> str:
    """The dml-run command line that continues ``run_dir``: this run's overrides, its directory and its log."""
    keep = [o for o in (hydra_meta or {}).get("overrides", [])
            if rundir.split_override(o)[0] not in ("trainer.resume", "hydra.run.dir")]
    run_dir = Path(run_dir).resolve()
    return shlex.join(["dml-run", *keep, f"trainer.resume={run_dir}", f"hydra.run.dir={run_dir}"])


def original_command(hydra_meta: dict[str, Any] | None) -> str:
    return shlex.join(["dml-run", *(hydra_meta or {}).get("overrides", [])])


def _record_interrupt(run_dir: Path, cfg: DictConfig, interrupt: Any, hydra_meta: dict[str, Any] | None) -> None:
    """results.json with status "interrupted", the checkpointed epoch and the command that resumes the run."""
    if rundir.is_completed(run_dir):
        interrupt.resume_command = None  # it finished before the signal: nothing to resume
        return
    checkpoint = run_dir / rundir.LAST
    has_checkpoint = checkpoint.is_file()
    epoch = interrupt.checkpoint_epoch
    if epoch is None and has_checkpoint:
        epoch = checkpoint_epoch(checkpoint)
    interrupt.checkpoint_epoch = epoch if has_checkpoint else None
    interrupt.resume_command = resume_command(hydra_meta, run_dir) if has_checkpoint else None
    interrupt.restart_command = original_command(hydra_meta)
    log.warning("interrupted by %s; %s", interrupt.signame,
                f"epoch {epoch} is checkpointed, resume with: {interrupt.resume_command}" if has_checkpoint else
                "no epoch was completed")
    run_dir.mkdir(parents=True, exist_ok=True)
    rundir.write_json_atomic(rundir.interrupted_results(
        signame=interrupt.signame, checkpoint=checkpoint if has_checkpoint else None,
        checkpoint_epoch=interrupt.checkpoint_epoch, command=interrupt.resume_command or interrupt.restart_command,
        hydra_meta=hydra_meta, config=to_container(cfg), out_dir=run_dir), run_dir / rundir.RESULTS)


def _continue_log_in(run_dir: Path, here: Path) -> None:
    """A resumed run logs into the original run's log file (appended), and this invocation's directory, which
    then holds only Hydra's copy of the config, is removed."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent.resolve() == here.resolve():
            handler.flush()
            stray = Path(handler.baseFilename)
            target = run_dir / stray.name
            with open(target, "a") as fh:
                fh.write(stray.read_text() if stray.is_file() else "")
            moved = logging.FileHandler(target, mode="a")
            moved.setFormatter(handler.formatter)
            moved.setLevel(handler.level)
            root.removeHandler(handler)
            handler.close()
            root.addHandler(moved)
            stray.unlink(missing_ok=True)
    if here.is_dir() and {p.name for p in here.iterdir()} <= {".hydra"}:
        shutil.rmtree(here, ignore_errors=True)
        with contextlib.suppress(OSError):  # the date folder Hydra made for it, when nothing else is in it
            here.parent.rmdir()


def run(cfg: DictConfig, out_dir: Path, hydra_meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train and evaluate one configuration; writes results.json, history.csv, embeddings.npz and checkpoints.

    SIGINT/SIGTERM stop it with :class:`dml_runner.training.trainer.RunInterrupted` after results.json records the
    interruption and the command that resumes the run (the checkpoint of the last completed epoch is kept).
    Any exception carries ``run_dir``: the directory the run wrote to (a resumed run writes to the original one).
    """
    from dml_runner.distributed import dist_info_from_env
    from dml_runner.training.trainer import RunInterrupted

    where = {"out_dir": Path(out_dir)}
    with signals_interrupt():
        try:
            return _run(cfg, Path(out_dir), hydra_meta, where)
        except RunInterrupted as interrupt:
            interrupt.run_dir = where["out_dir"]
            if dist_info_from_env().is_main:
                _record_interrupt(where["out_dir"], cfg, interrupt, hydra_meta)
            raise
        except Exception as err:
            err.run_dir = where["out_dir"]  # type: ignore[attr-defined]
            raise
        finally:
            # exceptions caught inside libraries (OmegaConf, matplotlib) leave reference cycles through this run's
            # frames, which hold the model, optimiser and data: free them now, not in a later in-process run
            if cfg.get("trainer") is not None and cfg.trainer.get("compile"):
                import torch

                torch._dynamo.reset()  # a compiled run's graphs and guards would otherwise trace later runs' models
            gc.collect()


def _run(cfg: DictConfig, out_dir: Path, hydra_meta: dict[str, Any] | None, where: dict[str, Path]) -> dict[str, Any]:
    from dml_runner.devices import resolve_device, seed_everything
    from dml_runner.distributed import dist_info_from_env
    from dml_runner.training.trainer import Trainer

    started = time.time()
    from dml_runner.datasets.fit import check_built, fit_run_config  # your own images: size and batch

    fit_run_config(cfg, hydra_meta)
    validate_config(cfg)  # every option checked before data are loaded or a step is trained
    log_config_choices(hydra_meta)
    settings = trainer_settings(cfg)
    eval_cfg = eval_settings(cfg)
    dist_info = dist_info_from_env()
    config = to_container(cfg)
    free = resume_free_keys(cfg)
    resume_path, resume_state = resume_point(settings.resume, out_dir, config, Path(cfg.paths.output_dir), free)
    if resume_path is None and any((out_dir / name).exists() for name in (rundir.LAST, rundir.BEST, rundir.RESULTS)):
        # never overwrite what an earlier run in this directory trained or measured
        raise DMLRunnerError(f"{out_dir} already holds a run (checkpoints or results.json); continue it with "
                             "trainer.resume=auto, or choose another hydra.run.dir")
    if resume_path and resume_path.parent.resolve() != out_dir.resolve():
        log.info("resuming the run in %s (its log continues there)", resume_path.parent)
        if dist_info.is_main:
            _continue_log_in(resume_path.parent, out_dir)
        out_dir = resume_path.parent
    where["out_dir"] = out_dir
    if dist_info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        rundir.write_json_atomic(config, out_dir / rundir.CONFIG)
    resolve_device(settings.device, "trainer.device")  # fail fast on a bad device before loading data
    resolve_device(eval_cfg.device, "eval.device")
    if settings.num_threads:
        import torch

        torch.set_num_threads(settings.num_threads)
    seed_everything(settings.seed)
    from dml_runner.devices import configure_backends  # before the first CUDA operation (cuBLAS's workspace)

    configure_backends(settings.deterministic, resolve_device(settings.device, "trainer.device").type == "cuda")

    data = build_dataset(cfg, progress=settings.progress and dist_info.is_main)
    counts = data.counts()
    log.info("dataset %s: %s", data.name, ", ".join(f"{k}={v}" for k, v in counts.items()))
    if data.info.get("count_warning"):
        log.warning("DATASET COUNTS DIFFER FROM THE OFFICIAL ONES: %s", data.info["count_warning"])
    check_built(data, cfg)  # trivial test metrics refused, thin classes warned of
    model = build_model(cfg, data.train.in_channels)
    loss = build_loss(cfg, data.train.labels)
    method = instantiate(cfg.method, "method")
    make_optimizer = instantiate(cfg.optimizer, "optimizer")
    make_scheduler = build_scheduler(cfg)
    make_sampler = sampler_factory(cfg.sampler, settings.batch_size, settings.seed)
    recall_at = list(eval_cfg.recall_at)
    if eval_cfg.use_dataset_recall_at and data.eval_recall_at:
        recall_at = list(data.eval_recall_at)
    from dml_runner.loggers import build_loggers  # history.csv is the trainer's; these are the chosen trackers

    logger = build_loggers(cfg.get("logger"), out_dir, config, (hydra_meta or {}).get("choices")) \
        if dist_info.is_main else None
    trainer = Trainer(settings, data, model, loss, method, make_optimizer, make_scheduler, make_sampler,
                      build_evaluate(eval_cfg, recall_at, settings.seed), out_dir, dist_info=dist_info, config=config,
                      logger=logger, eval_amp=eval_cfg.amp)
    try:
        outcome = trainer.fit(resume=resume_state)
    finally:
        trainer.release()

    results = rundir.completed_results(
        outcome=outcome, data=data, counts=counts, recall_at=recall_at, model=model,
        wall_time_s=time.time() - started, resume_path=resume_path,
        provenance={"git": git_info(), "versions": _versions()}, hydra_meta=hydra_meta, config=config,
        out_dir=out_dir)
    if not dist_info.is_main:
        return {**results, "rank": dist_info.rank}  # evaluation ran on rank 0 only: no metrics here
    rundir.write_json_atomic(results, out_dir / rundir.RESULTS)
    _plot_history(out_dir, f"{data.name} / {cfg_choice(hydra_meta, 'loss')}", outcome["best"])
    if logger is not None:
        logger.finish(results, out_dir=out_dir)  # final metrics and the run directory's figures to the trackers
    return results


def log_config_choices(hydra_meta: dict[str, Any] | None) -> list[str]:
    """Log (and return) the group choices that neither the command line nor conf/config.yaml made: the ones an
    experiment, a preset or another group selected (loss=hdml_npair selects method=hdml and sampler=npair)."""
    meta = hydra_meta or {}
    named = {rundir.split_override(o)[0] for o in meta.get("overrides", [])}
    defaults = default_choices()
    made = [f"{group}={choice}" for group, choice in (meta.get("choices") or {}).items()
            if group in defaults and group not in named and choice != defaults[group]]
    if made:
        log.info("group choices made by the configs, not the command line: %s", " ".join(made))
    return made


def cfg_choice(hydra_meta: dict[str, Any] | None, group: str) -> str:
    return str((hydra_meta or {}).get("choices", {}).get(group, ""))


def _plot_history(out_dir: Path, title: str, best: dict[str, Any] | None) -> None:
    """learning_curves.png next to history.csv; a plotting failure never fails a finished run."""
    import pandas as pd

    from dml_runner.plots import plot_learning_curves

    try:
        plot_learning_curves(pd.read_csv(out_dir / rundir.HISTORY), out_dir / "learning_curves.png", best=best,
                             title=title)
    except Exception as err:  # noqa: BLE001
        log.warning("could not plot learning curves: %s", err)


def write_failure(out_dir: Path, cfg: DictConfig | None, error: BaseException,
                  hydra_meta: dict[str, Any] | None = None) -> None:
    """Record a failed run (a sweep summary lists it as failed); never overwrites a completed results.json."""
    path = Path(out_dir) / rundir.RESULTS
    if path.exists():
        return
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    config = None
    if cfg is not None:
        try:
            config = to_container(cfg)
        except Exception:  # noqa: BLE001 - an unresolvable config is itself a reason for the failure
            config = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
    rundir.write_json_atomic(rundir.failed_results(error, hydra_meta, config), path)


def _versions() -> dict[str, str]:
    import numpy
    import torch

    out = {"dml_runner": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "numpy": numpy.__version__}
    try:
        import faiss

        out["faiss"] = getattr(faiss, "__version__", "?")
    except ImportError:
        pass
    return out


def format_results_table(results: dict[str, Any]) -> str:
    """A small text table: untrained network, final epoch and best checkpoint, one column per metric."""
    rows = []
    if results.get("untrained_metrics"):
        rows.append(("untrained (epoch 0)", results["untrained_metrics"]))
    rows.append((f"final (epoch {results['final_epoch']})", results["metrics"]))
    best = results.get("best")
    if best and best["split"] == "test":
        rows.append((f"best on TEST (epoch {best['epoch']}, optimistic)", best["test_metrics"]))
    elif best and best["split"] != "final":
        rows.append((f"best on {best['split']} (epoch {best['epoch']})", best["test_metrics"]))
    keys = [k for k in results["metrics"] if not k.startswith("num_")]
    width = max(len(r[0]) for r in rows)
    lines = [" " * width + "  " + "  ".join(f"{k:>10}" for k in keys)]
    for name, metrics in rows:
        lines.append(f"{name:<{width}}  " + "  ".join(f"{100 * metrics[k]:>10.2f}" for k in keys))
    ds = results["dataset"]
    # protocol=images holds out images of the training classes; every other split is class-disjoint
    classes = "classes seen in training" if (ds.get("info") or {}).get("protocol") == "images" else "unseen classes"
    header = (f"test metrics (%) on {ds['name']}: {ds['test_images']} images, {ds['test_classes']} {classes}; "
              f"device {results['device']}, {results['wall_time_s']:.1f} s")
    if best and best["split"] == "final":
        lines.append("selected checkpoint: the final epoch (last.pt); no validation split to choose on "
                     "(dataset.val_fraction>0 adds one)")
    return header + "\n" + "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the dml-run command")
