"""Discriminative Deep Metric Learning loss (Hu, Lu, Tan, CVPR 2014), as the pair loss used in the HDML tables."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dml_runner.losses._reduction import masked_mean
from dml_runner.losses.distances import pairwise_squared_distances
from dml_runner.losses.mining import label_masks


class DDMLLoss(nn.Module):
    """DDML pair loss with the generalised logistic function (Hu et al. 2014, Eq. 5-6)::

        L = mean_{i != j} g(1 - l_ij (tau - D_ij^2)),   g(z) = (1/beta) log(1 + exp(beta z))

    with ``l_ij = +1`` for a positive pair and ``-1`` for a negative one, D the Euclidean distance: positives are
    pushed below ``D^2 = tau - 1`` and negatives above ``tau + 1``. The paper's weight-decay term (lambda/2 sum |W|^2)
    is left to the optimiser, and the paper's sum over pairs becomes a mean. ``tau = 2`` centres the threshold for
    L2-normalised embeddings (D^2 in [0, 4]); the paper chose its values for unnormalised face descriptors.
    """

    def __init__(self, tau: float = 2.0, beta: float = 10.0) -> None:
        super().__init__()
        self.tau = tau
        self.beta = beta

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        sq = pairwise_squared_distances(embeddings)
        pos, neg = label_masks(labels)
        sign = pos.float() - neg.float()
        z = 1.0 - sign * (self.tau - sq)
        per_pair = nn.functional.softplus(z, beta=self.beta, threshold=20.0)
        return masked_mean(per_pair, pos | neg)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, beta={self.beta}"
