"""What every pretrained trunk shares (torchvision and timm): the ``freeze`` options, 1-channel input, weight hashes.

``freeze``: ``none`` trains everything. ``bn`` keeps every BatchNorm layer in eval mode (running statistics frozen)
and trains its affine parameters (gamma, beta), as the official Divide and Conquer code does. ``bn_all`` also fixes
gamma and beta. ``all`` freezes the whole network (eval mode, no gradients; with ``trainer.cache_features`` the
features are computed once). :meth:`FreezableTrunk.train` enforces it, so ``model.train()`` in a training loop
cannot undo it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from dml_runner import DMLRunnerError

FREEZE_OPTIONS = ("none", "bn", "bn_all", "all")
_SHA256_CHARS = 16  # the recorded prefix of a weights file's sha256


def check_trunk_options(model: str, in_channels: int, pretrained: bool, weights: str | None, freeze: str,
                        pretrained_weights: str) -> None:
    """The options every pretrained trunk checks: input channels, one weight source, ``freeze``."""
    if in_channels not in (1, 3):
        raise DMLRunnerError(f"backbone {model} takes 1- or 3-channel images, the dataset has {in_channels}")
    if pretrained and weights:
        raise DMLRunnerError(f"set either backbone.pretrained=true ({pretrained_weights}) or "
                             "backbone.weights=/path (a local file), not both")
    if freeze not in FREEZE_OPTIONS:
        raise DMLRunnerError(f"backbone.freeze={freeze!r}: choose one of {FREEZE_OPTIONS}")


class RepeatChannels(nn.Module):
    """Lets a 3-channel ImageNet network read 1-channel images (e.g. digits) by repeating the channel.

    On an accelerator the repeated batch is laid out channels_last (what the trainer's ``trainer.channels_last``
    gives every 4-d batch there; a 1-channel batch is contiguous in both layouts, a bare expand in neither).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 1:
            return x
        out = x.expand(-1, 3, -1, -1)
        if x.ndim == 4 and x.device.type != "cpu" and x.is_contiguous(memory_format=torch.channels_last):
            out = out.contiguous(memory_format=torch.channels_last)
        return out


class FreezableTrunk(nn.Module):
    """Base of the pretrained trunks: ``self.net`` (the network) frozen as ``self.freeze`` says.

    Subclasses set ``self.net`` and ``self.freeze``, call :meth:`apply_freeze` once, and implement ``_forward``.
    """

    net: nn.Module
    freeze: str = "none"

    def batch_norms(self) -> list[nn.modules.batchnorm._BatchNorm]:
        return [m for m in self.net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def apply_freeze(self) -> None:
        """Turn gradients off as ``self.freeze`` says (modes are kept by :meth:`train`)."""
        if self.freeze == "all":
            self.net.requires_grad_(False)
        elif self.freeze == "bn_all":
            for module in self.batch_norms():
                module.requires_grad_(False)

    def train(self, mode: bool = True) -> FreezableTrunk:
        """Switch modes, but keep frozen parts in eval mode (every BatchNorm for ``freeze=bn``/``bn_all``, the whole
        network for ``freeze=all``), so their running statistics never change."""
        super().train(mode)
        if self.freeze == "all":
            self.net.eval()
        elif self.freeze in ("bn", "bn_all"):
            for module in self.batch_norms():
                module.eval()
        return self

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.freeze == "all":
            with torch.no_grad():  # nothing upstream of the features is trained: keep no activations
                return self._forward(x)
        return self._forward(x)


_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """The first characters of ``path``'s sha256 (cached per path, size and modification time)."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
        _HASHES[key] = digest.hexdigest()[:_SHA256_CHARS]
    return _HASHES[key]
