"""ImageNet CNNs from torchvision as embedding trunks (globally pooled features of a chosen layer).

Options the papers need:

- ``feature_layer``: the stage whose output is globally average-pooled. ``avgpool`` (alias ``pool5``, the default)
  is the network's own pooled output before the classifier (ResNet-50: 2048-d, GoogLeNet pool5: 1024-d); a stage
  name (``layer3``, ``inception4e``, ...) pools that stage instead and drops the later ones.
- ``freeze``: ``none`` | ``bn`` | ``bn_all`` | ``all``, as :mod:`dml_runner.backbones.frozen` defines them (the
  same for timm trunks).
- ImageNet weights from torchvision's weight enums (``pretrained=true``: torchvision's loader reads
  :func:`hub_weights_path` under ``$TORCH_HOME``, downloading it once if it is missing) or from a local state dict
  (``weights=/path.pth``, e.g. that cached file copied to an offline machine). The model's ``info`` (written to
  ``results.json`` under ``model``) records which weights were loaded and the sha256 of their file.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
import torchvision

from dml_runner import DMLRunnerError
from dml_runner.backbones.frozen import (FREEZE_OPTIONS, FreezableTrunk, RepeatChannels, check_trunk_options,
                                         file_sha256)
from dml_runner.backbones.head import EmbeddingHead, EmbeddingModel

__all__ = ["FREEZE_OPTIONS", "TorchvisionTrunk", "file_sha256", "hub_weights_available", "hub_weights_path",
           "torchvision_backbone"]

# torchvision's weight enums for `pretrained: true` (downloaded once into torchvision's cache).
_WEIGHTS = {
    "resnet18": "ResNet18_Weights",
    "resnet34": "ResNet34_Weights",
    "resnet50": "ResNet50_Weights",
    "resnet101": "ResNet101_Weights",
    "googlenet": "GoogLeNet_Weights",
}

# The stages each architecture runs in order (children of the torchvision model) up to global pooling.
_STAGES = {
    "resnet": ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"],
    "googlenet": ["conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b", "maxpool3",
                  "inception4a", "inception4b", "inception4c", "inception4d", "inception4e", "maxpool4",
                  "inception5a", "inception5b"],
}
_POOLED = ("avgpool", "pool5")


def _family(arch: str) -> str:
    return "googlenet" if arch == "googlenet" else "resnet"


def _load_local_weights(net: nn.Module, weights: str, arch: str) -> None:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise DMLRunnerError(f"backbone.weights={weights}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise DMLRunnerError(f"backbone.weights={weights}: not a readable PyTorch state dict ({err})") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "aux1.", "aux2."))}
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches raise even with strict=False
        raise DMLRunnerError(f"backbone.weights={weights} does not fit {arch}: {str(err)[:500]}") from None
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise DMLRunnerError(f"backbone.weights={weights} does not fit {arch}: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")


def _weights_enum(arch: str) -> torchvision.models.WeightsEnum:
    if arch not in _WEIGHTS:
        raise DMLRunnerError(f"backbone.arch={arch!r} is not supported; choose one of {sorted(_WEIGHTS)}")
    return getattr(torchvision.models, _WEIGHTS[arch]).IMAGENET1K_V1


def hub_weights_path(arch: str) -> Path:
    """Where torchvision's loader looks for ``arch``'s ImageNet weights (``pretrained=true``) under the current
    ``TORCH_HOME``: ``<torch.hub.get_dir()>/checkpoints/<file name of the weight enum's URL>``."""
    url = _weights_enum(arch).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def hub_weights_available(arch: str) -> bool:
    """Whether ``pretrained=true`` for ``arch`` can load without a download (the file is in the hub cache)."""
    return hub_weights_path(arch).is_file()


def _hash_in_name(path: Path) -> str | None:
    """The sha256 prefix torchvision puts into its weight file names (``resnet50-0676ba61.pth`` -> ``0676ba61``)."""
    stem = path.name.split(".")[0]
    tail = stem.rsplit("-", 1)[-1] if "-" in stem else ""
    return tail.lower() if len(tail) >= 8 and all(c in "0123456789abcdefABCDEF" for c in tail) else None


def _pretrained_net(arch: str) -> tuple[nn.Module, dict]:
    """torchvision's own builder with the ImageNet enum; returns the net and the weights record for ``info``."""
    builder = getattr(torchvision.models, arch)
    enum = _weights_enum(arch)
    path = hub_weights_path(arch)
    try:
        # No aux_logits/init_weights for GoogLeNet: torchvision builds the aux heads the file has, loads it, then
        # drops them, and sets transform_input=True (the input rescaling its weights expect).
        net = builder(weights=enum)
    except OSError as err:  # no network, proxy, timeout, unwritable cache directory, disk full
        raise DMLRunnerError(
            f"backbone.pretrained=true: could not get torchvision's {arch} ImageNet weights from {enum.url} "
            f"({type(err).__name__}: {err}). On a machine without internet copy that file to {path} "
            f"(or set TORCH_HOME to a directory whose hub/checkpoints/ holds it), or pass "
            f"backbone.weights=/path/to/it.pth with backbone.pretrained=false") from err
    except RuntimeError as err:
        if "invalid hash value" not in str(err):  # anything but a corrupted download is not disguised
            if hasattr(err, "add_note"):
                err.add_note(f"(while building torchvision's {arch} with its ImageNet weights from {path})")
            raise
        raise DMLRunnerError(
            f"backbone.pretrained=true: the download of torchvision's {arch} ImageNet weights from {enum.url} "
            f"was corrupted ({err}); run again, or copy the file to {path}") from err
    sha = file_sha256(path) if path.is_file() else None
    expected = _hash_in_name(path)
    record = {"weights": f"{type(enum).__name__}.{enum.name}", "weights_file": str(path), "weights_sha256": sha,
              "weights_match_torchvision": bool(sha and expected and sha.startswith(expected))}
    return net, record


def _imagenet_net(arch: str, pretrained: bool, weights: str | None) -> tuple[nn.Module, dict]:
    if pretrained:
        return _pretrained_net(arch)
    builder = getattr(torchvision.models, arch)
    kwargs: dict = {"aux_logits": False, "init_weights": True} if arch == "googlenet" else {}
    if weights and arch == "googlenet":
        # torchvision's GoogLeNet weights expect its input re-scaling (transform_input), set when it loads them.
        kwargs["transform_input"] = True
    net = builder(weights=None, **kwargs)
    if not weights:
        return net, {"weights": "random init", "weights_file": None, "weights_sha256": None}
    _load_local_weights(net, weights, arch)
    path = Path(weights).expanduser().resolve()
    return net, {"weights": str(path), "weights_file": str(path), "weights_sha256": file_sha256(path)}


# torchvision GoogLeNet's ``transform_input``: its ImageNet weights expect inputs normalised with mean 0.5 and std 0.5,
# so each channel normalised with the ImageNet mean/std is mapped to that: x * std / 0.5 + (mean - 0.5) / 0.5.
_RESCALE = ((0.229 / 0.5, 0.224 / 0.5, 0.225 / 0.5), ((0.485 - 0.5) / 0.5, (0.456 - 0.5) / 0.5, (0.406 - 0.5) / 0.5))


def imagenet_rescale(x: torch.Tensor) -> torch.Tensor:
    """GoogLeNet's input re-scaling as one element-wise affine map, so a channels_last batch stays channels_last
    (torchvision's own ``_transform_input`` concatenates the channels back into NCHW); the same float32 values."""
    scale, shift = (torch.tensor(v, dtype=x.dtype, device=x.device).view(1, 3, 1, 1) for v in _RESCALE)
    return x * scale + shift


class TorchvisionTrunk(FreezableTrunk):
    """A torchvision classifier cut at ``feature_layer`` and globally average-pooled: images -> (B, feature_dim)."""

    def __init__(self, arch: str, pretrained: bool = False, weights: str | None = None, in_channels: int = 3,
                 freeze: str = "none", feature_layer: str = "avgpool") -> None:
        super().__init__()
        if arch not in _WEIGHTS:
            raise DMLRunnerError(f"backbone.arch={arch!r} is not supported; choose one of {sorted(_WEIGHTS)}")
        check_trunk_options(arch, in_channels, pretrained, weights, freeze, "torchvision's ImageNet weights")
        stages = _STAGES[_family(arch)]
        if feature_layer in _POOLED:
            last = len(stages)
        elif feature_layer in stages and not feature_layer.startswith(("maxpool", "relu", "bn")):
            last = stages.index(feature_layer) + 1
        else:
            choices = list(_POOLED) + [s for s in stages if not s.startswith(("maxpool", "relu", "bn", "conv"))]
            raise DMLRunnerError(f"backbone.feature_layer={feature_layer!r} for {arch}: choose one of {choices}")
        net, self.weights_info = _imagenet_net(arch, pretrained, weights)
        # Drop the classifier and every stage after the feature layer; the head's dropout replaces GoogLeNet's.
        for name in stages[last:] + ["fc", "dropout"]:
            if hasattr(net, name):
                setattr(net, name, nn.Identity())
        self.arch, self.freeze, self.feature_layer = arch, freeze, feature_layer
        self.stages = stages[:last]
        self.transform_input = bool(getattr(net, "transform_input", False))
        self.adapt = RepeatChannels()
        self.net = net
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.apply_freeze()
        self.feature_dim = self._infer_feature_dim()
        self.train()

    def _infer_feature_dim(self) -> int:
        was_training = self.training
        self.eval()
        with torch.no_grad():
            dim = int(self(torch.zeros(1, 3, 96, 96)).shape[1])
        self.train(was_training)
        return dim

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.adapt(x)
        if self.transform_input:
            x = imagenet_rescale(x)
        for name in self.stages:
            x = getattr(self.net, name)(x)
        return self.pool(x).flatten(1)
        return self._forward(x)


def torchvision_backbone(arch: str = "resnet50", pretrained: bool = False, weights: str | None = None,
                         embedding_dim: int = 128, normalize: bool = True, dropout: float = 0.0,
                         in_channels: int = 3, freeze: str = "none", feature_layer: str = "avgpool") -> EmbeddingModel:
    """An :class:`EmbeddingModel` on a torchvision ImageNet CNN (see the module docstring for the options)."""
    trunk = TorchvisionTrunk(arch, pretrained=pretrained, weights=weights, in_channels=in_channels, freeze=freeze,
                             feature_layer=feature_layer)
    head = EmbeddingHead(trunk.feature_dim, embedding_dim, normalize=normalize, dropout=dropout)
    info = {"arch": arch, "pretrained": bool(pretrained), **trunk.weights_info, "source": "torchvision",
            "freeze": freeze, "feature_layer": feature_layer, "feature_dim": trunk.feature_dim}
    if arch == "googlenet":
        info["note"] = ("torchvision GoogLeNet has BatchNorm and a different input transform from the papers' "
                        "Caffe Inception v1")
        info["transform_input"] = trunk.transform_input
    return EmbeddingModel(trunk, head, info=info)
