"""Embedding head and the model wrapper every backbone config builds."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class EmbeddingHead(nn.Module):
    """Pooled features -> dropout -> linear (``embedding_dim``) -> [per-slice L2] -> optional L2 normalisation.

    ``slices`` (default none): contiguous, disjoint slices covering the embedding; each slice of the linear output
    is L2-normalised on its own before the slices are concatenated (and, with ``normalize``, the concatenation
    normalised as a whole). This is the Divide-and-Conquer embedding of the official code (``lib/model.py``
    ``forward``); :meth:`set_slices` switches it on or off after construction.
    """

    def __init__(self, in_dim: int, embedding_dim: int, normalize: bool = True, dropout: float = 0.0,
                 slices: Sequence[slice] | None = None) -> None:
        super().__init__()
        if embedding_dim <= 0:
            raise ValueError(f"backbone.embedding_dim must be positive, got {embedding_dim}")
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_dim, embedding_dim)
        self.normalize = normalize
        # L2-normalise in eval mode only (evaluation, saved embeddings) while training sees the raw output:
        # eval.normalize / method=hdml's eval_normalize, as the official HDML evaluation does.
        self.eval_normalize = False
        nn.init.xavier_uniform_(self.fc.weight)  # Xavier init as in Song et al. 2016's fc embedding layer
        nn.init.zeros_(self.fc.bias)
        self.slices: list[slice] | None = None
        self.register_buffer("slice_ids", torch.zeros(0, dtype=torch.long), persistent=False)
        self.set_slices(slices)

    def set_slices(self, slices: Sequence[slice] | None) -> None:
        """Normalise each of ``slices`` on its own (None: the raw linear output, the default)."""
        dim = self.fc.out_features
        if slices is None:
            self.slices = None
            self.slice_ids = torch.zeros(0, dtype=torch.long, device=self.fc.weight.device)
            return
        slices = list(slices)
        covered = [i for s in slices for i in range(dim)[s]]
        if sorted(covered) != list(range(dim)) or any(s.step not in (None, 1) for s in slices):
            raise ValueError(f"embedding slices {slices} must be contiguous, disjoint and cover all {dim} dims")
        ids = torch.empty(dim, dtype=torch.long)
        for k, s in enumerate(slices):
            ids[s] = k
        self.slices = slices
        self.slice_ids = ids.to(self.fc.weight.device)

    def normalize_per_slice(self, z: torch.Tensor) -> torch.Tensor:
        """Each slice of ``z`` (float32) divided by max(its L2 norm, 1e-12), as ``F.normalize`` per slice."""
        z = z.float()
        squares = torch.zeros(z.shape[0], len(self.slices), device=z.device, dtype=z.dtype)
        squares.index_add_(1, self.slice_ids, z * z)
        return z / squares.sqrt().clamp_min(1e-12)[:, self.slice_ids]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        z = self.fc(self.dropout(features))
        if self.slices is not None:
            z = self.normalize_per_slice(z)
        return F.normalize(z, dim=1) if self.normalize or (self.eval_normalize and not self.training) else z


def init_sliced_xavier_normal_(fc: nn.Linear, slices: Sequence[slice], seed: int | None = None) -> None:
    """Official Divide-and-Conquer initialisation (``init_splitted``): the weight rows of every slice drawn by
    ``xavier_normal_`` (gain 1) of a ``Linear(in, width)`` on their own, the bias PyTorch's default Linear init
    U(-1/sqrt(in), 1/sqrt(in)). ``seed``: drawn on the CPU from a generator seeded with it (the same values on
    every device and rank; the official code seeds with ``random_seed + 1``), else from the global RNG."""
    generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    weight = torch.empty(fc.weight.shape)
    for s in slices:
        nn.init.xavier_normal_(weight[s], gain=1.0, generator=generator)  # fan_out = slice width, fan_in = in
    bound = 1.0 / math.sqrt(fc.in_features)
    bias = torch.empty(fc.out_features).uniform_(-bound, bound, generator=generator)
    with torch.no_grad():
        fc.weight.copy_(weight)
        fc.bias.copy_(bias)


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
