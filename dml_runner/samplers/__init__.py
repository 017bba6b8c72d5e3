"""Batch samplers: each `conf/sampler/<name>.yaml` instantiates one with (labels, batch_size, seed)."""

from dml_runner.samplers.base import EpochBatchSampler
from dml_runner.samplers.class_balanced import ClassBalancedBatchSampler
from dml_runner.samplers.random import RandomBatchSampler

__all__ = ["EpochBatchSampler", "ClassBalancedBatchSampler", "RandomBatchSampler"]
