"""torchvision's MobileNetV3-Small as a dml-runner backbone: its convolutional trunk and global pooling, then the
project's embedding head. ``pretrained=true`` loads torchvision's ImageNet weights through torchvision's own code."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from dml_runner.backbones import EmbeddingHead, EmbeddingModel


class MobileNetTrunk(nn.Module):
    def __init__(self, net: torchvision.models.MobileNetV3) -> None:
        super().__init__()
        self.features, self.pool = net.features, net.avgpool
        self.feature_dim = int(net.classifier[0].in_features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(images)).flatten(1)


def mobilenet_v3_small(in_channels: int = 3, pretrained: bool = False, embedding_dim: int = 128,
                       normalize: bool = True, dropout: float = 0.0) -> EmbeddingModel:
    if in_channels != 3:
        raise ValueError(f"backbone mobilenet_v3_small takes RGB images, the dataset has {in_channels} channel(s)")
    weights = torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1 if pretrained else None
    trunk = MobileNetTrunk(torchvision.models.mobilenet_v3_small(weights=weights))
    head = EmbeddingHead(trunk.feature_dim, embedding_dim, normalize=normalize, dropout=dropout)
    return EmbeddingModel(trunk, head, info={"arch": "mobilenet_v3_small", "pretrained": pretrained,
                                             "weights": str(weights) if weights else "random init"})
