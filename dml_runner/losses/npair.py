"""Multi-class N-pair loss (Sohn, NeurIPS 2016) with the L2 embedding regulariser."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dml_runner.losses.distances import pairwise_dot
from dml_runner.losses.mining import first_pair_per_class


def npair_loss(embeddings: Tensor, labels: Tensor, l2_reg: float) -> Tensor:
    """Functional form of :class:`NPairLoss` (shared with the angular + N-pair combination)."""
    anchor_idx, positive_idx = first_pair_per_class(labels)
    x = embeddings.float()
    if anchor_idx.numel() == 0:
        return x.sum() * 0.0
    anchors, positives = x[anchor_idx], x[positive_idx]
    logits = pairwise_dot(anchors, positives)
    targets = torch.arange(anchors.shape[0], device=x.device)
    ce = nn.functional.cross_entropy(logits, targets)
    reg = 0.25 * l2_reg * (anchors.square().sum(1).mean() + positives.square().sum(1).mean())
    return ce + reg


class NPairLoss(nn.Module):
    """Multi-class N-pair loss (Sohn 2016, Eq. 6) plus the embedding regulariser of docs/PAPERS.md §4::

        L = 1/N sum_i log(1 + sum_{j != i} exp(f_i . f+_j - f_i . f+_i))
            + 0.25 * l2_reg * (mean_i |f_i|^2 + mean_i |f+_i|^2)

    (the cross-entropy over the N x N anchor-positive dot products; the regulariser as TensorFlow's
    ``npairs_loss`` used by HDML). The batch is read as N classes x 2: each class with >= 2 samples contributes its
    first two samples as (anchor, positive); further samples of a class are ignored. Use the ``npair`` sampler.
    """

    def __init__(self, l2_reg: float = 3e-3) -> None:
        super().__init__()
        self.l2_reg = l2_reg

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return npair_loss(embeddings, labels, self.l2_reg)

    def extra_repr(self) -> str:
        return f"l2_reg={self.l2_reg}"
