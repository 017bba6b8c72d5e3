"""Any timm model as an embedding trunk: ``backbone=timm backbone.name=<model>`` (e.g. ``vit_small_patch16_224.dino``,
``resnet50.a1_in1k``).

- The trunk is timm's own model built with ``num_classes=0``: its forward is ``forward_features`` then
  ``forward_head(pre_logits=True)``, the model's own pooling (a ViT's class token, a CNN's global average pool), so
  the features are ``num_features``-dimensional. The project's :class:`EmbeddingHead` follows.
- ``freeze``: ``none`` | ``bn`` | ``bn_all`` | ``all`` with the meaning of :mod:`dml_runner.backbones.frozen` (the same
  code as the torchvision trunks). ``bn`` and ``bn_all`` are refused for a model without BatchNorm (a ViT).
- Weights: ``pretrained=true`` loads through timm's normal path (``timm.create_model(..., pretrained=True)``:
  the Hugging Face hub, cached under ``$HF_HUB_CACHE``, offline with ``HF_HUB_OFFLINE=1``); ``weights=/path``
  loads a local file through the same code (timm's ``pretrained_cfg_overlay=dict(file=...)``: its key filter and
  position-embedding resampling apply). ``info`` (``results.json`` -> ``model``) records the model, the weights'
  hub id, revision, file and the sha256 of the file.
- ``img_size``: null uses the model's pretrained input size; a number rebuilds a fixed-size model (a ViT) for that
  size (timm resamples its position embeddings on load) and sets the transform size (``transform=timm``).
- The image transform comes from the model's pretrained config (:func:`data_config`; ``transform=timm`` in
  :mod:`dml_runner.datasets.transforms`).
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dml_runner import DMLRunnerError
from dml_runner.backbones.frozen import FreezableTrunk, RepeatChannels, check_trunk_options, file_sha256
from dml_runner.backbones.head import EmbeddingHead, EmbeddingModel

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm reads from a hub repo, in its order


def check_model_name(name: str) -> None:
    """Refuse an unknown timm model or pretrained tag with one line naming ``backbone.name`` and close matches."""
    import timm
    from timm.models import split_model_name_tag

    if not isinstance(name, str) or not name:
        raise DMLRunnerError(f"backbone.name={name!r}: give a timm model name, e.g. vit_small_patch16_224.dino")
    arch, tag = split_model_name_tag(name)
    if not timm.is_model(arch):
        near = difflib.get_close_matches(name, timm.list_models(pretrained=True) + timm.list_models(), n=4,
                                         cutoff=0.6)
        hint = f"close matches: {', '.join(near)}" if near else "timm.list_models('<pattern>') lists them"
        raise DMLRunnerError(f"backbone.name={name}: not a timm model; {hint}")
    if tag and name not in timm.list_pretrained(f"{arch}.*"):
        tags = timm.list_pretrained(f"{arch}.*")
        near = difflib.get_close_matches(name, tags, n=4, cutoff=0.0) or tags[:4]
        raise DMLRunnerError(f"backbone.name={name}: timm has no pretrained tag {tag!r} for {arch}; "
                             f"close matches: {', '.join(near) or 'none (use the name without a tag)'}")


def check_config(node: dict[str, Any]) -> None:
    """The checks of a ``backbone=timm`` config node that need no model: the name and the option values (for
    ``dml_runner.config.validate_config``, before any data are read; attached as ``timm_backbone.check_config``)."""
    name = node.get("name")
    check_model_name(name)
    check_trunk_options(name, node.get("in_channels", 3), bool(node.get("pretrained")), node.get("weights"),
                        node.get("freeze", "none"), "timm's weights from the Hugging Face hub")
    size = node.get("img_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise DMLRunnerError(f"backbone.img_size={size}: a positive number of pixels, or null for the model's "
                             "pretrained input size")


def pretrained_cfg(name: str) -> dict[str, Any]:
    """timm's pretrained config of ``name`` (its default tag when the name has none) as a dict."""
    from timm.models import get_pretrained_cfg

    check_model_name(name)
    cfg = get_pretrained_cfg(name)
    return cfg.to_dict() if cfg is not None else {}


def data_config(name: str, img_size: int | None = None) -> dict[str, Any]:
    """The preprocessing the model's pretrained weights expect, resolved by timm (``resolve_data_config``):
    ``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``; ``img_size`` replaces the
    input size."""
    from timm.data import resolve_data_config

    args = {"input_size": (3, int(img_size), int(img_size))} if img_size else {}
    return resolve_data_config(args=args, pretrained_cfg=pretrained_cfg(name))


def hub_id(name: str) -> str | None:
    """The Hugging Face hub repository of ``name``'s pretrained weights (``timm/<arch>.<tag>``), if timm has one."""
    return pretrained_cfg(name).get("hf_hub_id")


def hf_weights_path(name: str) -> Path | None:
    """The cached file ``pretrained=true`` would load for ``name`` from the current ``HF_HUB_CACHE``, or None."""
    from huggingface_hub import try_to_load_from_cache

    repo = hub_id(name)
    if not repo:
        return None
    repo, _, revision = repo.partition("@")
    for filename in HF_WEIGHT_FILES:
        found = try_to_load_from_cache(repo, filename, revision=revision or None)
        if isinstance(found, str):
            return Path(found)
    return None


def hf_weights_available(name: str) -> bool:
    """Whether ``pretrained=true`` for ``name`` can load without a download (the hub cache holds its file)."""
    return hf_weights_path(name) is not None


def _hub_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _weights_record(name: str, net: nn.Module) -> dict[str, Any]:
    cfg = getattr(net, "pretrained_cfg", {}) or {}
    resolved = f"{cfg.get('architecture', name.split('.')[0])}.{cfg['tag']}" if cfg.get("tag") else name
    path = hf_weights_path(resolved) if cfg.get("hf_hub_id") else None
    revision = path.parent.name if path is not None else None
    return {"weights": f"timm:{resolved}", "weights_source": f"hf-hub:{cfg['hf_hub_id']}" if cfg.get("hf_hub_id")
            else cfg.get("url"), "weights_revision": revision, "weights_file": str(path) if path else None,
            "weights_sha256": file_sha256(path) if path else None}


_LOAD_MESSAGE = re.compile(r"(Missing|Unexpected) keys \((.*?)\) (discovered|found) while loading")


@contextlib.contextmanager
def _load_report() -> Iterator[dict[str, list[str]]]:
    """The keys timm's ``load_pretrained`` reports as missing from / unexpected in the weights it loaded.

    timm loads non-strictly whenever the class count differs from the weights' (always with ``num_classes=0`` and a
    classifier in the file) and only logs what did not fit; this collects those log records."""
    report: dict[str, list[str]] = {"missing": [], "unexpected": []}

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            found = _LOAD_MESSAGE.match(record.getMessage())
            if found:
                report[found.group(1).lower()] += found.group(2).split(", ")

    logger = logging.getLogger("timm.models._builder")
    handler, level = _Collect(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield report
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _not_cached(name: str, why: str) -> DMLRunnerError:
    repo = hub_id(name)
    return DMLRunnerError(
        f"backbone.pretrained=true: timm's weights of {name} (Hugging Face hub {repo}) are not in the hub cache "
        f"{_hub_cache_dir()} and could not be downloaded ({why}); on a machine with internet run "
        f"`python -c \"import timm; timm.create_model('{name}', pretrained=True)\"` and copy its "
        f"models--{str(repo).replace('/', '--')} folder into that cache (or point HF_HUB_CACHE at a copy), or pass "
        f"backbone.weights=/path/to/model.safetensors with backbone.pretrained=false")


def _hub_unreachable(timeout_s: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be reached now (None when it answers a connection): ``HF_HUB_OFFLINE`` set, or
    no connection to its host within ``timeout_s`` seconds (no network, a firewall)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return None  # the hub is reached through a proxy: a direct connection says nothing
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as err:
        return f"no connection to {host}: {err.strerror or type(err).__name__}"
    return None


def _create(name: str, pretrained: bool, weights: str | None, img_size: int | None,
            model_kwargs: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    import timm

    kwargs = dict(model_kwargs)
    if img_size and pretrained_cfg(name).get("fixed_input_size"):
        kwargs["img_size"] = int(img_size)  # a ViT's position embeddings are built (and resampled) for this size
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise DMLRunnerError(f"backbone.weights={weights}: no such file")
        kwargs["pretrained_cfg_overlay"] = {"file": str(path.resolve())}
    if pretrained and not weights and not hf_weights_available(name):
        unreachable = _hub_unreachable()
        if unreachable:  # fail now rather than after the hub client's retries (about a minute without network)
            raise _not_cached(name, unreachable)
    try:
        with _load_report() as report:
            net = timm.create_model(name, pretrained=bool(pretrained or weights), num_classes=0, **kwargs)
    except TypeError as err:
        raise DMLRunnerError(f"backbone.name={name}: timm.create_model refuses {sorted(kwargs)} ({err}); "
                             "check backbone.model_kwargs and backbone.img_size") from err
    except RuntimeError as err:  # a state dict whose shapes do not fit the model
        if weights:
            raise DMLRunnerError(f"backbone.weights={weights} does not fit {name}: "
                                 f"{str(err).splitlines()[0][:300]}") from err
        raise
    except Exception as err:  # hub errors: not cached offline, no network, refused download
        if not pretrained or not isinstance(err, OSError) and "huggingface_hub" not in type(err).__module__:
            raise
        raise _not_cached(name, type(err).__name__) from None
    if report["missing"] or report["unexpected"]:
        option = f"backbone.weights={weights}" if weights else "backbone.pretrained=true"
        raise DMLRunnerError(f"{option} does not fit {name}: {len(report['missing'])} of the model's tensors are "
                             f"not in the file (e.g. {report['missing'][:3]}), {len(report['unexpected'])} of the "
                             f"file's are not in the model (e.g. {report['unexpected'][:3]})")
    if weights:
        path = Path(weights).expanduser().resolve()
        record = {"weights": str(path), "weights_source": "file", "weights_revision": None,
                  "weights_file": str(path), "weights_sha256": file_sha256(path)}
    elif pretrained:
        record = _weights_record(name, net)
    else:
        record = {"weights": "random init", "weights_source": None, "weights_revision": None,
                  "weights_file": None, "weights_sha256": None}
    return net, record


class TimmTrunk(FreezableTrunk):
    """timm's ``name`` with ``num_classes=0``: images -> (B, num_features) pooled pre-logits features."""

    def __init__(self, name: str, pretrained: bool = False, weights: str | None = None, in_channels: int = 3,
                 freeze: str = "none", img_size: int | None = None,
                 model_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        check_config({"name": name, "in_channels": in_channels, "pretrained": pretrained, "weights": weights,
                      "freeze": freeze, "img_size": img_size})
        net, self.weights_info = _create(name, pretrained, weights, img_size, model_kwargs or {})
        self.name, self.freeze, self.img_size = name, freeze, img_size
        self.net = net
        if freeze in ("bn", "bn_all") and not self.batch_norms():
            raise DMLRunnerError(f"backbone.freeze={freeze}: {name} has no BatchNorm layer; use none or all")
        self.adapt = RepeatChannels()
        self.feature_dim = int(net.num_features)
        self.apply_freeze()
        self.train()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.adapt(x))


def timm_backbone(name: str = "resnet50.a1_in1k", pretrained: bool = False, weights: str | None = None,
                  embedding_dim: int = 128, normalize: bool = True, dropout: float = 0.0, in_channels: int = 3,
                  freeze: str = "none", img_size: int | None = None,
                  model_kwargs: dict[str, Any] | None = None) -> EmbeddingModel:
    """An :class:`EmbeddingModel` on timm's ``name`` (see the module docstring for the options)."""
    trunk = TimmTrunk(name, pretrained=pretrained, weights=weights, in_channels=in_channels, freeze=freeze,
                      img_size=img_size, model_kwargs=model_kwargs)
    head = EmbeddingHead(trunk.feature_dim, embedding_dim, normalize=normalize, dropout=dropout)
    cfg = getattr(trunk.net, "pretrained_cfg", {}) or {}
    pool = getattr(trunk.net, "global_pool", None)
    info = {"arch": name, "pretrained": bool(pretrained), **trunk.weights_info, "source": "timm",
            "freeze": freeze, "feature_dim": trunk.feature_dim,
            "img_size": img_size or int(cfg.get("input_size", (3, 0, 0))[-1]),
            "pooling": pool if isinstance(pool, str) else getattr(pool, "pool_type", type(pool).__name__)}
    return EmbeddingModel(trunk, head, info=info)


timm_backbone.check_config = check_config  # type: ignore[attr-defined]
