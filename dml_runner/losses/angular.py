"""Angular loss (Wang, Zhou, Wen, Liu, Lin, ICCV 2017), alone and combined with the N-pair loss."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dml_runner.losses._reduction import mean
from dml_runner.losses.distances import pairwise_dot
from dml_runner.losses.mining import label_masks
from dml_runner.losses.npair import npair_loss


def angular_loss(embeddings: Tensor, labels: Tensor, alpha_degrees: float, normalize: bool) -> Tensor:
    """Functional form of :class:`AngularLoss`."""
    x = embeddings.float()
    if normalize:
        x = nn.functional.normalize(x, dim=1)
    sim = pairwise_dot(x)
    pos, neg = label_masks(labels)
    a, p = pos.nonzero(as_tuple=True)
    tan_sq = math.tan(math.radians(alpha_degrees)) ** 2
    # f_apn for every positive pair (rows) and every sample n (columns): (P, B)
    f = 4.0 * tan_sq * (sim[a] + sim[p]) - 2.0 * (1.0 + tan_sq) * sim[a, p][:, None]
    f = f.masked_fill(~neg[a], -math.inf)
    # log(1 + sum exp f) as a log-sum-exp with a 0 column: stable, and an anchor without negatives gives 0
    per_pair = torch.logsumexp(torch.cat([f.new_zeros(f.shape[0], 1), f], dim=1), dim=1)
    return mean(per_pair)


class AngularLoss(nn.Module):
    """Angular loss, Wang et al. 2017, Eq. 8, over every ordered positive pair (a, p) of the batch::

        f_apn = 4 tan^2(alpha) (x_a + x_p)^T x_n - 2 (1 + tan^2(alpha)) x_a^T x_p
        L     = mean_{(a, p)} log(1 + sum_{n: y_n != y_a} exp(f_apn))

    on L2-normalised embeddings (``normalize=True`` normalises inside, as the paper assumes unit features).
    With N classes x 2 per batch this is the paper's 1/N sum over anchors; with more samples per class every
    positive pair counts (as pytorch-metric-learning's AngularLoss).
    """

    def __init__(self, alpha: float = 45.0, normalize: bool = True) -> None:
        super().__init__()
        self.alpha = alpha
        self.normalize = normalize

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return angular_loss(embeddings, labels, self.alpha, self.normalize)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, normalize={self.normalize}"


class AngularNPairLoss(nn.Module):
    """N-pair + angular, Wang et al. 2017, Eq. 9: ``L = L_npair + lambda_ang * L_ang`` (paper: lambda = 2).

    The N-pair part (with its L2 regulariser, see :class:`~dml_runner.losses.npair.NPairLoss`) sees the raw
    embeddings; the angular part normalises them when ``normalize`` is set.
    """

    def __init__(
        self, alpha: float = 45.0, lambda_ang: float = 2.0, l2_reg: float = 3e-3, normalize: bool = True
    ) -> None:
        super().__init__()
        self.alpha = alpha
        self.lambda_ang = lambda_ang
        self.l2_reg = l2_reg
        self.normalize = normalize

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return npair_loss(embeddings, labels, self.l2_reg) + self.lambda_ang * angular_loss(
            embeddings, labels, self.alpha, self.normalize
        )

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, lambda_ang={self.lambda_ang}, l2_reg={self.l2_reg}, normalize={self.normalize}"
