"""Binomial deviance loss (Yi, Lei, Liao, Li, "Deep Metric Learning for Person Re-identification", ICPR 2014).

For the cosine similarity ``s_ij`` of every ordered pair ``i != j`` in the batch,
``cost_ij = log(1 + exp(-alpha * (s_ij - beta) * m_ij))`` with ``m_ij = 1`` for a positive pair and ``-C`` for a
negative one. Positive pairs are averaged among themselves, negative pairs among themselves, and the loss is the sum
of the two means (the paper's weights 1/n_pos and 1/n_neg).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BinomialDevianceLoss(nn.Module):
    """``forward(embeddings (B, D), labels (B,)) -> scalar``: the dml-runner loss contract."""

    def __init__(self, alpha: float = 2.0, beta: float = 0.5, negative_cost: float = 25.0) -> None:
        super().__init__()
        if alpha <= 0 or negative_cost <= 0:
            raise ValueError("loss.alpha and loss.negative_cost must be positive")
        self.alpha, self.beta, self.negative_cost = alpha, beta, negative_cost

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = F.normalize(embeddings, dim=1)
        sim = x @ x.T
        same = labels[:, None] == labels[None, :]
        off_diagonal = ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        positive, negative = same & off_diagonal, ~same
        m = torch.where(same, torch.ones_like(sim), torch.full_like(sim, -self.negative_cost))
        cost = F.softplus(-self.alpha * (sim - self.beta) * m)
        zero = sim.new_zeros(())
        pos = cost[positive].mean() if positive.any() else zero
        neg = cost[negative].mean() if negative.any() else zero
        return pos + neg
