"""A small convolutional network for the embedded digits data (and tests): trains in seconds on a CPU."""

from __future__ import annotations

import torch
from torch import nn

from dml_runner.backbones.head import EmbeddingHead, EmbeddingModel


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU blocks (one 2x downsampling) and global average pooling."""

    def __init__(self, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.body = nn.Sequential(block(in_channels, width), block(width, 2 * width, stride=2),
                                  block(2 * width, 4 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = 4 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.body(x)).flatten(1)


def small_cnn(in_channels: int = 1, width: int = 32, embedding_dim: int = 64, normalize: bool = True,
              dropout: float = 0.0) -> EmbeddingModel:
    trunk = SmallCNN(in_channels=in_channels, width=width)
    head = EmbeddingHead(trunk.feature_dim, embedding_dim, normalize=normalize, dropout=dropout)
    info = {"arch": "small_cnn", "width": width, "pretrained": False, "weights": "random init"}
    return EmbeddingModel(trunk, head, info=info)
