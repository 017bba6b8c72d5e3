"""Metric-learning losses: plain ``nn.Module``s with ``forward(embeddings (B, D), labels (B,)) -> scalar``.

Distances live in :mod:`~dml_runner.losses.distances`, pair/triplet mining in :mod:`~dml_runner.losses.mining`.
:class:`~dml_runner.losses.pml.PMLLoss` builds any pytorch-metric-learning loss by name. The one exception to the
contract is :class:`~dml_runner.losses.hdml.HDMLLoss`, trained by ``method=hdml`` only (see its docstring).
"""

from dml_runner.losses.angular import AngularLoss, AngularNPairLoss
from dml_runner.losses.contrastive import ContrastiveLoss
from dml_runner.losses.ddml import DDMLLoss
from dml_runner.losses.hdml import HDMLLoss
from dml_runner.losses.lifted import LiftedStructureLoss
from dml_runner.losses.margin import MarginLoss
from dml_runner.losses.mdl import MarginDiscriminateLoss
from dml_runner.losses.npair import NPairLoss
from dml_runner.losses.pml import PMLLoss
from dml_runner.losses.triplet import TripletLoss

__all__ = [
    "AngularLoss",
    "AngularNPairLoss",
    "ContrastiveLoss",
    "DDMLLoss",
    "HDMLLoss",
    "LiftedStructureLoss",
    "MarginDiscriminateLoss",
    "MarginLoss",
    "NPairLoss",
    "PMLLoss",
    "TripletLoss",
]
