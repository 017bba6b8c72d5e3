"""Batches of fixed random triplets laid out ``[anchors; positives; negatives]``, the official HDML triplet stream.

Port of ``TripletLossScheme`` in ``wzzheng/HDML`` ``datasets/data_provider.py``: a batch of ``3m`` images draws
``2m`` distinct classes at random; triplet ``i`` takes two distinct images of class ``i`` (anchor, positive) and
one image of class ``m + i`` (negative). The batch is the ``m`` anchors, then the ``m`` positives, then the ``m``
negatives; ``loss=hdml_triplet`` (``loss.mining=fixed``) reads it back in thirds.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from dml_runner.samplers.base import EpochBatchSampler


class HDMLTripletBatchSampler(EpochBatchSampler):
    """``batch_size // 3`` triplets per batch, ``[a_1..a_m, p_1..p_m, n_1..n_m]``, from ``2m`` distinct classes.

    As the official scheme, every batch draws its classes independently of the others (no per-epoch coverage). A
    class with a single image gives it as both anchor and positive (the official code would fail there). Randomness
    depends only on ``(seed, epoch)``; ``len()`` = ``len(labels) // batch_size`` batches per epoch.
    """

    def __init__(self, labels: np.ndarray, batch_size: int, seed: int = 0) -> None:
        super().__init__(labels, batch_size, seed)
        if batch_size % 3:
            raise ValueError(f"sampler=hdml_triplets needs trainer.batch_size a multiple of 3 (m anchors, m positives, "
                             f"m negatives), got {batch_size}")
        self.triplets = batch_size // 3
        self.classes, self.members = self.items_by_class()
        if self.classes.size < 2 * self.triplets:
            raise ValueError(f"sampler=hdml_triplets draws 2 x {self.triplets} distinct classes per batch "
                             f"(trainer.batch_size={batch_size}) but the training set has {self.classes.size}: "
                             f"lower trainer.batch_size to at most {3 * (self.classes.size // 2)}")

    def __iter__(self) -> Iterator[list[int]]:
        rng = self._rng()
        m = self.triplets
        for _ in range(len(self)):
            chosen = rng.choice(self.classes.size, size=2 * m, replace=False)
            pairs = np.empty((m, 2), dtype=np.int64)
            for i, c in enumerate(chosen[:m]):  # m classes per batch: a loop over classes, not items
                members = self.members[c]
                pairs[i] = rng.choice(members, size=2, replace=members.size < 2)
            # one random image of each negative class: floor(u * size) indexes each class's member list
            sizes = np.array([self.members[c].size for c in chosen[m:]])
            picks = (rng.random(m) * sizes).astype(np.int64)
            negatives = np.array([self.members[c][k] for c, k in zip(chosen[m:], picks)], dtype=np.int64)
            yield np.concatenate([pairs[:, 0], pairs[:, 1], negatives]).tolist()
