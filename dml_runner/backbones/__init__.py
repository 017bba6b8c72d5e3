"""Backbones: each `conf/backbone/<name>.yaml` instantiates an `EmbeddingModel` (trunk + embedding head)."""

from dml_runner.backbones.head import EmbeddingHead, EmbeddingModel
from dml_runner.backbones.small_cnn import small_cnn
from dml_runner.backbones.torchvision_nets import torchvision_backbone

__all__ = ["EmbeddingHead", "EmbeddingModel", "small_cnn", "torchvision_backbone"]
