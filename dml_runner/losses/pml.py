"""Every pytorch-metric-learning (pml) loss and miner by name: ``loss=pml loss.name=<Loss> loss.miner=<Miner>``.

:class:`PMLLoss` builds ``pytorch_metric_learning.losses.<name>(**kwargs)`` (and optionally
``pytorch_metric_learning.miners.<miner>(**miner_kwargs)``) and follows this project's loss contract:
``forward(embeddings (B, D), labels (B,)) -> scalar``, its learnable weights (proxies, class centres, a learned
beta) are its parameters, so the optimiser trains them (``trainer.loss_lr_mult``) and checkpoints keep them.

Losses whose constructor needs the number of classes (``ProxyAnchorLoss``, ``ProxyNCALoss``, ``SoftTripleLoss``,
``NormalizedSoftmaxLoss``, ``ArcFaceLoss``, ...) get ``num_classes`` from ``train_labels`` (the training split's
labels, which dml-run passes) or from ``loss.num_classes``; their weight rows follow the sorted training class ids,
so labels need not be 0..C-1. The embedding size comes from ``embedding_size`` (``${backbone.embedding_dim}`` in
``conf/loss/pml.yaml``).

Embeddings are cast to float32 and autocast is off inside the loss: pml's weight losses cast their weights to the
embeddings' dtype in place (``cast_types``), which under bf16 autocast would round the float32 parameters.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dml_runner import DMLRunnerError

# pml losses that cannot be built by name here, with the reason given to the user
UNSUPPORTED_LOSSES = {
    "BaseMetricLossFunction": "an abstract base class",
    "GenericPairLoss": "an abstract base class",
    "BaseLossWrapper": "an abstract base class",
    "MultipleLosses": "it combines loss objects; sum losses in a loss module of your own (docs/EXTENDING.md)",
    "SelfSupervisedLoss": "it compares two augmented views (embeddings, ref_emb), not labelled batches",
    "VICRegLoss": "it compares two augmented views (embeddings, ref_emb), not labelled batches",
    "CrossBatchMemory": "it wraps a loss object and keeps a memory outside the checkpoint",
    "ManifoldLoss": "it takes no labels",
}
UNSUPPORTED_MINERS = {"BaseMiner": "an abstract base class"}
# constructor parameters filled by the wrapper: the number of classes and the embedding size
CLASS_PARAMS = ("num_classes",)
SIZE_PARAMS = ("embedding_size", "descriptors_dim")
NOUN = {"losses": "loss", "miners": "miner", "distances": "distance", "reducers": "reducer",
        "regularizers": "regularizer"}
# a string given for one of these parameters names a pml object built with its defaults
OBJECT_PARAMS = {"distance": "distances", "reducer": "reducers", "embedding_regularizer": "regularizers",
                 "weight_regularizer": "regularizers"}


def _pml_classes(kind: str) -> dict[str, type]:
    """Every ``nn.Module`` class exported by ``pytorch_metric_learning.<kind>`` (losses, miners, distances ...)."""
    import importlib

    module = importlib.import_module(f"pytorch_metric_learning.{kind}")
    return {name: obj for name, obj in vars(module).items()
            if inspect.isclass(obj) and issubclass(obj, nn.Module) and not name.startswith("_")}


def loss_names() -> list[str]:
    """The pml losses ``loss.name`` accepts."""
    return sorted(n for n in _pml_classes("losses") if n not in UNSUPPORTED_LOSSES)


def miner_names() -> list[str]:
    """The pml miners ``loss.miner`` accepts."""
    return sorted(n for n in _pml_classes("miners") if n not in UNSUPPORTED_MINERS)


def _lookup(option: str, name: Any, kind: str, unsupported: dict[str, str]) -> type:
    classes = _pml_classes(kind)
    if isinstance(name, str) and name in unsupported:
        raise DMLRunnerError(f"{option}={name}: not available through loss=pml ({unsupported[name]})")
    if isinstance(name, str) and name in classes:
        return classes[name]
    known = sorted(n for n in classes if n not in unsupported)
    by_lower = {n.lower(): n for n in known}
    near = [by_lower[n] for n in difflib.get_close_matches(str(name).lower(), list(by_lower), n=3, cutoff=0.5)]
    hint = f"did you mean {' or '.join(near)}?" if near else f"known: {', '.join(known)}"
    raise DMLRunnerError(f"{option}={name}: not a pytorch-metric-learning {NOUN[kind]}; {hint}")


def constructor_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """Keyword parameters of ``cls`` including those its ``**kwargs`` hand to the base classes (pml passes
    ``distance``, ``reducer``, regularisers ... up the MRO); the first class that names a parameter wins."""
    params: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if klass in (nn.Module, object) or "__init__" not in vars(klass):
            continue
        for p in inspect.signature(klass.__init__).parameters.values():
            if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                params.setdefault(p.name, p)
    return params


def takes_miner(loss_cls: type) -> bool:
    """False for pml losses that refuse an ``indices_tuple`` (their ``compute_loss`` says so)."""
    try:
        return "indices_tuple_not_supported" not in inspect.getsource(loss_cls.compute_loss)
    except (AttributeError, OSError, TypeError):
        return True


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _check_kwargs(option: str, cls: type, kwargs: dict[str, Any], provided: Sequence[str] = ()) -> None:
    """Every key of ``kwargs`` is a parameter of ``cls``, every parameter without default is in ``kwargs`` or
    ``provided``, and a string for a pml object parameter names one; one line naming ``<option>.<key>`` if not."""
    params = constructor_parameters(cls)
    for key, value in kwargs.items():
        if key not in params:
            near = difflib.get_close_matches(key, list(params), n=1)
            hint = f"did you mean {near[0]}? " if near else ""
            raise DMLRunnerError(f"{option}.{key}: not a parameter of {cls.__name__}; {hint}"
                                 f"its parameters: {', '.join(p for p in params if p not in provided)}")
        if key in OBJECT_PARAMS and isinstance(value, str):
            _lookup(f"{option}.{key}", value, OBJECT_PARAMS[key], {})
    own = inspect.signature(cls.__init__).parameters.values()  # base-class parameters without default are the
    missing = [p.name for p in own if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
               and p.name != "self" and p.name not in kwargs and p.name not in provided]  # subclass's to pass
    if missing:
        raise DMLRunnerError(f"{option}.{missing[0]}: {cls.__name__} needs it (no default); add "
                             f"+{option}.{missing[0]}=<value>")


def resolve(name: Any, kwargs: dict[str, Any] | None = None, miner: Any = None,
            miner_kwargs: dict[str, Any] | None = None) -> tuple[type, type | None]:
    """The pml loss and miner classes of a ``loss=pml`` config, after every check that needs no data: the names,
    whether the loss takes mined tuples, and the names of the keyword arguments."""
    loss_cls = _lookup("loss.name", name, "losses", UNSUPPORTED_LOSSES)
    miner_cls = _lookup("loss.miner", miner, "miners", UNSUPPORTED_MINERS) if miner is not None else None
    if miner is None and miner_kwargs:
        raise DMLRunnerError(f"loss.miner_kwargs={dict(miner_kwargs)} without loss.miner: name the miner, "
                             "e.g. loss.miner=MultiSimilarityMiner")
    if miner_cls is not None and not takes_miner(loss_cls):
        raise DMLRunnerError(f"loss.miner={miner}: {loss_cls.__name__} uses no mined pairs or triplets; "
                             "drop loss.miner")
    reserved = [k for k in (kwargs or {}) if k in (*CLASS_PARAMS, *SIZE_PARAMS)]
    if reserved:
        raise DMLRunnerError(f"loss.kwargs.{reserved[0]}: set by loss=pml itself; use loss.num_classes "
                             "(null: the training split's classes) or backbone.embedding_dim instead")
    _check_kwargs("loss.kwargs", loss_cls, dict(kwargs or {}), (*CLASS_PARAMS, *SIZE_PARAMS))
    if miner_cls is not None:
        _check_kwargs("loss.miner_kwargs", miner_cls, dict(miner_kwargs or {}))
    return loss_cls, miner_cls


def _build(option: str, cls: type, kwargs: dict[str, Any], filled: dict[str, Any]) -> nn.Module:
    """``cls(**kwargs, **filled)`` (keys checked by :func:`resolve`); pml's own argument checks become one line
    naming ``option``."""
    values = {**kwargs, **filled}
    for key, value in list(values.items()):
        if key in OBJECT_PARAMS and isinstance(value, str):
            values[key] = _lookup(f"{option}.{key}", value, OBJECT_PARAMS[key], {})()
    try:
        return cls(**values)
    except Exception as err:  # noqa: BLE001 - pml validates its arguments with asserts, ValueError, TypeError
        shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise DMLRunnerError(f"{option}: {cls.__name__}({shown}) failed: {_one_line(err)}") from err


class PMLLoss(nn.Module):
    """A pytorch-metric-learning loss (and optional miner) built by name, with this project's loss contract.

    ``name`` / ``kwargs``: the loss class in ``pytorch_metric_learning.losses`` and its keyword arguments (a string
    for ``distance``, ``reducer`` or a regulariser names a pml object with its defaults, e.g. ``CosineSimilarity``;
    a node with ``_target_`` builds one with arguments). ``miner`` / ``miner_kwargs``: the same for
    ``pytorch_metric_learning.miners`` (``None``: no miner). ``num_classes``: for losses with per-class weights;
    ``None`` takes it from ``train_labels`` where the loss needs it (it is passed to a loss where the number of
    classes is optional, e.g. pml's ``MarginLoss``, only when set). ``embedding_size``: the embedding dimension for
    losses with weights. ``train_labels``: the training split's labels (dml-run passes them).
    """

    def __init__(self, name: str = "MultiSimilarityLoss", kwargs: dict[str, Any] | None = None,
                 miner: str | None = None, miner_kwargs: dict[str, Any] | None = None,
                 num_classes: int | None = None, embedding_size: int | None = None,
                 train_labels: Any = None) -> None:
        super().__init__()
        loss_cls, miner_cls = resolve(name, kwargs, miner, miner_kwargs)
        params = constructor_parameters(loss_cls)
        filled: dict[str, Any] = {}
        class_ids = None
        if "num_classes" in params and (params["num_classes"].default is inspect.Parameter.empty
                                        or num_classes is not None):
            class_ids = self._class_ids(loss_cls.__name__, num_classes, train_labels)
            filled["num_classes"] = int(num_classes if num_classes is not None else class_ids.numel())
        size_params = [p for p in SIZE_PARAMS if p in params]
        if size_params:
            if embedding_size is None:
                raise DMLRunnerError(f"loss.embedding_size: {loss_cls.__name__} learns weights of the embedding's "
                                     "size; set loss.embedding_size=${{backbone.embedding_dim}} "
                                     "(conf/loss/pml.yaml does)")
            filled[size_params[0]] = int(embedding_size)
        self.name, self.miner_name = loss_cls.__name__, miner_cls.__name__ if miner_cls else None
        self.loss = _build("loss.kwargs", loss_cls, dict(kwargs or {}), filled)
        self.miner = _build("loss.miner_kwargs", miner_cls, dict(miner_kwargs or {}), {}) if miner_cls else None
        self.num_classes = filled.get("num_classes")
        self.register_buffer("class_ids", class_ids)  # None (no buffer) unless the weights follow class ids

    @staticmethod
    def check_config(node: dict[str, Any]) -> None:
        """The checks of :func:`resolve` on the resolved ``loss`` config node, before any data are read (dml-run's
        config validation calls it)."""
        resolve(node.get("name"), node.get("kwargs"), node.get("miner"), node.get("miner_kwargs"))

    @staticmethod
    def _class_ids(loss_name: str, num_classes: int | None, train_labels: Any) -> Tensor | None:
        """Sorted training class ids (the weight row of each), or None when only ``num_classes`` is known."""
        if train_labels is None:
            if num_classes is None:
                raise DMLRunnerError(f"loss.num_classes: {loss_name} learns one weight per class; set "
                                     "loss.num_classes=<number of training classes> (dml-run fills it from the "
                                     "training labels)")
            return None
        ids = torch.as_tensor(np.unique(np.asarray(train_labels)), dtype=torch.long)
        if num_classes is not None and num_classes != ids.numel():
            raise DMLRunnerError(f"loss.num_classes={num_classes}, but the training split has {ids.numel()} "
                                 "classes; leave loss.num_classes=null to take it from the training labels")
        return ids

    def class_index(self, labels: Tensor) -> Tensor:
        """Labels -> weight rows 0..num_classes-1 (identity for losses without per-class weights)."""
        if self.num_classes is None:
            return labels
        if self.class_ids is None:
            index = labels
            known = (labels >= 0) & (labels < self.num_classes)
        else:
            index = torch.searchsorted(self.class_ids, labels).clamp_max(self.class_ids.numel() - 1)
            known = self.class_ids[index] == labels
        if not bool(known.all()):
            bad = int(labels[~known][0])
            fix = ("it holds the training split's classes only" if self.class_ids is not None else
                   "leave loss.num_classes=null so dml-run takes the classes from the training labels")
            raise DMLRunnerError(f"label {bad} is not one of the {self.num_classes} classes {self.name} has a weight "
                                 f"for: {fix}")
        return index

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            embeddings = embeddings.float()
            labels = self.class_index(labels.long())
            indices = self.miner(embeddings, labels) if self.miner is not None else None
            return self.loss(embeddings, labels, indices)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, miner={self.miner_name!r}, num_classes={self.num_classes}"
