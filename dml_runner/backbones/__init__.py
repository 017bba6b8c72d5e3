"""Backbones: each `conf/backbone/<name>.yaml` instantiates an `EmbeddingModel` (trunk + embedding head)."""

from dml_runner.backbones.head import EmbeddingHead, EmbeddingModel
from dml_runner.backbones.small_cnn import small_cnn
from dml_runner.backbones.timm_nets import timm_backbone
from dml_runner.backbones.torchvision_nets import hub_weights_available, hub_weights_path, torchvision_backbone

__all__ = ["EmbeddingHead", "EmbeddingModel", "hub_weights_available", "hub_weights_path", "small_cnn",
           "timm_backbone", "torchvision_backbone"]
