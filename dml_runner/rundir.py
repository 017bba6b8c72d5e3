"""The run directory: its files, how they are written (atomically), results.json, checkpoints and resume discovery.

A run directory holds::

    config.json      the resolved config (written before training)
    last.pt          checkpoint of the last completed epoch       best.pt  checkpoint chosen on the selection split
    history.csv      one row per epoch                            embeddings.npz  final test embeddings (dml-eval)
    results.json     status (completed | failed | interrupted), metrics, best checkpoint, provenance

Every file is written to a temporary name and renamed, so a crash or a full disk never leaves a half-written file
in place of a good one. Plain Python, numpy and torch; no Hydra.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

from dml_runner import DMLRunnerError

log = logging.getLogger(__name__)

CONFIG, RESULTS, HISTORY, EMBEDDINGS = "config.json", "results.json", "history.csv", "embeddings.npz"
LAST, BEST = "last.pt", "best.pt"
CHECKPOINT_FORMAT = 1
COMPLETED, FAILED, INTERRUPTED = "completed", "failed", "interrupted"
NO_RESULTS = "no results.json (the job crashed or was killed)"


# ----------------------------------------------------------------------------------------------- atomic writers
@contextlib.contextmanager
def atomic_path(path: Path | str, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``, on any error it is removed."""
    path = Path(path)
    tmp = path.with_name(path.name + suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(obj: Any, path: Path | str) -> None:
    """JSON (indented, non-JSON values as str) written atomically."""
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, default=str)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def write_csv_atomic(rows: list[dict[str, Any]], path: Path | str) -> None:
    """A CSV of dict rows; the columns are every key in order of first appearance (missing cells are empty)."""
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def save_torch_atomic(obj: Any, path: Path | str) -> None:
    """torch.save written atomically (a crash mid-write never corrupts the previous checkpoint)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_npz_atomic(path: Path | str, **arrays: Any) -> None:
    """numpy.savez_compressed written atomically (the temporary name ends in .npz, else numpy appends it)."""
    import numpy as np

    with atomic_path(path, suffix=".tmp.npz") as tmp:
        np.savez_compressed(tmp, **arrays)


# ----------------------------------------------------------------------------------------------- results.json
def read_results(path: Path | str) -> dict[str, Any]:
    """The parsed results.json of a run (``path``: the run directory or the file itself).

    The one reader of the file (the sweep summary and the report use it). A missing or unreadable file reads as a
    failed run with ``results_missing: True``, its ``error`` saying why, and the ``overrides`` Hydra saved before the
    job started (.hydra/overrides.yaml).
    """
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS
    error = None
    if not path.exists():
        error = NO_RESULTS
    else:
        try:
            res = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            error = f"unreadable results.json ({err})"
        else:
            if isinstance(res, dict):
                return res
            error = "unreadable results.json (not a JSON object)"
    return {"status": FAILED, "error": error, "overrides": _hydra_overrides(path.parent), "results_missing": True}


def split_override(item: str) -> tuple[str, str]:
    """(key, value) of one of results.json's ``overrides`` (Hydra's ``+key=v``, ``~key`` and ``key=v`` forms)."""
    key, _, value = item.partition("=")
    return key.lstrip("+~"), value


def is_completed(run_dir: Path | str) -> bool:
    return read_results(run_dir).get("status") == COMPLETED


def _hydra_overrides(run_dir: Path) -> list[str]:
    import yaml

    path = run_dir / ".hydra" / "overrides.yaml"
    try:
        return [str(o) for o in yaml.safe_load(path.read_text()) or []]
    except (OSError, yaml.YAMLError):
        return []


def completed_results(*, outcome: dict[str, Any], data: Any, counts: dict[str, Any], recall_at: list[int],
                      model: Any, wall_time_s: float, resume_path: Path | None, provenance: dict[str, Any],
                      hydra_meta: dict[str, Any] | None, config: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """results.json of a completed run, from the Trainer's outcome and the objects the run built."""
    return {
        "status": COMPLETED,
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
        "wall_time_s": round(wall_time_s, 2),
        "train_time_s": round(outcome["wall_time_s"], 2),
        "resumed_from": {"checkpoint": str(resume_path), "epoch": outcome["resumed_from_epoch"]}
        if resume_path else None,
        "world_size": outcome["world_size"],
        **provenance,
        **(hydra_meta or {}),
        "config": config,
        "output_dir": str(out_dir),
    }


def interrupted_results(*, signame: str, checkpoint: Path | None, checkpoint_epoch: int | None, command: str,
                        hydra_meta: dict[str, Any] | None, config: Any, out_dir: Path) -> dict[str, Any]:
    return {"status": INTERRUPTED, "signal": signame, "checkpoint": str(checkpoint) if checkpoint else None,
            "checkpoint_epoch": checkpoint_epoch, "resume_command": command, **(hydra_meta or {}),
            "config": config, "output_dir": str(out_dir)}


def failed_results(error: BaseException, hydra_meta: dict[str, Any] | None, config: Any) -> dict[str, Any]:
    out = {"status": FAILED, "error": f"{type(error).__name__}: {error}", **(hydra_meta or {})}
    if config is not None:
        out["config"] = config
    return out


# ----------------------------------------------------------------------------------------------- checkpoints
def build_checkpoint(*, epoch: int, model: dict[str, Any], loss: dict[str, Any], method: dict[str, Any],
                     history: list[dict[str, Any]], best: dict[str, Any] | None,
                     untrained: dict[str, float] | None, last_test: dict[str, float] | None,
                     pending_eval: dict[str, Any] | None, config: dict[str, Any],
                     metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything needed to continue a run after ``epoch`` (state dicts, progress, the config).

    Only tensors and plain containers, so it loads with ``torch.load(weights_only=True)``. No RNG state: every
    generator is reseeded from (seed, epoch) at each epoch start and a run resumes only at an epoch boundary.
    """
    return {"format": CHECKPOINT_FORMAT, "epoch": epoch, "model": model, "loss": loss, "method": method,
            "metrics": metrics or {}, "history": history, "best": best, "untrained": untrained,
            "last_test": last_test, "pending_eval": pending_eval, "config": config}


def flatten_config(tree: Mapping[str, Any], leaf: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """Dotted leaf keys of a nested config: ``{"trainer": {"epochs": 2}}`` -> ``{"trainer.epochs": 2}``.

    The one flattener (resume's comparison, the trackers' params, the report's recipes). Non-empty mappings are
    walked; every other value, lists and empty mappings included, is a leaf, stored as ``leaf(value)`` (default: as
    it is).
    """
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out.update({f"{key}.{k}": v for k, v in flatten_config(value, leaf).items()})
        else:
            out[str(key)] = value if leaf is None else leaf(value)
    return out


def config_mismatches(saved: dict[str, Any], current: dict[str, Any],
                      free: Collection[str] | None = None) -> list[str]:
    """Dotted config keys whose values differ, formatted ``key: saved -> current``, ignoring the keys that may
    change on resume (``free``; default :func:`dml_runner.config.resume_free_keys`) and the keys below them."""
    if free is None:
        from dml_runner.config import resume_free_keys

        free = resume_free_keys()
    a, b = flatten_config(saved), flatten_config(current)
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) == b.get(key) or any(key == f or key.startswith(f + ".") for f in free):
            continue
        out.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return out


def load_checkpoint(path: Path, config: dict[str, Any], free: Collection[str] | None = None) -> dict[str, Any]:
    """A checkpoint written by :func:`build_checkpoint`, refused when its config differs from ``config``."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise DMLRunnerError(f"cannot read checkpoint {path}: {err}") from err
    if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
        raise DMLRunnerError(f"{path} is not a dml-run checkpoint (no model/epoch entries)")
    mismatched = config_mismatches(state.get("config") or {}, config, free)
    if mismatched:
        raise DMLRunnerError(f"checkpoint {path} was trained with a different config; refusing to resume. "
                             "Mismatched fields (checkpoint -> now):\n  " + "\n  ".join(mismatched))
    return state


def checkpoint_epoch(path: Path) -> int:
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])


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
