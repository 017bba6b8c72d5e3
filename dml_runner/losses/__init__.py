"""Metric-learning losses: plain ``nn.Module``s with ``forward(embeddings (B, D), labels (B,)) -> scalar``."""

from dml_runner.losses.contrastive import ContrastiveLoss
from dml_runner.losses.triplet import TripletLoss

__all__ = ["ContrastiveLoss", "TripletLoss"]
