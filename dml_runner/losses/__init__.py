"""Metric-learning losses: plain ``nn.Module``s with ``forward(embeddings (B, D), labels (B,)) -> scalar``.

Distances live in :mod:`~dml_runner.losses.distances`, pair/triplet mining in :mod:`~dml_runner.losses.mining`.
"""

from dml_runner.losses.angular import AngularLoss, AngularNPairLoss
from dml_runner.losses.contrastive import ContrastiveLoss
from dml_runner.losses.ddml import DDMLLoss
from dml_runner.losses.lifted import LiftedStructureLoss
from dml_runner.losses.margin import MarginLoss
from dml_runner.losses.mdl import MarginDiscriminateLoss
from dml_runner.losses.npair import NPairLoss
from dml_runner.losses.triplet import TripletLoss

__all__ = [
    "AngularLoss",
    "AngularNPairLoss",
    "ContrastiveLoss",
    "DDMLLoss",
    "LiftedStructureLoss",
    "MarginDiscriminateLoss",
    "MarginLoss",
    "NPairLoss",
    "TripletLoss",
]
from dml_runner.losses.hdml import HDMLLoss  # noqa: E402,F401  (issue 6)
