"""The run directory: its files, how they are written (atomically), results.json and embeddings.npz.

A run directory holds (the checkpoints are :mod:`dml_runner.training.checkpoint`'s)::

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
import os
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dml_runner import DMLRunnerError

if TYPE_CHECKING:
    import numpy as np

CONFIG, RESULTS, HISTORY, EMBEDDINGS = "config.json", "results.json", "history.csv", "embeddings.npz"
LAST, BEST = "last.pt", "best.pt"
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


def unwritable_reason(folder: Path | str) -> str | None:
    """Why ``folder`` cannot be created or written (None when it can): its nearest existing ancestor is a file, or
    refuses a new entry. Leaves nothing behind (the probe is an empty folder, removed at once)."""
    import tempfile

    folder = Path(folder).expanduser().absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".dml-write-probe-", dir=existing))
    except OSError as err:
        return f"{existing} cannot be written ({err.strerror or err})"
    return None


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


def save_npz_atomic(path: Path | str, **arrays: Any) -> None:
    """numpy.savez_compressed written atomically (the temporary name ends in .npz, else numpy appends it)."""
    import numpy as np

    with atomic_path(path, suffix=".tmp.npz") as tmp:
        np.savez_compressed(tmp, **arrays)


def write_embeddings(path: str | Path, embeddings: np.ndarray, labels: np.ndarray, dataset: Any,
                     query_mask: np.ndarray | None = None, gallery_mask: np.ndarray | None = None,
                     **extra: str) -> Path:
    """Write ``embeddings.npz`` for the items of ``dataset`` (a ``LabelledDataset``: its ``item_paths()`` and
    ``item_class_names()``, in its order); atomic (a temporary file, then rename).

    Arrays: ``embeddings`` (N x D float32), ``labels`` (N int64), ``paths`` and ``class_names`` (N strings each:
    the item's image file and the name of its class, from the dataset), ``query_mask`` / ``gallery_mask`` when given,
    and ``extra`` strings (the checkpoint; ``fingerprint``, :func:`model_fingerprint` of the model that embedded
    them) as 0-d string arrays. Nothing is pickled.
    """
    import numpy as np

    path = Path(path)
    emb = np.asarray(embeddings, dtype=np.float32)
    labels = np.asarray(labels)
    n = len(dataset)
    if emb.ndim != 2 or emb.shape[0] != n:
        raise ValueError(f"embeddings of shape {emb.shape} for a dataset of {n} items; expected ({n}, D)")
    if not np.array_equal(labels, dataset.labels):
        raise ValueError("labels differ from the dataset's labels: write the embeddings of the dataset given")
    arrays: dict[str, np.ndarray] = {"embeddings": emb, "labels": labels.astype(np.int64),
                                     "paths": dataset.item_paths(), "class_names": dataset.item_class_names()}
    for key, mask in (("query_mask", query_mask), ("gallery_mask", gallery_mask)):
        if mask is not None:
            arrays[key] = np.asarray(mask, dtype=bool)
            if arrays[key].shape != (n,):
                raise ValueError(f"{key} of shape {arrays[key].shape}; expected ({n},)")
    arrays.update({key: np.asarray(str(value)) for key, value in extra.items()})
    save_npz_atomic(path, **arrays)
    return path


def model_fingerprint(model: Any, config: Mapping[str, Any]) -> str:
    """A short hash of what makes a model's embeddings: its weights (every state-dict entry's name, dtype, shape and
    bytes) and the config of its backbone and head (``backbone``, ``eval.normalize``). Written into embeddings.npz as
    ``fingerprint`` by the run and by dml-embed; dml-search refuses an index whose fingerprint differs from its
    model's. Wrappers' key prefixes (DDP's ``module.``, torch.compile's ``_orig_mod.``) are left out."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    node = {"backbone": config.get("backbone"), "normalize": (config.get("eval") or {}).get("normalize")}
    digest.update(json.dumps(node, sort_keys=True, default=str).encode())
    for key, tensor in sorted(model.state_dict().items()):
        key = key.replace("_orig_mod.", "").removeprefix("module.")
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{key}|{data.dtype}|{tuple(data.shape)}".encode())
        if data.numel():
            digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


EMBEDDINGS_CONTENTS = (
    "the file must be a .npz (numpy.savez) with 'embeddings' (N x D floats) and 'labels' (N integers), "
    "and optionally boolean 'query_mask' and 'gallery_mask' of length N"
)


class EmbeddingsFileError(DMLRunnerError):
    """A file given as embeddings that is not an embeddings ``.npz`` (the message says what it is)."""


def read_embeddings(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of an embeddings file (:func:`write_embeddings`'s, or any ``.npz`` with ``embeddings`` and
    ``labels``), checked: a file that is not one is an :class:`EmbeddingsFileError` saying what it is instead."""
    import zipfile

    import numpy as np

    path = str(path)

    def bad(what: str) -> EmbeddingsFileError:
        return EmbeddingsFileError(f"{path}: {what}; {EMBEDDINGS_CONTENTS}")

    if not os.path.exists(path):
        raise bad("file not found")
    if os.path.isdir(path):
        raise bad("is a directory")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head.startswith(b"\x93NUMPY"):
        raise EmbeddingsFileError(f"{path}: is a single .npy array, not an .npz archive; save both arrays with "
                                  "numpy.savez(path, embeddings=..., labels=...)")
    if not head.startswith(b"PK"):
        kind = "a text file" if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head) else \
            "empty" if not head else f"a file starting with bytes {head!r}"
        raise bad(f"not an .npz archive (it is {kind})")
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise bad("not an .npz archive")
        with data:
            arrays = {k: data[k] for k in data.files}
    except EmbeddingsFileError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc):
            raise bad("holds Python objects (pickled arrays), which are not loaded") from None
        raise bad(f"cannot be read as .npz ({exc})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise bad(f"cannot be read as .npz ({exc})") from None
    missing = [k for k in ("embeddings", "labels") if k not in arrays]
    if missing:
        raise bad(f"missing key(s) {missing} (found {sorted(arrays)})")
    emb, lab = arrays["embeddings"], arrays["labels"]
    if emb.ndim != 2:
        raise bad(f"'embeddings' has shape {emb.shape}, expected (N, D)")
    if lab.ndim != 1 or lab.shape[0] != emb.shape[0]:
        raise bad(f"length mismatch: {emb.shape[0]} embeddings but labels of shape {lab.shape}")
    for key in ("query_mask", "gallery_mask"):
        if key in arrays and arrays[key].shape != (emb.shape[0],):
            raise bad(f"'{key}' has shape {arrays[key].shape}, expected ({emb.shape[0]},)")
    return arrays


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
        "timing": outcome.get("timing"),  # data_time_s / step_time_s per trained epoch and in total
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


# ----------------------------------------------------------------------------------------------- resume matching
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
