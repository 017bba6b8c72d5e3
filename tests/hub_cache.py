"""An offline torchvision hub cache for tests: random ImageNet-shaped weights under torchvision's own file names.

``build_hub_cache(torch_home)`` writes, for each architecture, the state dict torchvision's ``IMAGENET1K_V1`` weight
enum would download, to ``<torch_home>/hub/checkpoints/<file name of Weights.IMAGENET1K_V1.url>``: the same keys and
shapes (GoogLeNet's auxiliary heads and 1000-class classifiers included), random values. With ``TORCH_HOME`` pointing
there, ``backbone.pretrained=true`` runs torchvision's real loading code without a network.

The values have a realistic activation scale: PyTorch's default initialisation of every layer (not torchvision's
own init, whose pooled features are nearly the same for every image once BatchNorm runs in eval mode), then
BatchNorm running statistics accumulated (``momentum=None``, a cumulative average) over a few train-mode forward
passes on random structured images. Eval-mode BatchNorm therefore normalises each channel to about unit scale, as
with real ImageNet weights, and different images keep different embeddings.

The files are not torchvision's: their sha256 does not start with the hash in the file name, which is how a run's
``results.json`` tells them apart from the real weights (``model.weights_match_torchvision``).
"""

from __future__ import annotations

import os
import tempfile
import zlib
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

# Every architecture of the project's weight table (dml_runner.backbones.torchvision_nets._WEIGHTS).
ARCHS = ("googlenet", "resnet18", "resnet34", "resnet50", "resnet101")
BUILDER_VERSION = 1  # bump when the file contents change, so cached builds are redone
STAT_PASSES, STAT_BATCH, STAT_SIDE = 4, 12, 112


def weights_enum(arch: str) -> torchvision.models.WeightsEnum:
    """torchvision's ImageNet weight enum member that ``pretrained=true`` loads for ``arch``."""
    return torchvision.models.get_model_weights(arch).IMAGENET1K_V1


def checkpoint_name(arch: str) -> str:
    """The file name torchvision stores ``arch``'s ImageNet weights under (the last part of the enum's URL)."""
    return os.path.basename(urlparse(weights_enum(arch).url).path)


def structured_images(n: int, side: int = 64, seed: int = 0) -> torch.Tensor:
    """(n, 3, side, side) random images with image-level structure, roughly ImageNet-normalised.

    Each image is smooth random colour fields at two scales plus a little pixel noise and its own brightness and
    contrast. Pure per-pixel noise would not do: global pooling averages it away, so every noise image has nearly
    the same pooled features whatever the weights.
    """
    g = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.randn(n, 3, 4, 4, generator=g), size=(side, side), mode="bilinear",
                           align_corners=False)
    medium = F.interpolate(torch.randn(n, 3, 16, 16, generator=g), size=(side, side), mode="bilinear",
                           align_corners=False)
    fine = torch.randn(n, 3, side, side, generator=g)
    contrast = 0.5 + torch.rand(n, 1, 1, 1, generator=g)
    brightness = 0.5 * torch.randn(n, 3, 1, 1, generator=g)
    return contrast * (coarse + 0.7 * medium + 0.3 * fine) + brightness


def random_imagenet_net(arch: str, seed: int = 0) -> nn.Module:
    """``arch`` as torchvision builds it for its ImageNet weights, with PyTorch's default init and BN statistics."""
    kwargs = {"aux_logits": True, "init_weights": False, "transform_input": True} if arch == "googlenet" else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = getattr(torchvision.models, arch)(weights=None, num_classes=1000, **kwargs)
        for module in net.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.reset_parameters()  # PyTorch's default init, replacing torchvision's own
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_parameters()  # weight 1, bias 0, running statistics reset
                module.momentum = None  # cumulative average over the passes below
        net.train()
        with torch.no_grad():
            for step in range(STAT_PASSES):
                net(structured_images(STAT_BATCH, STAT_SIDE, seed=1000 * seed + step))
        for module in net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = 0.1
    return net.eval()


def state_dict_for(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """The state dict written for ``arch``: exactly the keys and shapes of torchvision's ImageNet file."""
    return {k: v.detach().clone().contiguous() for k, v in random_imagenet_net(arch, seed).state_dict().items()}


def build_hub_cache(torch_home: Path, archs: tuple[str, ...] | list[str] = ARCHS, seed: int = 0) -> Path:
    """Write the missing ``archs`` files into ``<torch_home>/hub/checkpoints/``; returns that directory.

    Files already there are kept. Each file is written to a temporary name and renamed, so concurrent builders
    (several pytest processes) never leave a half-written file under the final name.
    """
    checkpoints = Path(torch_home) / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    for arch in archs:
        target = checkpoints / checkpoint_name(arch)
        if target.is_file():
            continue
        state = state_dict_for(arch, seed=seed + zlib.crc32(arch.encode()) % 10_000)
        fd, tmp = tempfile.mkstemp(dir=checkpoints, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        try:
            torch.save(state, tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return checkpoints
