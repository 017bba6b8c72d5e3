"""Contrastive loss (Hadsell, Chopra, LeCun, CVPR 2006)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dml_runner.losses._reduction import masked_mean, nonzero_mean
from dml_runner.losses.distances import pairwise_distances
from dml_runner.losses.mining import label_masks


class ContrastiveLoss(nn.Module):
    """Contrastive loss over every pair of the batch, positive margin 0 and negative margin ``margin``.

    Paper form (Hadsell et al. 2006, Eq. 4, ``squared=True``), the constant 1/2 dropped::

        L_ij = D_ij^2                    if y_i == y_j
        L_ij = max(0, margin - D_ij)^2   otherwise

    ``squared=False`` uses the plain hinges ``D_ij`` and ``max(0, margin - D_ij)`` (pytorch-metric-learning's
    ``ContrastiveLoss``). D is the Euclidean distance (computed in float32).

    Reductions: ``"mean"``: average over all pairs i != j (the paper sums; the mean only rescales);
    ``"nonzero_mean"``: positive and negative terms each averaged over their non-zero terms, then added
    (pytorch-metric-learning's default AvgNonZeroReducer). A batch without positive (or negative) pairs just
    contributes 0 for that part.
    """

    def __init__(self, margin: float = 1.0, squared: bool = True, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in ("mean", "nonzero_mean"):
            raise ValueError(f"unknown reduction {reduction!r}")
        self.margin = margin
        self.squared = squared
        self.reduction = reduction

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        dist = pairwise_distances(embeddings)
        pos, neg = label_masks(labels)
        neg_hinge = torch.relu(self.margin - dist)
        pos_term = dist.square() if self.squared else dist
        neg_term = neg_hinge.square() if self.squared else neg_hinge
        if self.reduction == "mean":
            return masked_mean(torch.where(pos, pos_term, neg_term), pos | neg)
        return nonzero_mean(pos_term.masked_fill(~pos, 0.0)) + nonzero_mean(neg_term.masked_fill(~neg, 0.0))

    def extra_repr(self) -> str:
        return f"margin={self.margin}, squared={self.squared}, reduction={self.reduction!r}"
