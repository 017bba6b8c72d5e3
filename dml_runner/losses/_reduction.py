"""Reductions shared by the losses (empty sets give an exact 0 that still carries a gradient)."""

from __future__ import annotations

import torch
from torch import Tensor


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` is True; 0 (with a defined, zero gradient) when the mask is empty."""
    return values.masked_fill(~mask, 0.0).sum() / mask.sum().clamp_min(1)


def nonzero_mean(values: Tensor) -> Tensor:
    """Sum of ``values`` (>= 0) divided by how many are > 0, as pytorch-metric-learning's AvgNonZeroReducer."""
    return values.sum() / (values > 0).sum().clamp_min(1)


def mean(values: Tensor) -> Tensor:
    """Plain mean that returns 0 (not NaN) for an empty tensor."""
    return values.sum() / max(values.numel(), 1)


def reduce(values: Tensor, reduction: str) -> Tensor:
    """``"mean"`` over all terms or ``"nonzero_mean"`` over the terms > 0."""
    if reduction == "mean":
        return mean(values)
    if reduction == "nonzero_mean":
        return nonzero_mean(values)
    raise ValueError(f"unknown reduction {reduction!r}; expected 'mean' or 'nonzero_mean'")


# What masked_logsumexp returns for a row with nothing to sum: a finite stand-in for log(0), so that later
# arithmetic (logaddexp, differences) stays finite and the gradient is 0 rather than NaN.
LOG_ZERO = -1e4


def masked_logsumexp(values: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """``log sum_{mask} exp(values)`` along ``dim``, exact for any magnitude of ``values``; ``LOG_ZERO`` for a
    row whose mask is empty (with a zero gradient)."""
    nonempty = mask.any(dim=dim, keepdim=True)
    # -inf drops masked entries exactly; an empty row is filled with 0s instead so its logsumexp stays finite
    filler = torch.where(nonempty, float("-inf"), 0.0).to(values.dtype)
    out = torch.logsumexp(torch.where(mask, values, filler), dim=dim)
    return out.masked_fill(~nonempty.squeeze(dim), LOG_ZERO)
