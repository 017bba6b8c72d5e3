"""Shared behaviour of batch samplers: deterministic per-epoch randomness."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


class EpochBatchSampler(Sampler[list[int]]):
    """A batch sampler whose randomness depends only on ``(seed, epoch)``.

    ``set_epoch(e)`` selects the epoch; iterating twice over the same epoch yields the same batches, so a run can
    be repeated (and later resumed) exactly. ``__len__`` is the number of batches per epoch.
    """

    def __init__(self, labels: np.ndarray, batch_size: int, seed: int = 0) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        if batch_size <= 0:
            raise ValueError(f"trainer.batch_size must be positive, got {batch_size}")
        if self.labels.size == 0:
            raise ValueError("cannot sample batches from an empty training set")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.epoch = 0

    def items_by_class(self) -> tuple[np.ndarray, list[np.ndarray]]:
        """``(classes, members)``: the sorted class labels and, per class, its item indices in ascending order."""
        classes, inverse = np.unique(self.labels, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        return classes, np.split(order, np.cumsum(np.bincount(inverse))[:-1])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch])

    def __len__(self) -> int:
        return max(1, len(self.labels) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        raise NotImplementedError
