"""Reading runs: one record per run directory, with its flattened config, protocol fingerprint and metrics.

A record holds the three readings of a run's test metrics that a report can show:

- ``metrics``: the final epoch (results.json ``metrics``);
- ``best_val``: the test metrics at the epoch that scored best on the validation split (``history.csv``
  ``val/<metric>``; results.json ``best`` when it was chosen on ``val``);
- ``best_test``: the test metrics at the epoch that scored best on the *test* split (``history.csv``
  ``test/<metric>``), i.e. test-set selection, which is what the official Divide & Conquer and HDML codes report.

Both best readings consider trained epochs only (epoch 0, the evaluation before training, never counts) and keep the
earliest epoch on ties, as the trainer does for ``best.pt``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from dml_runner import DMLRunnerError
from dml_runner.config import LABEL_KEYS, NEUTRAL, flagged_keys
from dml_runner.loggers import TRACKER_DIRS
from dml_runner.reference import row_deviations
from dml_runner.rundir import HISTORY, RESULTS, flatten_config, read_results, split_override

log = logging.getLogger(__name__)

# Protocol fingerprint: what must be equal before numbers of two rows can share a table.
FINGERPRINT = ("backbone", "weights", "embedding_dim", "test_transform", "evaluation", "split", "selected_on")

# Config keys (dotted prefixes) that cannot change a reported number: runs differing only in these share a row.
# The settings schemas flag theirs (config.NEUTRAL); the other groups' are named here.
NEUTRAL_KEYS = (*flagged_keys(NEUTRAL), *LABEL_KEYS, "dataset.verify_images", "logger", "reference", "hydra")
# Group choices that carry no setting of their own (their effect is in the config keys) or cannot change a number.
# The presets are chosen from other choices (``preset_method: ${dataset}_${method}``) and are named even where no
# such file exists (``digits_hdml``), so they never name a row.
NEUTRAL_CHOICES = ("logger", "hparams_search", "preset", "preset_sampler", "preset_trainer", "preset_method")
SEED_KEY = "trainer.seed"
MISSING = "∅"  # value shown for a key a run's config does not have


class ReportError(DMLRunnerError):
    """A report that cannot be built as asked (the message says why and what to do)."""


def find_runs(paths: Sequence[Path | str], select_metric: str | None = None) -> list[dict[str, Any]]:
    """One record per run directory under ``paths`` (completed and failed; job dirs without results.json = failed).

    ``select_metric`` picks the best-on-val/test epochs (default: each run's ``trainer.select_metric``)."""
    seen: set[Path] = set()
    records = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise ReportError(f"{path} does not exist")
        if path.is_file():
            candidates = [path]
            job_dirs: list[Path] = []
        else:
            candidates = _run_results(path)
            job_dirs = sorted(p.parent for p in path.rglob(".hydra") if p.is_dir())
        for res_path in candidates:
            run_dir = res_path.parent.resolve()
            if run_dir not in seen:
                seen.add(run_dir)
                records.append(load_run(res_path, select_metric))
        for job_dir in job_dirs:  # a Hydra job that crashed before writing results.json
            if job_dir.resolve() not in seen and not (job_dir / "multirun.yaml").exists():
                seen.add(job_dir.resolve())
                records.append(load_run(job_dir, select_metric))
    return records


def _run_results(root: Path) -> list[Path]:
    """The results.json files of the runs under ``root``: a tracker's copy (MLflow's artifacts, W&B's files) lies in
    a tracker folder or inside another run's directory, and is not a run of its own."""
    found = sorted(root.rglob(RESULTS))
    run_dirs = {p.parent for p in found}
    return [p for p in found
            if not any(part in TRACKER_DIRS for part in p.relative_to(root).parts[:-1])
            and not any(parent in run_dirs for parent in p.parent.parents)]


def _hashable(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return value


def is_neutral(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in NEUTRAL_KEYS)


def recipe_config(res: dict[str, Any]) -> dict[str, Any]:
    """The run's settings that can change a number: flattened resolved config plus its group choices.

    Group choices appear under the group's name (``loss: hdml_npair``); config leaves under their dotted key
    (``loss.pulling_factor: 90``). The seed and neutral keys are left out.
    """
    config = flatten_config(res.get("config") or {}, leaf=_hashable)
    out = {k: v for k, v in config.items() if k != SEED_KEY and not is_neutral(k)}
    for group, choice in (res.get("choices") or {}).items():
        if choice is not None and group not in NEUTRAL_CHOICES and not group.startswith("hydra"):
            out[group] = choice
    return out


def load_run(path: Path | str, select_metric: str | None = None) -> dict[str, Any]:
    """The fields of one run's results.json (``path``: the file or its run directory) and history.csv that a report
    needs; a run without a readable results.json is a failed record."""
    path = Path(path)
    results_path = path / RESULTS if path.is_dir() else path
    res = read_results(results_path)
    if res.get("results_missing"):
        return {"dir": str(results_path.parent), "status": "failed", "row": results_path.parent.name, "seed": None,
                "error": res["error"]}
    cfg = res.get("config") or {}
    ref = cfg.get("reference") or {}
    trainer = cfg.get("trainer") or {}
    rec: dict[str, Any] = {
        "dir": str(results_path.parent), "status": res.get("status", "unknown"), "error": res.get("error"),
        "experiment": (res.get("choices") or {}).get("experiment"), "seed": trainer.get("seed"),
        "ref_paper": ref.get("paper"), "ref_table": ref.get("table"), "paper_row": ref.get("row"),
        "row": ref.get("row") or run_label(res),
        "deviations": row_deviations(ref), "note": ref.get("note") or "",
        "dataset": dataset_label(res), "overrides": list(res.get("overrides") or []),
        "override_keys": {split_override(o)[0] for o in res.get("overrides") or []},
        "smoke": "smoke" in (cfg.get("tags") or []), "config": recipe_config(res),
        "select_metric": select_metric or trainer.get("select_metric") or "recall@1",
    }
    rec.update(fingerprint(res))
    rec["batch"] = batch_label(res)
    rec["frozen"] = (res.get("model") or {}).get("freeze") or (cfg.get("backbone") or {}).get("freeze") or "none"
    rec["metrics"] = res.get("metrics") or {}
    rec["recall_at"] = list((res.get("dataset") or {}).get("recall_at") or [])
    rec["best_checkpoint"] = (res.get("best") or {}).get("test_metrics") or {}
    rec.update(best_epochs(results_path.parent, res, rec["select_metric"]))
    return rec


def best_epochs(run_dir: Path, res: dict[str, Any], metric: str) -> dict[str, Any]:
    """``best_val`` / ``best_test``: test metrics at the trained epoch best on val / test ``metric`` (+ epochs)."""
    out: dict[str, Any] = {"best_val": {}, "best_val_epoch": None, "best_test": {}, "best_test_epoch": None}
    history = None
    path = Path(run_dir) / HISTORY
    if path.is_file():
        try:
            history = pd.read_csv(path)
        except (OSError, ValueError, pd.errors.EmptyDataError) as err:
            log.warning("%s unreadable (%s): no best-epoch values for this run", path, err)
    for split in ("val", "test"):
        picked = _best_row(history, split, metric) if history is not None else None
        if picked is not None:
            epoch, row = picked
            out[f"best_{split}"] = {c.split("/", 1)[1]: float(v) for c, v in row.items()
                                    if c.startswith("test/") and v is not None and not math.isnan(v)}
            out[f"best_{split}_epoch"] = epoch
    best = res.get("best") or {}
    split = best.get("split")
    if split in ("val", "test") and not out[f"best_{split}"] and best.get("metric", metric) == metric:
        out[f"best_{split}"] = dict(best.get("test_metrics") or {})  # no history.csv: the trainer's own choice
        out[f"best_{split}_epoch"] = best.get("epoch")
    return out


def _best_row(history: pd.DataFrame, split: str, metric: str) -> tuple[int, pd.Series] | None:
    col = f"{split}/{metric}"
    if col not in history or "epoch" not in history:
        return None
    trained = history[(history["epoch"] > 0) & history[col].notna()]
    if trained.empty:
        return None
    pos = int(trained[col].to_numpy().argmax())  # first maximum = earliest epoch on ties
    row = trained.iloc[pos]
    return int(row["epoch"]), row


def run_label(res: dict[str, Any]) -> str:
    """A row name for a run without an experiment file: its group choices and overrides, seed left out."""
    choices = res.get("choices") or {}
    if choices.get("experiment"):
        return str(choices["experiment"])
    parts = [f"{g}={choices[g]}" for g in ("loss", "method") if choices.get(g) and choices[g] != "standard"]
    for item in res.get("overrides") or []:
        key = split_override(item)[0]
        if key == SEED_KEY or is_neutral(key) or key in ("loss", "method"):
            continue
        parts.append(item)
    return " ".join(parts) or "default"


def dataset_label(res: dict[str, Any]) -> str:
    cfg_ds = (res.get("config") or {}).get("dataset") or {}
    name = (res.get("dataset") or {}).get("name") or (res.get("choices") or {}).get("dataset") or "?"
    if cfg_ds.get("test_size"):  # VehicleID small/medium/large are separate tables in the papers
        name = f"{name}_{cfg_ds['test_size']}"
    return str(name)


def batch_label(res: dict[str, Any]) -> str:
    """How training batches are built, e.g. ``npair 128 (2/class)``: part of a row's recipe, not of the protocol."""
    cfg = res.get("config") or {}
    sampler = cfg.get("sampler") or {}
    sampler_name = (res.get("choices") or {}).get("sampler") or str(sampler.get("_target_", "?")).rsplit(".", 1)[-1]
    per_class = sampler.get("samples_per_class")
    if per_class is None and sampler_name == "npair":
        per_class = 2
    batch = f"{sampler_name} {(cfg.get('trainer') or {}).get('batch_size', '?')}"
    return batch + (f" ({per_class}/class)" if per_class else "")


def _compact(params: dict[str, Any] | None, skip: Sequence[str] = ("_target_", "train")) -> str:
    if not isinstance(params, dict):
        return ""
    return ",".join(f"{k}={v}" for k, v in params.items() if k not in skip and v is not None)


def fingerprint(res: dict[str, Any]) -> dict[str, Any]:
    """The protocol of a run: dataset split/protocol, test transform, embedding size, backbone and weights,
    evaluation (metrics, K list, query/gallery) and checkpoint choice."""
    cfg = res.get("config") or {}
    model = res.get("model") or {}
    backbone = cfg.get("backbone") or {}
    choices = res.get("choices") or {}
    data = res.get("dataset") or {}
    cfg_ds = cfg.get("dataset") or {}
    transform_cfg = cfg.get("transform") or {}
    name = (data.get("info") or {}).get("transform") or transform_cfg.get("name") or choices.get("transform")
    if name in (None, "none") and cfg_ds.get("default_transform"):
        name = f"{cfg_ds['default_transform']} (dataset default)"
    test = _compact(transform_cfg.get("test"))
    embedding_dim = model.get("embedding_dim", backbone.get("embedding_dim"))
    pretrained = bool(model.get("pretrained", backbone.get("pretrained", False)))
    weights = backbone.get("weights") or model.get("weights")
    eval_cfg = cfg.get("eval") or {}
    ks = data.get("recall_at") or eval_cfg.get("recall_at") or []
    evaluation = f"{data.get('eval_mode', '?')} R@{','.join(map(str, ks))}"
    if eval_cfg.get("metrics"):
        evaluation += " " + ",".join(map(str, eval_cfg["metrics"]))
    split = " ".join(f"{k} {cfg_ds[k]}" for k in ("protocol", "split_file", "val_fraction", "repeats")
                     if cfg_ds.get(k) is not None)
    return {
        "backbone": model.get("arch") or backbone.get("arch") or choices.get("backbone"),
        "weights": str(weights) if weights else ("pretrained" if pretrained else "random init"),
        "embedding_dim": int(embedding_dim) if embedding_dim is not None else None,
        "test_transform": f"{name or 'none'}" + (f" [{test}]" if test else ""),
        "evaluation": evaluation,
        "split": split or "default",
        "selected_on": res.get("checkpoint_selected_on") or "?",
    }
