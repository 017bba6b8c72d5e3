"""Embedding head and the model wrapper every backbone config builds."""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class EmbeddingHead(nn.Module):
    """Pooled features -> dropout -> linear (``embedding_dim``) -> optional L2 normalisation."""

    def __init__(self, in_dim: int, embedding_dim: int, normalize: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        if embedding_dim <= 0:
            raise ValueError(f"backbone.embedding_dim must be positive, got {embedding_dim}")
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_dim, embedding_dim)
        self.normalize = normalize
        nn.init.xavier_uniform_(self.fc.weight)  # Xavier init as in Song et al. 2016's fc embedding layer
        nn.init.zeros_(self.fc.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        z = self.fc(self.dropout(features))
        return F.normalize(z, dim=1) if self.normalize else z


class EmbeddingModel(nn.Module):
    """``trunk`` (images -> pooled features, attribute ``feature_dim``) followed by an :class:`EmbeddingHead`."""

    def __init__(self, trunk: nn.Module, head: EmbeddingHead, info: dict | None = None) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = head
        self.info = dict(info or {})  # recorded in results.json: architecture, weights, deviations

    @property
    def embedding_dim(self) -> int:
        return self.head.fc.out_features

    @property
    def feature_dim(self) -> int:
        return int(self.trunk.feature_dim)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(images))
