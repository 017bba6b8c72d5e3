"""Pairwise distances shared by every loss.

All functions compute in float32 whatever the input dtype (bf16/fp16 autocast included): the Gram-matrix
expansion ``|x|^2 + |y|^2 - 2 x.y`` loses too much precision in half precision.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pairwise_squared_distances", "pairwise_distances", "euclidean_from_squared", "pairwise_dot"]

# Squared distances below this are treated as 0 before the square root: d sqrt(s)/ds = 1/(2 sqrt(s)) is
# infinite at 0, so the clamp (whose gradient is 0 below the bound) keeps gradients finite for identical points.
_SQRT_EPS = 1e-12


def _as_float32(x: Tensor) -> Tensor:
    return x.float() if x.dtype != torch.float32 else x


def pairwise_dot(x: Tensor, y: Tensor | None = None) -> Tensor:
    """Dot-product similarity matrix ``x @ y.T`` in float32, outside any autocast region."""
    x = _as_float32(x)
    y = x if y is None else _as_float32(y)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return x @ y.T


def pairwise_squared_distances(x: Tensor) -> Tensor:
    """(B, B) squared Euclidean distances of the rows of ``x`` (B, D); exact zeros on the diagonal."""
    x = _as_float32(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        sq_norms = (x * x).sum(dim=1)
        gram = x @ x.T
        sq = (sq_norms[:, None] + sq_norms[None, :] - 2.0 * gram).clamp_min(0.0)
    eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    return sq.masked_fill(eye, 0.0)


def euclidean_from_squared(sq: Tensor) -> Tensor:
    """Square root of a (B, B) squared-distance matrix, clamped at 1e-12 first, diagonal exactly 0.

    The clamp (whose gradient is 0 below the bound) gives a zero gradient, not inf/NaN, for coincident points.
    """
    dist = sq.clamp_min(_SQRT_EPS).sqrt()
    eye = torch.eye(sq.shape[0], dtype=torch.bool, device=sq.device)
    return dist.masked_fill(eye, 0.0)


def pairwise_distances(x: Tensor, squared: bool = False) -> Tensor:
    """(B, B) Euclidean distances of the rows of ``x`` (B, D), float32; ``squared=True`` gives squared ones."""
    sq = pairwise_squared_distances(x)
    return sq if squared else euclidean_from_squared(sq)
