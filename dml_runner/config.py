"""Structured configs (validated schemas), the checks run before any work, and the location of the config tree.

Hydra is imported here only inside functions, so the evaluation engine can import :class:`EvalBackend` without it
(docs/ARCHITECTURE.md lists where the package uses Hydra).
The `trainer`, `eval` and `paths` groups are validated against the dataclasses below, which are also the settings
objects the code reads (:func:`trainer_settings`, :func:`eval_settings`): a typo (``trainer.epoch=3``), a wrong type
(``trainer.epochs=ten``) or a choice that is not a member of its Enum (``trainer.select_on=tst``) is refused by
Hydra with a message naming the field. Keys forced in with ``+``
(``+trainer.epoch=3``, Hydra's own hint for that typo) pass Hydra, so :func:`validate_config` refuses them, and
checks the values of every group, before data are loaded or a step is trained.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable
from dataclasses import MISSING, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from dml_runner import DMLRunnerError
from dml_runner.devices import DEVICE_CHOICES, DEVICE_PATTERN

# Metadata flag of a field whose value may differ between a checkpoint's run and the run that resumes it: it says
# where or how long a run goes, or what is measured, never what the trained weights become.
RESUME_FREE = "resume_free"
# Metadata flag of a field that cannot change a reported number (where files go, speed, what is saved): runs that
# differ only in such fields share a row of a report. A neutral field is also resume-free.
NEUTRAL = "neutral"


def _opt(default: Any, help: str, resume_free: bool = False, neutral: bool = False) -> Any:  # noqa: A002
    metadata = {"help": help, RESUME_FREE: resume_free or neutral, NEUTRAL: neutral}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


class Choice(str, Enum):
    """A setting with a fixed set of values; members equal and print as their strings (``SelectOn.val == "val"``)."""

    def __str__(self) -> str:
        return str(self.value)


class SelectOn(Choice):
    """Which split chooses best.pt."""

    auto = "auto"
    val = "val"
    final = "final"
    test = "test"


class EvalBackend(Choice):
    """Retrieval search of the evaluation (docs/EVALUATION.md); ``auto`` picks one per problem and CPU."""

    auto = "auto"
    torch_screened = "torch_screened"
    torch_fp32 = "torch_fp32"
    torch_symmetric = "torch_symmetric"
    faiss = "faiss"


@dataclass
class TrainerConfig:
    """The training loop's settings: the schema of the `trainer` group and what :class:`dml_runner.training.trainer.Trainer`
    reads."""

    epochs: int = _opt(30, "epochs to train", resume_free=True)
    batch_size: int = _opt(64, "images per training batch")
    device: str = _opt("auto", "auto | cpu | cuda | cuda:N | mps", resume_free=True)
    amp: bool = _opt(True, "bf16 autocast, CUDA only (ignored on the CPU)")
    channels_last: bool = _opt(True, "channels-last memory format, CUDA only")
    seed: int = _opt(0, "seed of every random generator (a run is repeatable from it)")
    deterministic: bool = _opt(False, "torch.use_deterministic_algorithms (slower on CUDA)")
    eval_every: int = _opt(5, "evaluate every N epochs (and always after the last one)", resume_free=True)
    eval_before_training: bool = _opt(True, "report the untrained network (epoch 0) so the gain is visible")
    select_on: SelectOn = _opt(SelectOn.auto, "checkpoint choice: auto (val split if any, else the final epoch) "
                                              "| val | final | test (optimistic)")
    select_metric: str = _opt("recall@1", "metric that selects the checkpoint (recall@K, map@r, nmi, ...)")
    num_workers: Optional[int] = _opt(None, "DataLoader worker processes (null: image files on CUDA take "
                                             "min(8, cores per GPU - 1), else 0)", neutral=True)
    num_threads: Optional[int] = _opt(None, "torch intra-op CPU threads (null: torch's default)", neutral=True)
    pin_memory: bool = _opt(True, "pinned host memory for CUDA transfers", neutral=True)
    persistent_workers: bool = _opt(True, "keep DataLoader workers between epochs and between evaluations "
                                          "(num_workers > 0)", neutral=True)
    prefetch_factor: Optional[int] = _opt(None, "batches each DataLoader worker loads ahead (null: torch's default, "
                                                "2; used when num_workers > 0)", neutral=True)
    compile: bool = _opt(False, "torch.compile the backbone's trunk (the first steps are slower while it compiles)",
                         resume_free=True)
    eval_batch_size: int = _opt(256, "images per batch when embedding for evaluation", neutral=True)
    head_lr_mult: float = _opt(1.0, "learning-rate multiplier of the embedding head (Song 2016 uses 10)")
    loss_lr_mult: float = _opt(1.0, "learning-rate multiplier of learnable loss parameters")
    grad_clip: Optional[float] = _opt(None, "clip the gradient norm to this value (null: no clipping)")
    max_steps_per_epoch: Optional[int] = _opt(None, "cap batches per epoch (smoke tests, quick looks)")
    save_checkpoints: bool = _opt(True, "write last.pt (every epoch) and best.pt", neutral=True)
    save_embeddings: bool = _opt(True, "write the final test embeddings to embeddings.npz (for dml-eval)",
                                 neutral=True)
    progress: bool = _opt(True, "tqdm bar on a terminal (one log line per epoch otherwise)", neutral=True)
    cache_features: bool = _opt(False, "frozen trunk: compute pooled features once per image and view")
    cache_views: int = _opt(1, "augmented views cached per image when cache_features=true")
    sync_bn: bool = _opt(False, "torchrun: BatchNorm statistics over the global batch (SyncBatchNorm; CUDA only)")
    dist_timeout_s: float = _opt(14400.0, "torchrun: seconds a rank may wait in a collective (rank 0 evaluates "
                                          "alone meanwhile)", neutral=True)
    resume: Optional[str] = _opt(None, "null | auto (an unfinished run with this config) | a run dir or last.pt",
                                 neutral=True)


@dataclass
class EvalConfig:
    """What is measured; every field may change on resume (evaluation never feeds back into training)."""

    recall_at: list[int] = _opt([1, 2, 4, 8], "K values of Recall@K", resume_free=True)
    use_dataset_recall_at: bool = _opt(True, "a dataset's customary K list (SOP 1..1000, In-shop 1..50) wins",
                                       resume_free=True)
    metrics: list[str] = _opt(["recall", "nmi", "f1", "map_at_r", "r_precision"], "metrics to compute",
                              resume_free=True)
    device: str = _opt("auto", "auto | cpu | cuda | cuda:N | mps", resume_free=True)
    backend: EvalBackend = _opt(EvalBackend.auto, "retrieval search: auto (by problem size and CPU, "
                                                  "docs/EVALUATION.md) | torch_screened | torch_fp32 | "
                                                  "torch_symmetric (leave-one-out only) | faiss", resume_free=True)
    chunk_size: int = _opt(4096, "queries per block of the retrieval search", neutral=True)
    kmeans_iters: int = _opt(50, "k-means iterations for NMI and F1", resume_free=True)
    seed: Optional[int] = _opt(None, "k-means seed (null: trainer.seed)", resume_free=True)
    normalize: bool = _opt(False, "L2-normalise the embeddings for evaluation only (training sees them raw)",
                           resume_free=True)
    amp: bool = _opt(False, "embed for evaluation under the trainer's bf16 autocast (CUDA with trainer.amp); "
                            "false: float32, as dml-embed and the papers' codes", resume_free=True)
    precision_at: list[int] = _opt([], "also precision@K for these K (open-metric-learning's definition; computed "
                                       "only when asked)", resume_free=True)
    map_at: list[int] = _opt([], "also MAP@K for these K (computed only when asked)", resume_free=True)
    mrr: bool = _opt(False, "also the mean reciprocal rank of the nearest positive (mrr)", resume_free=True)


@dataclass
class PathsConfig:
    """Where data are read and runs are written; may change on resume (the files move, the run stays the same)."""

    data_dir: str = _opt("${oc.env:DML_DATA,data}", "root of the dataset folders", neutral=True)
    output_dir: str = _opt("outputs", "root of run and sweep directories; trainer.resume=auto searches it",
                           neutral=True)
    cache_dir: str = _opt("${oc.env:DML_CACHE,${paths.data_dir}/.dml_cache}",
                          "where the decoded-image caches live (dataset.cache; docs/CACHE.md)", neutral=True)


SCHEMAS = {"trainer": TrainerConfig, "eval": EvalConfig, "paths": PathsConfig}
# Groups built with hydra.utils.instantiate: their keys must be parameters of the `_target_` they build.
INSTANTIATED_GROUPS = ("dataset", "transform", "backbone", "sampler", "optimizer", "scheduler", "method", "loss",
                       "logger")
# Top-level keys without a schema: free labels (tags), a paper row's metadata (reference), the sweeper's settings.
LABEL_KEYS = ("tags",)  # recorded with a run, never read by training: may change on resume
# Keys of the dataset group that the run reads, not the dataset's builder (build.instantiate leaves them out).
# dataset.folds / fold / fold_seed: the class-disjoint fold held out for validation (dml_runner/datasets/folds.py)
FOLD_KEYS = ("folds", "fold", "fold_seed")
# Keys of every dataset node that the run reads and the builder applies (dml_runner.build), never the dataset's target:
# the decoded-image cache and the fold.
RUNNER_DATASET_KEYS = ("cache", *FOLD_KEYS)
# dataset.cache: the decoded-image cache (dml_runner/datasets/decoded_cache.py, docs/CACHE.md)
CACHE_MODES = ("auto", "none", "fixed_scale")
TOP_LEVEL_KEYS = set(SCHEMAS) | set(INSTANTIATED_GROUPS) | {"tags", "reference", "hparams_search"}


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for group, schema in SCHEMAS.items():
        cs.store(group=group, name="schema", node=schema)


def trainer_settings(cfg: Any) -> TrainerConfig:
    """cfg.trainer as a :class:`TrainerConfig` instance (what the Trainer takes); unknown keys are refused."""
    return _to_schema(cfg.trainer, TrainerConfig, "trainer")


def eval_settings(cfg: Any) -> EvalConfig:
    """cfg.eval as an :class:`EvalConfig` instance; unknown keys are refused."""
    return _to_schema(cfg.eval, EvalConfig, "eval")


def _to_schema(node: Any, schema: type, group: str) -> Any:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:  # resolved in place first: an interpolation (eval_every: ${trainer.epochs}) refers to the whole config
        values = OmegaConf.to_container(node, resolve=True, enum_to_str=True) if OmegaConf.is_config(node) else node
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))
    except OmegaConfBaseException as err:
        raise DMLRunnerError(f"{group}: {err.msg if hasattr(err, 'msg') else err} (dml-run --help lists the "
                             "options)") from err


def flagged_keys(flag: str) -> list[str]:
    """Dotted keys (``trainer.num_workers``) of the schema fields whose metadata sets ``flag``."""
    return [f"{group}.{f.name}" for group, schema in SCHEMAS.items() for f in fields(schema) if f.metadata.get(flag)]


def resume_free_keys(cfg: Any = None) -> set[str]:
    """Dotted config keys whose values may differ between a checkpoint's run and the run resuming it.

    The fields flagged ``resume_free`` in the schemas and the label keys; with the (unresolved) config ``cfg``, also
    every key whose value is an interpolation of free keys only (``scheduler.T_max: ${trainer.epochs}``,
    ``dataset.root: ${paths.data_dir}/cub200``), since it changes only when they do.
    """
    free = set(flagged_keys(RESUME_FREE)) | set(LABEL_KEYS)
    while cfg is not None:  # until no new key follows (an interpolation of an interpolation of a free key)
        more = _interpolated_from(cfg, free) - free
        if not more:
            break
        free |= more
    return free


_REFERENCE = re.compile(r"\$\{([^${}:]+)\}")


def _interpolated_from(cfg: Any, free: set[str]) -> set[str]:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    out: set[str] = set()

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, DictConfig):
            items: Iterable = node.keys()
        elif isinstance(node, ListConfig):
            items = range(len(node))
        else:
            return
        for key in items:
            path = f"{prefix}{key}"
            if OmegaConf.is_interpolation(node, key):
                raw = str(node._get_node(key)._value())  # noqa: SLF001 - the unresolved text
                refs = _REFERENCE.findall(raw)
                if refs and all(r in free for r in refs) and "${" not in _REFERENCE.sub("", raw):
                    out.add(path)
            else:
                walk(node._get_node(key), f"{path}.")  # noqa: SLF001 - the child node, unresolved

    walk(cfg, "")
    return out


def schema_help(schema: type) -> list[tuple[str, Any, str]]:
    """(name, default, one-line description) of every field of a structured config."""
    out = []
    for f in fields(schema):
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        out.append((f.name, default, f.metadata.get("help", "")))
    return out


def _fail(option: str, value: Any, why: str) -> None:
    raise DMLRunnerError(f"{option}={_show(value)}: {why}")


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return "null" if value is None else str(value)


def _close_matches(key: str, known: list[str]) -> str:
    import difflib

    near = difflib.get_close_matches(key, known, n=1)
    return f"did you mean {near[0]}?" if near else ""


def _check_known_keys(group: str, keys: list[str], known: list[str], what: str) -> None:
    for key in keys:
        if key not in known:
            hint = _close_matches(key, known) or f"known: {', '.join(known)}"
            raise DMLRunnerError(f"{group}.{key}: not an option of {what}; {hint}")


def _check_target_hooks(tree: dict[str, Any]) -> None:
    """A group's `_target_` may carry ``check_config(node)``, or ``check_config(node, config)`` when its checks need
    other groups (the whole resolved config): its own checks of its config node, run here before any data are read or
    a model is built (backbone=timm refuses an unknown model name, sampler=class_balanced a batch size that is not a
    multiple of samples_per_class, method=divide_conquer a run too short to divide)."""
    from hydra.utils import get_object

    for group in INSTANTIATED_GROUPS:
        node = tree.get(group)
        if not (isinstance(node, dict) and isinstance(node.get("_target_"), str)):
            continue
        try:
            check = getattr(get_object(node["_target_"]), "check_config", None)
        except Exception:  # noqa: BLE001 - an unimportable target is reported by instantiate with its own message
            check = None
        if callable(check):
            wants_config = "config" in inspect.signature(check).parameters
            check(node, config=tree) if wants_config else check(node)


def _target_parameters(target: str) -> list[str] | None:
    """Keyword parameters of a `_target_` (None when it takes **kwargs or cannot be inspected)."""
    from hydra.utils import get_object

    try:
        obj = get_object(target)
        sig = inspect.signature(obj)
    except Exception:  # noqa: BLE001 - an unimportable target is reported by instantiate with its own message
        return None
    params = list(sig.parameters.values())
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"]


def _check_target_keys(path: str, node: Any) -> None:
    """Every key of a node with a `_target_` (and of nested nodes) must be a parameter of that target."""
    if isinstance(node, dict):
        target = node.get("_target_")
        if isinstance(target, str):
            known = _target_parameters(target)
            if known is not None:
                keys = [k for k in node if not str(k).startswith("_")]
                _check_known_keys(path, keys, known, target)
        for key, value in node.items():
            _check_target_keys(f"{path}.{key}", value)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_target_keys(f"{path}[{i}]", value)


def positive_int(option: str, value: Any, allow_none: bool = False, minimum: int = 1) -> None:
    """Refuse ``value`` unless it is an integer >= ``minimum`` (or None with ``allow_none``), naming ``option``."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(option, value, f"must be an integer >= {minimum}")


def _check_choices(group: str, values: dict[str, Any], schema: type) -> None:
    """Enum fields hold one of their members (Hydra checks this at composition; a config built otherwise is
    checked here)."""
    import typing

    hints = typing.get_type_hints(schema)
    for name, value in values.items():
        kind = hints.get(name)
        if isinstance(kind, type) and issubclass(kind, Enum) and str(value) not in {m.value for m in kind}:
            _fail(f"{group}.{name}", value, f"use one of {', '.join(m.value for m in kind)}")


def _check_trainer(t: dict[str, Any]) -> None:
    for key in ("epochs", "batch_size", "eval_every", "eval_batch_size", "cache_views"):
        positive_int(f"trainer.{key}", t[key])
    positive_int("trainer.max_steps_per_epoch", t["max_steps_per_epoch"], allow_none=True)
    positive_int("trainer.num_threads", t["num_threads"], allow_none=True)
    positive_int("trainer.num_workers", t["num_workers"], allow_none=True, minimum=0)
    positive_int("trainer.prefetch_factor", t["prefetch_factor"], allow_none=True)
    if t["compile"]:
        import torch

        if not hasattr(torch, "compile"):
            _fail("trainer.compile", True, f"torch {torch.__version__} has no torch.compile; set trainer.compile=false")
    if not DEVICE_PATTERN.match(str(t["device"])):
        _fail("trainer.device", t["device"], f"use {DEVICE_CHOICES}")
    for key in ("head_lr_mult", "loss_lr_mult", "dist_timeout_s"):
        if not t[key] > 0:
            _fail(f"trainer.{key}", t[key], "must be > 0")
    if t["grad_clip"] is not None and not t["grad_clip"] > 0:
        _fail("trainer.grad_clip", t["grad_clip"], "must be > 0, or null for no clipping")


def check_folds(folds: int, fold: int, num_classes: int | None = None, val_fraction: float = 0.0) -> None:
    """One-line refusals of a fold setting that cannot work, before any data is read (``num_classes`` once known)."""
    if folds == 0:
        return
    if folds < 2:
        raise DMLRunnerError(f"dataset.folds={folds}: give K >= 2 class-disjoint folds (or 0 for none)")
    if not 0 <= fold < folds:
        raise DMLRunnerError(f"dataset.fold={fold}: with dataset.folds={folds} the fold is 0 to {folds - 1}")
    if val_fraction:
        raise DMLRunnerError(f"dataset.folds={folds} and dataset.val_fraction={val_fraction} both hold out training "
                             "classes for validation; set dataset.val_fraction=0 when using folds")
    if num_classes is not None and num_classes < 2 * folds:
        raise DMLRunnerError(f"dataset.folds={folds}: the training split has {num_classes} classes, and each fold "
                             f"needs at least 2 (use dataset.folds<={num_classes // 2})")


def _check_dataset(d: dict[str, Any], paths: dict[str, Any]) -> None:
    """The dataset keys every dataset shares: the fold (``dataset.folds`` / ``fold`` / ``fold_seed``), and
    ``dataset.cache`` (the decoded-image cache) with the ``paths.cache_dir`` it needs."""
    folds = {key: d[key] for key in FOLD_KEYS if key in d}
    for key, value in folds.items():
        positive_int(f"dataset.{key}", value, minimum=0)
    if folds:
        check_folds(int(folds.get("folds") or 0), int(folds.get("fold") or 0),
                    val_fraction=float(d.get("val_fraction") or 0.0))
    if "cache" not in d:
        return
    if d["cache"] not in CACHE_MODES:
        _fail("dataset.cache", d["cache"], f"use one of {', '.join(CACHE_MODES)} (none turns the decoded-image cache "
                                            "off; docs/CACHE.md)")
    if d["cache"] != "none" and not str(paths.get("cache_dir") or "").strip():
        _fail("paths.cache_dir", paths.get("cache_dir"), "dataset.cache needs a directory: set paths.cache_dir, or "
                                                          "dataset.cache=none")


def _check_eval(e: dict[str, Any]) -> None:
    from dml_runner.evaluation import KNOWN_METRICS

    if not e["recall_at"]:
        _fail("eval.recall_at", e["recall_at"], "give at least one K, e.g. eval.recall_at=[1,2,4,8]")
    bad = [k for k in e["recall_at"] if k < 1]
    if bad:
        _fail("eval.recall_at", e["recall_at"], f"every K must be >= 1 (got {_show(bad)}), e.g. [1,2,4,8]")
    unknown = [m for m in e["metrics"] if m not in KNOWN_METRICS]
    if unknown or not e["metrics"]:
        _fail("eval.metrics", e["metrics"], f"use a non-empty list of {', '.join(KNOWN_METRICS)}")
    if not DEVICE_PATTERN.match(str(e["device"])):
        _fail("eval.device", e["device"], f"use {DEVICE_CHOICES}")
    positive_int("eval.chunk_size", e["chunk_size"])
    positive_int("eval.kmeans_iters", e["kmeans_iters"])
    for key in ("precision_at", "map_at"):
        bad = [k for k in e[key] if not isinstance(k, int) or k < 1]
        if bad:
            _fail(f"eval.{key}", e[key], f"every K must be an integer >= 1 (got {_show(bad)}), e.g. [1,5]")


def _number(option: str, value: Any, minimum: float, strict: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        value > minimum if strict else value >= minimum)
    if not ok:
        _fail(option, value, f"must be a number {'>' if strict else '>='} {minimum:g}")


def _check_optimizer_scheduler(cfg: dict[str, Any]) -> None:
    opt = cfg.get("optimizer") or {}
    if "lr" in opt:
        _number("optimizer.lr", opt["lr"], 0, strict=True)
    for key in ("weight_decay", "momentum", "eps"):
        if key in opt:
            _number(f"optimizer.{key}", opt[key], 0, strict=False)
    if "momentum" in opt and not opt["momentum"] < 1:
        _fail("optimizer.momentum", opt["momentum"], "must be in [0, 1)")
    sched = cfg.get("scheduler") or {}
    if "T_max" in sched:
        positive_int("scheduler.T_max", sched["T_max"])
    if "gamma" in sched:
        _number("scheduler.gamma", sched["gamma"], 0, strict=True)
    if "milestones" in sched:
        for m in sched["milestones"]:
            positive_int("scheduler.milestones", m)
    if "eta_min" in sched:
        _number("scheduler.eta_min", sched["eta_min"], 0, strict=False)


MAX_LR = 1.0  # above it no optimizer of conf/optimizer trains these models: the loss diverges, recall falls to chance
# losses that read a batch as N classes x 2 (the first two images of each class; the rest is ignored)
PAIR_LOSSES = ("dml_runner.losses.npair.NPairLoss",)


def _check_silent_no_ops(tree: dict[str, Any]) -> None:
    """Refuse settings that would be accepted and then do nothing, or ruin a run without a word."""
    transform, dataset = tree.get("transform") or {}, tree.get("dataset") or {}
    chosen = transform.get("train") is not None or transform.get("test") is not None
    if chosen and isinstance(dataset, dict) and "transform" not in dataset:
        _fail("transform", transform.get("name") or "custom",
              f"dataset {dataset.get('_target_', '?')} does not read the transform group (its images are tensors "
              "prepared by the dataset itself); leave transform=none")
    loss, sampler = tree.get("loss") or {}, tree.get("sampler") or {}
    k = sampler.get("samples_per_class")
    if loss.get("_target_") in PAIR_LOSSES and isinstance(k, int) and k > 2:
        _fail("sampler.samples_per_class", k, f"loss {loss['_target_'].rsplit('.', 1)[-1]} reads each class's first "
              f"2 images of a batch and ignores the other {k - 2}; use sampler=npair (N classes x 2) or "
              "sampler.samples_per_class=2")
    lr = (tree.get("optimizer") or {}).get("lr")
    if isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > MAX_LR:
        _fail("optimizer.lr", lr, f"above {MAX_LR:g}, training diverges and the model falls to chance; the recipes "
              "here use 1e-6 to 1e-2 (e.g. optimizer.lr=1e-4)")


def validate_config(cfg: Any) -> None:
    """Refuse, with one line naming the option, what would fail or be silently ignored later in a run."""
    from omegaconf import OmegaConf

    try:
        tree = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True, enum_to_str=True)
    except Exception as err:  # noqa: BLE001 - an unresolvable interpolation or a missing value
        raise DMLRunnerError(f"the config cannot be resolved: {err}") from err
    assert isinstance(tree, dict)
    unknown_top = [k for k in tree if k not in TOP_LEVEL_KEYS]
    if unknown_top:
        key = unknown_top[0]
        raise DMLRunnerError(f"{key}: not a config group or option of dml-run; "
                             f"{_close_matches(key, sorted(TOP_LEVEL_KEYS)) or 'see dml-run --help'}")
    for group, schema in SCHEMAS.items():
        known = [f.name for f in fields(schema)]
        _check_known_keys(group, list(tree.get(group) or {}), known, f"{group} (dml-run --help lists them)")
        _check_choices(group, tree.get(group) or {}, schema)
    _check_trainer(tree["trainer"])
    _check_eval(tree["eval"])
    if isinstance(tree.get("dataset"), dict):
        _check_dataset(tree["dataset"], tree.get("paths") or {})
    for group in INSTANTIATED_GROUPS:
        if group in tree:
            node = tree[group]
            if group == "dataset" and isinstance(node, dict):
                node = {k: v for k, v in node.items() if k not in RUNNER_DATASET_KEYS}
            _check_target_keys(group, node)
    _check_target_hooks(tree)
    _check_optimizer_scheduler(tree)
    _check_silent_no_ops(tree)


def conf_dir() -> Path:
    """The config tree: shipped inside the package (wheel installs) or the repository's top-level conf/."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"dml-runner's conf/ tree was not found next to {here}; reinstall the package")


def group_options(group: str, conf: Path | None = None) -> list[str]:
    """The selectable options of conf/<group>, sorted (nested ones as ``hdml/table1_cub200/npair``); ``conf``: another
    config tree (a plug-in's, on Hydra's search path) instead of the package's.

    A file or folder whose name starts with ``_`` is a base that options extend (``experiment/_base/dc``,
    ``dataset/_base/image_files``), never an option itself.
    """
    group_dir = (conf or conf_dir()) / group
    relative = (p.relative_to(group_dir) for p in group_dir.rglob("*.yaml"))
    return sorted(str(r.with_suffix("")) for r in relative if not any(part.startswith("_") for part in r.parts))


def search_path_dirs(overrides: Iterable[str]) -> list[Path]:
    """The config folders that a ``hydra.searchpath=[...]`` override among ``overrides`` adds: ``file://`` paths and
    ``pkg://`` packages that can be found (others are left to Hydra, which reports them when it composes)."""
    import importlib.util

    dirs: list[Path] = []
    for item in overrides:
        key, _, value = item.partition("=")
        if key.lstrip("+") != "hydra.searchpath":
            continue
        for entry in value.strip().strip("[]").split(","):
            entry = entry.strip().strip("'\"")
            if entry.startswith("file://"):
                dirs.append(Path(entry.removeprefix("file://")).expanduser())
            elif entry.startswith("pkg://"):
                try:
                    spec = importlib.util.find_spec(entry.removeprefix("pkg://"))
                except (ImportError, ValueError):
                    spec = None
                if spec is not None and spec.submodule_search_locations:
                    dirs.append(Path(list(spec.submodule_search_locations)[0]))
    return [d for d in dirs if d.is_dir()]


def default_choices() -> dict[str, str]:
    """``{group: option}`` that conf/config.yaml's defaults list selects (groups whose choice is computed, such as
    ``preset: ${dataset}``, left out)."""
    import yaml

    out: dict[str, str] = {}
    for item in yaml.safe_load((conf_dir() / "config.yaml").read_text()).get("defaults", []):
        if isinstance(item, dict):
            for key, value in item.items():
                if isinstance(value, str) and "$" not in value:
                    out[key] = value
    return out


def to_container(cfg: Any) -> Any:
    """Plain Python containers for JSON output (interpolations resolved)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False, enum_to_str=True)
