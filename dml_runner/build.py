"""The one builder from config to objects, and the contracts between the config groups and the trainer.

:func:`instantiate` is the package's call of ``hydra.utils.instantiate`` for the run's groups: it names the group in
its error and, right after building, :func:`check` verifies that the object honours its group's contract, so a
plug-in that returns the wrong thing fails with one line naming the option and what is missing, not with an
AttributeError deep inside the first epoch. :func:`build_model`, :func:`build_loss`, :func:`sampler_factory` and
:func:`build_evaluate` build what :mod:`dml_runner.run` hands the Trainer; the trained-run library
(:mod:`dml_runner.trained`), scripts/ and examples/ build through the same functions. docs/ARCHITECTURE.md describes
the contracts in prose; docs/EXTENDING.md shows one example of each.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from dml_runner import DMLRunnerError

if TYPE_CHECKING:
    from dml_runner.config import EvalConfig

EVAL_MODES = ("loo", "query_gallery")


def _labelled(obj: Any) -> list[str]:
    """What a LabelledDataset-like split lacks: ``__len__``, ``__getitem__``, a 1-D integer ``labels`` array of that
    length and ``in_channels``."""
    problems = [f"no {name}" for name in ("__len__", "__getitem__", "labels", "in_channels") if not hasattr(obj, name)]
    if problems:
        return problems
    labels = np.asarray(obj.labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or len(labels) != len(obj):
        problems.append(f"labels must be a 1-D integer array of length len(dataset); got {labels.dtype} "
                        f"{labels.shape} for {len(obj)} items")
    return problems


def dataset_problems(splits: Any) -> list[str]:
    from dml_runner.datasets.base import DatasetSplits

    if not isinstance(splits, DatasetSplits):
        return [f"returned {type(splits).__name__}, not a dml_runner.datasets.base.DatasetSplits"]
    problems = [f"{name}: {p}" for name in ("train", "test") for p in _labelled(getattr(splits, name))]
    if splits.val is not None:
        problems += [f"val: {p}" for p in _labelled(splits.val)]
    if splits.eval_mode not in EVAL_MODES:
        problems.append(f"eval_mode {splits.eval_mode!r} is not one of {', '.join(EVAL_MODES)}")
    elif splits.eval_mode == "query_gallery":
        for name in ("query_mask", "gallery_mask"):
            mask = getattr(splits, name)
            if mask is None or np.asarray(mask).shape != (len(splits.test),):
                problems.append(f"{name} must be a boolean array over the test split for eval_mode query_gallery")
    return problems


def backbone_problems(model: Any) -> list[str]:
    if not isinstance(model, nn.Module):
        return [f"returned {type(model).__name__}, not a torch.nn.Module"]
    missing = [name for name in ("trunk", "head", "features", "feature_dim", "embedding_dim") if not hasattr(model, name)]
    if missing:
        return [f"has no {', '.join(missing)} (build a dml_runner.backbones.EmbeddingModel(trunk, EmbeddingHead(...)); "
                f"the trunk needs a feature_dim attribute)"]
    return []


def loss_problems(loss: Any) -> list[str]:
    if not isinstance(loss, nn.Module):
        return [f"returned {type(loss).__name__}, not a torch.nn.Module"]
    try:
        inspect.signature(loss.forward).bind(None, None)
    except TypeError:
        return [f"forward{inspect.signature(loss.forward)} cannot be called as forward(embeddings, labels)"]
    return []


def method_problems(method: Any) -> list[str]:
    missing = [name for name in ("setup", "batches", "compute_loss", "backward_and_step", "on_epoch_start",
                                 "on_epoch_end", "state_dict", "load_state_dict")
               if not callable(getattr(method, name, None))]
    return [f"has no {', '.join(missing)} (subclass dml_runner.methods.base.Method)"] if missing else []


def sampler_problems(sampler: Any) -> list[str]:
    missing = [name for name in ("__iter__", "__len__", "set_epoch") if not callable(getattr(sampler, name, None))]
    return [f"has no {', '.join(missing)} (a batch sampler yields lists of indices, has len() and "
            f"set_epoch(epoch))"] if missing else []


CHECKS: dict[str, Callable[[Any], list[str]]] = {
    "dataset": dataset_problems,
    "backbone": backbone_problems,
    "loss": loss_problems,
    "method": method_problems,
    "sampler": sampler_problems,
}


def check(group: str, obj: Any, target: str | None = None) -> Any:
    """``obj`` if it honours the contract of ``group`` (groups without a contract pass), else a one-line error."""
    problems = CHECKS[group](obj) if group in CHECKS else []
    if problems:
        where = f"{group}={target}" if target else group
        raise DMLRunnerError(f"{where} breaks the {group} contract (docs/ARCHITECTURE.md): {'; '.join(problems)}")
    return obj


# ----------------------------------------------------------------------------------------------- the builder
def instantiate(node: Any, what: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(node, **kwargs)`` (plain containers), checked against the contract of the group
    ``what``; a failure is one :class:`DMLRunnerError` that names the group. A dataset node's run-level keys
    (:data:`dml_runner.config.RUNNER_DATASET_KEYS`) never reach its target: ``cache`` is the run's, and
    ``folds``/``fold``/``fold_seed`` are applied here, fold ``fold`` of ``folds`` class-disjoint folds of the training
    classes becoming the validation split."""
    if what == "dataset" and hasattr(node, "keys"):
        from dml_runner.config import RUNNER_DATASET_KEYS

        if any(k in node for k in RUNNER_DATASET_KEYS):
            return _dataset(node, **kwargs)
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    try:
        built = hydra_instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, DMLRunnerError):
            raise cause
        if isinstance(cause, (ValueError, TypeError)) and "\n" not in str(cause):  # the target's own refusal
            raise DMLRunnerError(f"could not build `{what}`: {cause}") from err
        raise DMLRunnerError(f"could not build `{what}` from its config: {err}") from err
    target = node.get("_target_") if hasattr(node, "get") else None
    return check(what, built, target)


def _dataset(node: Any, **kwargs: Any) -> Any:
    """The dataset's target built without the run-level keys, then its fold held out (dataset.folds >= 2)."""
    from omegaconf import OmegaConf

    from dml_runner.config import FOLD_KEYS, RUNNER_DATASET_KEYS
    from dml_runner.datasets.folds import check_folds, with_validation_fold

    plain = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    folds, fold, fold_seed = (int(plain.get(k) or 0) for k in FOLD_KEYS)
    check_folds(folds, fold, val_fraction=float(plain.get("val_fraction") or 0.0))  # before any data is read
    data = instantiate({k: v for k, v in plain.items() if k not in RUNNER_DATASET_KEYS}, "dataset", **kwargs)
    return with_validation_fold(data, folds, fold, fold_seed) if folds else data


def build_dataset(cfg: Any, progress: bool = True) -> Any:
    """The dataset as a run builds it: the dataset group (with its fold held out), served through the decoded-image
    cache ``dataset.cache`` in ``paths.cache_dir`` (docs/CACHE.md); dml-run and ``dml-prepare --cache`` use it."""
    from dml_runner.datasets.decoded_cache import apply_decoded_cache

    data = instantiate(cfg.dataset, "dataset")
    return apply_decoded_cache(data, cfg.dataset.get("cache", "none"), cfg.paths.get("cache_dir"), progress=progress)


def build_model(cfg: Any, in_channels: int) -> Any:
    """The embedding model as a run builds it (before any method changes it): the backbone group and
    eval.normalize; the trained-run library rebuilds a run's model with it."""
    from dml_runner.config import eval_settings

    model = instantiate(cfg.backbone, "backbone", in_channels=in_channels)
    if eval_settings(cfg).normalize:
        model.head.eval_normalize = True
    return model


def build_loss(cfg: Any, train_labels: Any) -> Any:
    """The loss group; a loss that learns per-class weights (loss=pml ProxyAnchorLoss, ...) declares
    ``train_labels`` in its config and gets them."""
    return instantiate(cfg.loss, "loss", **({"train_labels": train_labels} if "train_labels" in cfg.loss else {}))


def build_scheduler(cfg: Any) -> Callable | None:
    """The scheduler factory, or None when the scheduler group builds nothing."""
    return instantiate(cfg.scheduler, "scheduler") if cfg.get("scheduler") and cfg.scheduler.get("_target_") \
        else None


def sampler_factory(node: Any, default_batch_size: int, default_seed: int) -> Callable[..., Any]:
    """``make_sampler(labels, batch_size=None, seed=None)``: the sampler group built for a label array, with the
    trainer's batch size and seed unless a method asks for others."""
    def make_sampler(labels: Any, batch_size: int | None = None, seed: int | None = None) -> Any:
        return instantiate(node, "sampler", labels=labels,
                           batch_size=default_batch_size if batch_size is None else batch_size,
                           seed=default_seed if seed is None else seed)

    return make_sampler


def build_evaluate(e: EvalConfig, recall_at: list[int], trainer_seed: int) -> Any:
    """The evaluation function the Trainer calls: dml_runner.evaluation.evaluate with the eval settings bound."""
    from dml_runner.evaluation import evaluate

    default = partial(evaluate, recall_at=tuple(recall_at), metrics=tuple(e.metrics), device=e.device,
                      seed=trainer_seed if e.seed is None else e.seed, chunk_size=e.chunk_size,
                      kmeans_iters=e.kmeans_iters, backend=str(e.backend))
    if not (e.precision_at or e.map_at or e.mrr):
        return default
    from dml_runner.evaluation.per_query import requested_metrics

    def with_requested(embeddings: Any, labels: Any, **masks: Any) -> dict[str, float]:
        """The default metrics plus those asked for with eval.precision_at / map_at / mrr."""
        out = default(embeddings, labels, **masks)
        out.update(requested_metrics(embeddings, labels, precision_at=e.precision_at, map_at=e.map_at, mrr=e.mrr,
                                     device=e.device, **masks))
        return out

    return with_requested
