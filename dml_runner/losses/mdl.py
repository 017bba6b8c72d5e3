"""Margin-based Discriminate Loss (Sun, Tang, Bai, S+SSPR 2018), RECONSTRUCTED FROM THE ABSTRACT.

Only the abstract is public (no formula, no code): each update pulls multiple positives together and pushes
multiple negatives away so that similar and dissimilar pairs are "strictly discriminated" by a margin, without
sampling. This module is our reconstruction of that idea, not the authors' loss; numbers obtained with it must be
labelled "reconstructed from the abstract".
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dml_runner.losses._reduction import masked_logsumexp, masked_mean
from dml_runner.losses.distances import pairwise_distances
from dml_runner.losses.mining import label_masks


class MarginDiscriminateLoss(nn.Module):
    """MDL, reconstructed from the abstract of Sun et al. 2018 (see module docstring).

    Per anchor a, a smooth "every positive closer than every negative by ``margin``" hinge between the whole
    positive set and the whole negative set of the batch::

        softmax_pos(a) = 1/gamma * log sum_{p: y_p = y_a, p != a} exp(gamma D_ap)     (~ max_p D_ap)
        softmin_neg(a) = -1/gamma * log sum_{n: y_n != y_a} exp(-gamma D_an)          (~ min_n D_an)
        L = mean_a max(0, softmax_pos(a) - softmin_neg(a) + margin)

    over the anchors having both a positive and a negative; D Euclidean. gamma -> inf gives the hard
    max/min ("strict" discrimination); a finite gamma spreads the gradient over all positives and negatives.
    """

    def __init__(self, margin: float = 0.2, gamma: float = 10.0) -> None:
        super().__init__()
        self.margin = margin
        self.gamma = gamma

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        dist = pairwise_distances(embeddings)
        pos, neg = label_masks(labels)
        soft_max_pos = masked_logsumexp(self.gamma * dist, pos, dim=1) / self.gamma
        soft_min_neg = -masked_logsumexp(-self.gamma * dist, neg, dim=1) / self.gamma
        per_anchor = torch.relu(soft_max_pos - soft_min_neg + self.margin)
        return masked_mean(per_anchor, pos.any(dim=1) & neg.any(dim=1))

    def extra_repr(self) -> str:
        return f"margin={self.margin}, gamma={self.gamma}"
