"""Build every object of a run from its composed config, train, evaluate and write the run directory.

This is the config layer: it knows ``hydra.utils.instantiate`` but not ``@hydra.main`` (see :mod:`dml_runner.cli`),
so tests and notebooks can call :func:`run` with a config composed by Hydra's compose API.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dml_runner import DMLRunnerError, __version__
from dml_runner.config import to_container, validate_config

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


def write_json_atomic(obj: Any, path: Path) -> None:
    """Write to a temporary file, then rename: a full disk or a crash never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2, default=str)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _instantiate(node: DictConfig, what: str, **kwargs: Any) -> Any:
    """hydra.utils.instantiate with an error message that names the config group."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, DMLRunnerError):
            raise cause
        raise DMLRunnerError(f"could not build `{what}` from its config: {err}") from err


def build_evaluate(cfg: DictConfig, recall_at: list[int]) -> Any:
    from dml_runner.evaluation import evaluate

    e = cfg.eval  # values checked by dml_runner.config.validate_config before training
    return partial(evaluate, recall_at=tuple(recall_at), metrics=tuple(e.metrics), device=e.device,
                   seed=cfg.trainer.seed if e.seed is None else e.seed, chunk_size=e.chunk_size,
                   kmeans_iters=e.kmeans_iters, backend=e.backend)


# Fields that may differ between a checkpoint's run and the run resuming it (everything else must match).
RESUME_MAY_DIFFER = ("trainer.resume", "trainer.progress", "trainer.epochs", "trainer.num_workers",
                     "trainer.eval_every", "trainer.eval_batch_size", "trainer.persistent_workers",
                     "trainer.pin_memory", "trainer.device", "eval.", "tags", "scheduler.T_max")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def config_mismatches(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted config keys whose values differ (ignoring RESUME_MAY_DIFFER), formatted `key: saved -> current`."""
    a, b = _flatten(saved), _flatten(current)
    out = []
    for key in sorted(set(a) | set(b)):
        if key.startswith(RESUME_MAY_DIFFER) or a.get(key) == b.get(key):
            continue
        out.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return out


def find_resume_checkpoint(resume: str | None, out_dir: Path, config: dict[str, Any],
                           search_root: Path = Path("outputs")) -> Path | None:
    """Resolve trainer.resume: null (start fresh), a checkpoint file or run directory, or `auto`.

    `auto` takes this run directory's last.pt, else the newest unfinished run under ``search_root`` (a last.pt and
    no completed results.json) whose config matches this one.
    """
    if not resume:
        return None
    if resume != "auto":
        path = Path(resume).expanduser()
        path = path / "last.pt" if path.is_dir() else path
        if not path.is_file():
            raise DMLRunnerError(f"trainer.resume={resume}: no checkpoint there (expected a last.pt file or a run "
                                 "directory containing one)")
        return path
    if (out_dir / "last.pt").is_file():
        return out_dir / "last.pt"
    candidates = []
    for cfg_file in Path(search_root).glob("**/config.json") if Path(search_root).is_dir() else []:
        run_dir = cfg_file.parent
        results = run_dir / "results.json"
        if not (run_dir / "last.pt").is_file() or run_dir.resolve() == out_dir.resolve():
            continue
        if results.is_file() and json.loads(results.read_text()).get("status") == "completed":
            continue
        if not config_mismatches(json.loads(cfg_file.read_text()), config):
            candidates.append(run_dir / "last.pt")
    if not candidates:
        log.info("trainer.resume=auto: no unfinished run with this config under %s; starting fresh", search_root)
        return None
    return max(candidates, key=lambda p: p.stat().st_mtime)


def load_checkpoint(path: Path, config: dict[str, Any]) -> dict[str, Any]:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise DMLRunnerError(f"cannot read checkpoint {path}: {err}") from err
    if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
        raise DMLRunnerError(f"{path} is not a dml-run checkpoint (no model/epoch entries)")
    mismatched = config_mismatches(state.get("config") or {}, config)
    if mismatched:
        raise DMLRunnerError(f"checkpoint {path} was trained with a different config; refusing to resume. "
                             "Mismatched fields (checkpoint -> now):\n  " + "\n  ".join(mismatched))
    return state


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`RunInterrupted` (in the main thread; elsewhere the handlers stay).

    After the first signal, further ones are ignored until the block ends, so recording where the run stopped
    is not itself interrupted by an impatient second Ctrl-C.
    """
    from dml_runner.trainer import RunInterrupted

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
            if not o.lstrip("+~").startswith(("trainer.resume=", "hydra.run.dir="))]
    run_dir = Path(run_dir).resolve()
    return shlex.join(["dml-run", *keep, f"trainer.resume={run_dir}", f"hydra.run.dir={run_dir}"])


def original_command(hydra_meta: dict[str, Any] | None) -> str:
    return shlex.join(["dml-run", *(hydra_meta or {}).get("overrides", [])])


def _record_interrupt(run_dir: Path, cfg: DictConfig, interrupt: Any, hydra_meta: dict[str, Any] | None) -> None:
    """results.json with status "interrupted", the checkpointed epoch and the command that resumes the run."""
    path = run_dir / "results.json"
    if path.is_file() and json.loads(path.read_text()).get("status") == "completed":
        interrupt.resume_command = None  # it finished before the signal: nothing to resume
        return
    has_checkpoint = (run_dir / "last.pt").is_file()
    epoch = interrupt.checkpoint_epoch
    if epoch is None and has_checkpoint:
        import torch

        epoch = int(torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)["epoch"])
    interrupt.checkpoint_epoch = epoch if has_checkpoint else None
    interrupt.resume_command = resume_command(hydra_meta, run_dir) if has_checkpoint else None
    interrupt.restart_command = original_command(hydra_meta)
    log.warning("interrupted by %s; %s", interrupt.signame,
                f"epoch {epoch} is checkpointed, resume with: {interrupt.resume_command}" if has_checkpoint else
                "no epoch was completed")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic({
        "status": "interrupted", "signal": interrupt.signame,
        "checkpoint": str(run_dir / "last.pt") if has_checkpoint else None,
        "checkpoint_epoch": interrupt.checkpoint_epoch,
        "resume_command": interrupt.resume_command or interrupt.restart_command,
        **(hydra_meta or {}), "config": to_container(cfg), "output_dir": str(run_dir)}, path)


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

    SIGINT/SIGTERM stop it with :class:`dml_runner.trainer.RunInterrupted` after results.json records the
    interruption and the command that resumes the run (the checkpoint of the last completed epoch is kept).
    Any exception carries ``run_dir``: the directory the run wrote to (a resumed run writes to the original one).
    """
    from dml_runner.distributed import dist_info_from_env
    from dml_runner.trainer import RunInterrupted

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


def _run(cfg: DictConfig, out_dir: Path, hydra_meta: dict[str, Any] | None, where: dict[str, Path]) -> dict[str, Any]:
    from dml_runner.distributed import dist_info_from_env
    from dml_runner.trainer import FitSettings, Trainer, resolve_device, seed_everything

    started = time.time()
    validate_config(cfg)  # every option checked before data are loaded or a step is trained
    dist_info = dist_info_from_env()
    config = to_container(cfg)
    resume_path = find_resume_checkpoint(cfg.trainer.get("resume"), out_dir, config)
    resume_state = load_checkpoint(resume_path, config) if resume_path else None
    if resume_path is None and any((out_dir / name).exists() for name in ("last.pt", "best.pt", "results.json")):
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
        write_json_atomic(config, out_dir / "config.json")
    settings = FitSettings(**{f.name: cfg.trainer[f.name] for f in dataclasses.fields(FitSettings)
                              if f.name in cfg.trainer})
    resolve_device(settings.device)  # fail fast on a bad device before loading data
    if cfg.trainer.get("num_threads"):
        import torch

        torch.set_num_threads(int(cfg.trainer.num_threads))
    seed_everything(settings.seed)
    if settings.deterministic:
        import torch

        torch.use_deterministic_algorithms(True, warn_only=True)

    data = _instantiate(cfg.dataset, "dataset")
    counts = data.counts()
    log.info("dataset %s: %s", data.name, ", ".join(f"{k}={v}" for k, v in counts.items()))
    if data.info.get("count_warning"):
        log.warning("DATASET COUNTS DIFFER FROM THE OFFICIAL ONES: %s", data.info["count_warning"])
    model = _instantiate(cfg.backbone, "backbone", in_channels=data.train.in_channels)
    if cfg.eval.normalize:
        model.head.eval_normalize = True
    loss = _instantiate(cfg.loss, "loss")
    method = _instantiate(cfg.method, "method")
    make_optimizer = _instantiate(cfg.optimizer, "optimizer")
    make_scheduler = _instantiate(cfg.scheduler, "scheduler") if cfg.get("scheduler") and \
        cfg.scheduler.get("_target_") else None
    sampler_node = cfg.sampler

    def make_sampler(labels: Any, batch_size: int | None = None, seed: int | None = None) -> Any:
        return _instantiate(sampler_node, "sampler", labels=labels,
                            batch_size=settings.batch_size if batch_size is None else batch_size,
                            seed=settings.seed if seed is None else seed)

    recall_at = list(cfg.eval.recall_at)
    if cfg.eval.use_dataset_recall_at and data.eval_recall_at:
        recall_at = list(data.eval_recall_at)
    logger = _instantiate(cfg.logger, "logger", out_dir=out_dir) if cfg.get("logger") and dist_info.is_main \
        else None
    trainer = Trainer(settings, data, model, loss, method, make_optimizer, make_scheduler, make_sampler,
                      build_evaluate(cfg, recall_at), out_dir, dist_info=dist_info, config=config, logger=logger)
    outcome = trainer.fit(resume=resume_state)

    results = {
        "status": "completed",
        "metrics": outcome["final"]["metrics"],
        "final_epoch": outcome["final"]["epoch"],
        "untrained_metrics": outcome["untrained"],
        "best": outcome["best"],
        "checkpoint_selected_on": outcome["selection_split"],
        "dataset": {"name": data.name, **counts, "eval_mode": data.eval_mode, "recall_at": recall_at,
                    "info": data.info},
        "model": {**getattr(model, "info", {}), "embedding_dim": getattr(model, "embedding_dim", None)},
        "device": outcome["device"],
        "amp_bf16": outcome["amp"],
        "wall_time_s": round(time.time() - started, 2),
        "train_time_s": round(outcome["wall_time_s"], 2),
        "resumed_from": {"checkpoint": str(resume_path), "epoch": outcome["resumed_from_epoch"]}
        if resume_path else None,
        "world_size": outcome["world_size"],
        "git": git_info(),
        "versions": _versions(),
        **(hydra_meta or {}),
        "config": config,
        "output_dir": str(out_dir),
    }
    if not dist_info.is_main:
        return {**results, "rank": dist_info.rank}  # evaluation ran on rank 0 only: no metrics here
    write_json_atomic(results, out_dir / "results.json")
    _plot_history(out_dir, f"{data.name} / {cfg_choice(hydra_meta, 'loss')}", outcome["best"])
    return results


def cfg_choice(hydra_meta: dict[str, Any] | None, group: str) -> str:
    return str((hydra_meta or {}).get("choices", {}).get(group, ""))


def _plot_history(out_dir: Path, title: str, best: dict[str, Any] | None) -> None:
    """learning_curves.png next to history.csv; a plotting failure never fails a finished run."""
    import pandas as pd

    from dml_runner.learning_curves import plot_learning_curves

    try:
        plot_learning_curves(pd.read_csv(out_dir / "history.csv"), out_dir / "learning_curves.png", best=best,
                             title=title)
    except Exception as err:  # noqa: BLE001
        log.warning("could not plot learning curves: %s", err)


def write_failure(out_dir: Path, cfg: DictConfig | None, error: BaseException,
                  hydra_meta: dict[str, Any] | None = None) -> None:
    """Record a failed run (a sweep summary lists it as failed); never overwrites a completed results.json."""
    path = Path(out_dir) / "results.json"
    if path.exists():
        return
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    payload = {"status": "failed", "error": f"{type(error).__name__}: {error}", **(hydra_meta or {})}
    if cfg is not None:
        try:
            payload["config"] = to_container(cfg)
        except Exception:  # an unresolvable config is itself a reason for the failure
            payload["config"] = OmegaConf.to_container(cfg, resolve=False)
    write_json_atomic(payload, path)


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
    header = (f"test metrics (%) on {ds['name']}: {ds['test_images']} images, {ds['test_classes']} unseen classes; "
              f"device {results['device']}, {results['wall_time_s']:.1f} s")
    if best and best["split"] == "final":
        lines.append("selected checkpoint: the final epoch (last.pt); no validation split to choose on "
                     "(dataset.val_fraction>0 adds one)")
    return header + "\n" + "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the dml-run command")
