"""N classes x 2 images per batch, the batch layout of the N-pair loss (Sohn 2016) and HDML."""

from __future__ import annotations

import numpy as np

from dml_runner.samplers.class_balanced import ClassBalancedBatchSampler


class NPairBatchSampler(ClassBalancedBatchSampler):
    """Every batch holds ``batch_size // 2`` distinct classes, two images each, laid out ``[a1, p1, a2, p2, ...]``.

    The class-balanced sampler with ``samples_per_class = 2``: classes are visited in a random order without
    repetition within an epoch, a class with a single image gives it twice (sampled with replacement), randomness
    depends only on ``(seed, epoch)`` (``set_epoch``), and ``len()`` = ``len(labels) // batch_size`` batches.
    ``batch_size`` must be even.
    """

    too_few_classes_fix = "lower trainer.batch_size (the npair sampler always takes 2 images per class)"

    def __init__(self, labels: np.ndarray, batch_size: int, seed: int = 0) -> None:
        if batch_size % 2:
            raise ValueError(f"the npair sampler needs an even trainer.batch_size (N classes x 2), got {batch_size}")
        super().__init__(labels, batch_size, seed, samples_per_class=2)
