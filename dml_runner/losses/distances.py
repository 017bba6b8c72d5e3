"""Pairwise distances shared by every loss.

All functions compute in float32 whatever the input dtype (bf16/fp16 autocast included): the Gram-matrix
expansion ``|x_i|^2 + |x_j|^2 - 2 x_i.x_j`` loses too much precision in half precision.

Both distances are ``torch.autograd.Function``s with hand-written backward passes: one matrix product forward and one
backward, instead of the half-dozen (B, B) intermediate tensors that autograd would keep for the same formula.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pairwise_squared_distances", "pairwise_distances", "pairwise_dot"]


def _as_float32(x: Tensor) -> Tensor:
    return x.float() if x.dtype != torch.float32 else x


def pairwise_dot(x: Tensor, y: Tensor | None = None) -> Tensor:
    """Dot-product similarity matrix ``x @ y.T`` in float32, outside any autocast region."""
    x = _as_float32(x)
    y = x if y is None else _as_float32(y)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return x @ y.T


def _squared_distances_no_grad(x: Tensor) -> Tensor:
    sq_norms = x.square().sum(dim=1)
    sq = torch.addmm(sq_norms[:, None] + sq_norms[None, :], x, x.T, alpha=-2.0).clamp_min_(0.0)
    sq.diagonal().zero_()
    return sq


def _grad_from_pair_weights(weights: Tensor, x: Tensor) -> Tensor:
    """sum_j w_ij (x_i - x_j) for a symmetric (B, B) weight matrix: w.sum(1) * x - w @ x."""
    return torch.addmm(weights.sum(dim=1, keepdim=True) * x, weights, x, alpha=-1.0)


class _SquaredDistances(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return _squared_distances_no_grad(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        # d sq_ij / d x_i = 2 (x_i - x_j); the diagonal term vanishes by itself
        return _grad_from_pair_weights(2.0 * (grad + grad.T), x)


class _EuclideanDistances(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        dist = _squared_distances_no_grad(x).sqrt_()
        ctx.save_for_backward(x, dist)
        return dist

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        x, dist = ctx.saved_tensors
        # d D_ij / d x_i = (x_i - x_j) / D_ij, taken as 0 where D_ij = 0 (the diagonal, coincident points)
        weights = (grad + grad.T) / dist
        weights = torch.where(dist > 0, weights, 0.0)
        return _grad_from_pair_weights(weights, x)


def pairwise_squared_distances(x: Tensor) -> Tensor:
    """(B, B) squared Euclidean distances of the rows of ``x`` (B, D), float32, exact zeros on the diagonal."""
    x = _as_float32(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _SquaredDistances.apply(x)


def pairwise_distances(x: Tensor, squared: bool = False) -> Tensor:
    """(B, B) Euclidean distances of the rows of ``x`` (B, D), float32; ``squared=True`` gives squared ones.

    The diagonal is exactly 0 and the gradient of a zero distance (coincident points) is 0, not inf/NaN: the
    subgradient of |x_i - x_j| at 0 that keeps training stable.
    """
    if squared:
        return pairwise_squared_distances(x)
    x = _as_float32(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _EuclideanDistances.apply(x)
