"""Lifted structured loss (Song, Xiang, Jegelka, Savarese, CVPR 2016), exactly the paper's Eq. 4."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dml_runner.losses._reduction import masked_logsumexp
from dml_runner.losses.distances import pairwise_distances
from dml_runner.losses.mining import label_masks


class LiftedStructureLoss(nn.Module):
    """Song et al. 2016, Eq. 4, over the positive pairs P = {(i, j): i < j, y_i == y_j} of the batch::

        J_ij = log( sum_{k: y_k != y_i} exp(a - D_ik) + sum_{l: y_l != y_j} exp(a - D_jl) ) + D_ij
        J    = 1 / (2 |P|) * sum_{(i, j) in P} max(0, J_ij)^2

    D is the plain (not squared) Euclidean distance, a the margin (1); embeddings are not normalised here.
    Vectorised: the per-sample log-sum-exps ``L_i = logsumexp_k (a - D_ik)`` are computed once (B x B), then
    ``J_ij = logaddexp(L_i, L_j) + D_ij`` for all pairs at once, which is the stable log-sum-exp over the union.
    A batch without positive pairs gives 0.
    """

    def __init__(self, margin: float = 1.0) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        dist = pairwise_distances(embeddings)
        pos, neg = label_masks(labels)
        log_neg = masked_logsumexp(self.margin - dist, neg, dim=1)
        j = torch.logaddexp(log_neg[:, None], log_neg[None, :]) + dist
        # each unordered pair appears twice in the symmetric mask: sum / 2 over |P| = pos.sum() / 2 pairs
        num_pairs = pos.sum() / 2
        return torch.relu(j).square().masked_fill(~pos, 0.0).sum() / 2 / (2 * num_pairs.clamp_min(1))

    def extra_repr(self) -> str:
        return f"margin={self.margin}"
