"""The Checkpointer: ``last.pt`` and ``best.pt`` of a run directory, their format, their atomic writes and the one
checkpoint reader (resume, dml-embed, dml-search and dml-export all read through :func:`read_checkpoint`).

A checkpoint holds only tensors and plain containers, so it loads with ``torch.load(weights_only=True)``. It has no
RNG state: every generator is reseeded from (seed, epoch) at each epoch start (:func:`dml_runner.devices.epoch_seed`)
and a run resumes only at an epoch boundary.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from dml_runner import DMLRunnerError
from dml_runner.rundir import BEST, CONFIG, LAST, atomic_path, config_mismatches, is_completed

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
TRAINED_FIX = "give a best.pt or last.pt that dml-run wrote"


def save_torch_atomic(obj: Any, path: Path | str) -> None:
    """torch.save written atomically (a crash mid-write never corrupts the previous checkpoint)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def build_checkpoint(*, epoch: int, model: dict[str, Any], loss: dict[str, Any], method: dict[str, Any],
                     history: list[dict[str, Any]], best: dict[str, Any] | None,
                     untrained: dict[str, float] | None, last_test: dict[str, float] | None,
                     pending_eval: dict[str, Any] | None, config: dict[str, Any],
                     metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything needed to continue a run after ``epoch`` (state dicts, progress, the config)."""
    return {"format": CHECKPOINT_FORMAT, "epoch": epoch, "model": model, "loss": loss, "method": method,
            "metrics": metrics or {}, "history": history, "best": best, "untrained": untrained,
            "last_test": last_test, "pending_eval": pending_eval, "config": config}


class Checkpointer:
    """Saves a run's ``last.pt`` (every completed epoch) and ``best.pt`` (each new best on the selection split).

    The Trainer writes ``last.pt`` once per epoch: after an epoch that is not evaluated, and before the evaluation of
    one that is, with that evaluation recorded as pending (``pending_eval``). An interrupt or a crash during the
    evaluation therefore loses no training, and a run resumed from it evaluates that epoch first (again, after a
    completed evaluation: the same numbers, since evaluation changes no state).

    ``enabled`` is false when the run keeps no checkpoints (``trainer.save_checkpoints=false``) or on a rank other
    than 0. ``state`` is called only when a file is written: it returns the trained state (the model's, the loss's
    and the method's state dicts, the history, the best epoch and the evaluation progress: the keyword arguments of
    :func:`build_checkpoint` other than ``epoch``, ``config`` and ``metrics``). :attr:`epoch` is the epoch
    ``last.pt`` holds (None before the first save).
    """

    def __init__(self, out_dir: Path | str, config: dict[str, Any], enabled: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.config = config
        self.enabled = enabled
        self.epoch: int | None = None

    def save_last(self, epoch: int, state: Callable[[], dict[str, Any]]) -> None:
        """``last.pt``: the state after ``epoch``."""
        if self.enabled:
            save_torch_atomic(build_checkpoint(epoch=epoch, config=self.config, **state()), self.out_dir / LAST)
            self.epoch = epoch

    def save_best(self, epoch: int, state: Callable[[], dict[str, Any]], metrics: dict[str, Any]) -> None:
        """``best.pt``: the state after ``epoch``, with the metrics that made it the best."""
        if self.enabled:
            save_torch_atomic(build_checkpoint(epoch=epoch, config=self.config, metrics=metrics, **state()),
                              self.out_dir / BEST)


def read_checkpoint(path: Path | str, needs: tuple[str, ...] = ("model",), fix: str = TRAINED_FIX) -> dict[str, Any]:
    """The state dict of a checkpoint file (``weights_only``, on the CPU); an unreadable file or one without the
    entries ``needs`` is a one-line error ending in ``fix``."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise DMLRunnerError(f"cannot read checkpoint {path}: {err}; {fix}") from None
    missing = [key for key in needs if not isinstance(state, dict) or key not in state]
    if missing:
        raise DMLRunnerError(f"{path} is not a dml-run checkpoint (no {'/'.join(missing)} entries); {fix}")
    return state


def load_checkpoint(path: Path, config: dict[str, Any], free: Collection[str] | None = None) -> dict[str, Any]:
    """A checkpoint to resume from, refused when its config differs from ``config`` (except the ``free`` keys)."""
    state = read_checkpoint(path, needs=("model", "epoch"), fix="point trainer.resume at a last.pt that dml-run "
                                                                "wrote")
    mismatched = config_mismatches(state.get("config") or {}, config, free)
    if mismatched:
        raise DMLRunnerError(f"checkpoint {path} was trained with a different config; refusing to resume. "
                             "Mismatched fields (checkpoint -> now):\n  " + "\n  ".join(mismatched))
    return state


def checkpoint_epoch(path: Path) -> int:
    return int(read_checkpoint(path, needs=("epoch",))["epoch"])


def resume_point(resume: str | None, out_dir: Path, config: dict[str, Any], search_root: Path,
                 free: Collection[str] | None = None) -> tuple[Path | None, dict[str, Any] | None]:
    """``(checkpoint, state)`` that ``trainer.resume`` names (:func:`find_resume_checkpoint`), read and checked
    against ``config`` (:func:`load_checkpoint`); ``(None, None)`` for a fresh start."""
    path = find_resume_checkpoint(resume, out_dir, config, search_root, free)
    return (path, load_checkpoint(path, config, free)) if path else (None, None)


def find_resume_checkpoint(resume: str | None, out_dir: Path, config: dict[str, Any], search_root: Path,
                           free: Collection[str] | None = None) -> Path | None:
    """Resolve trainer.resume: null (start fresh), a checkpoint file or run directory, or ``auto``.

    ``auto`` takes this run directory's last.pt, else the newest unfinished run under ``search_root`` (the run's
    ``paths.output_dir``: a last.pt and no completed results.json) whose config matches this one.
    """
    if not resume:
        return None
    if resume != "auto":
        path = Path(resume).expanduser()
        path = path / LAST if path.is_dir() else path
        if not path.is_file():
            raise DMLRunnerError(f"trainer.resume={resume}: no checkpoint there (expected a {LAST} file or a run "
                                 "directory containing one)")
        return path
    if (out_dir / LAST).is_file():
        return out_dir / LAST
    search_root = Path(search_root)
    candidates = []
    for cfg_file in search_root.glob(f"**/{CONFIG}") if search_root.is_dir() else []:
        run_dir = cfg_file.parent
        if not (run_dir / LAST).is_file() or run_dir.resolve() == Path(out_dir).resolve() or is_completed(run_dir):
            continue
        if not config_mismatches(json.loads(cfg_file.read_text()), config, free):
            candidates.append(run_dir / LAST)
    if not candidates:
        log.info("trainer.resume=auto: no unfinished run with this config under %s; starting fresh", search_root)
        return None
    return max(candidates, key=lambda p: p.stat().st_mtime)


def _sweep_key(overrides: Collection[str]) -> list[str]:
    """A sweep's overrides as they define its jobs: ``trainer.resume`` and Hydra's own keys left out."""
    from dml_runner.rundir import split_override

    keep = []
    for item in overrides:
        key = split_override(item)[0].lstrip("+~")
        if key != "trainer.resume" and not key.startswith("hydra.") and not key.startswith("hydra/"):
            keep.append(item)
    return sorted(keep)


def find_unfinished_sweep(search_root: Path, overrides: list[str]) -> Path | None:
    """The newest sweep directory under ``search_root`` (``paths.output_dir``) that was started with these
    overrides (``trainer.resume`` aside) and where a job has not completed: ``dml-run -m ... trainer.resume=auto``
    continues there, so every job, the resumed and the fresh ones, ends in one sweep directory with one summary."""
    from omegaconf import OmegaConf

    from dml_runner.training.callbacks import sweep_jobs

    want = _sweep_key(overrides)
    try:
        jobs = len(sweep_jobs(list(overrides)))
    except Exception:  # noqa: BLE001 - a sweeper's own search space (Optuna's interval(...)): jobs not known ahead
        return None
    found = []
    for saved in Path(search_root).glob("**/multirun.yaml") if Path(search_root).is_dir() else []:
        try:
            task = list(OmegaConf.load(saved).hydra.overrides.task)
        except Exception:  # noqa: BLE001 - not a Hydra sweep's file: not a candidate
            continue
        if _sweep_key(task) == want and not all(is_completed(saved.parent / str(n)) for n in range(jobs)):
            found.append(saved.parent)
    return max(found, key=lambda p: (p / "multirun.yaml").stat().st_mtime) if found else None
