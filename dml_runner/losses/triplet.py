"""Triplet margin loss with all / semi-hard / batch-hard mining."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dml_runner.losses._reduction import reduce
from dml_runner.losses.distances import pairwise_distances
from dml_runner.losses.mining import label_masks, mine_triplets

MINING = ("all", "semihard", "hard")


class TripletLoss(nn.Module):
    """Triplet loss ``max(0, D_ap - D_an + margin)`` (Weinberger & Saul 2009; Schroff et al., FaceNet, CVPR 2015).

    ``mining`` chooses the triplets (see :mod:`dml_runner.losses.mining`):

    - ``"all"``: every (a, p, n) of the batch; evaluated per positive pair against all the anchor's negatives,
      an O(|P| B) tensor rather than B^3.
    - ``"semihard"``: FaceNet / TensorFlow semantics, one triplet per positive pair: the closest negative farther
      than the positive, or the farthest negative if there is none.
    - ``"hard"``: batch hard (Hermans et al. 2017), one triplet per anchor with its farthest positive and closest
      negative.

    D is Euclidean (``squared=True``: squared Euclidean, as TF's contrib triplet loss). ``reduction``: ``"mean"``
    over the mined triplets, or ``"nonzero_mean"`` over the triplets with a positive loss (pytorch-metric-learning's
    default; "batch all" of Hermans et al.). No triplet gives a loss of exactly 0.
    """

    def __init__(
        self, margin: float = 0.2, mining: str = "semihard", squared: bool = False, reduction: str = "mean"
    ) -> None:
        super().__init__()
        if mining not in MINING:
            raise ValueError(f"unknown mining {mining!r}; expected one of {MINING}")
        if reduction not in ("mean", "nonzero_mean"):
            raise ValueError(f"unknown reduction {reduction!r}")
        self.margin = margin
        self.mining = mining
        self.squared = squared
        self.reduction = reduction

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        dist = pairwise_distances(embeddings, squared=self.squared)
        if self.mining == "all":
            pos, neg = label_masks(labels)
            a, p = pos.nonzero(as_tuple=True)
            violation = torch.relu(dist[a, p][:, None] - dist[a] + self.margin)
            return reduce(violation[neg[a]], self.reduction)
        a, p, n = mine_triplets(self.mining, dist, labels)
        return reduce(torch.relu(dist[a, p] - dist[a, n] + self.margin), self.reduction)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, mining={self.mining!r}, squared={self.squared}, reduction={self.reduction!r}"
