"""A batch sampler plug-in: batches cut from the training set ordered class by class (few classes, many positives)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from dml_runner.samplers.base import EpochBatchSampler


class ClassBlocksBatchSampler(EpochBatchSampler):
    """The classes in a random order, each class's images shuffled, one after the other, cut into ``batch_size``
    chunks (the incomplete last chunk is dropped). A batch therefore spans a few consecutive classes, so most of its
    images have positives in it. The order depends only on ``(seed, epoch)`` (``set_epoch``)."""

    def __iter__(self) -> Iterator[list[int]]:
        rng = self._rng()
        _, members = self.items_by_class()
        order = np.concatenate([rng.permutation(members[c]) for c in rng.permutation(len(members))])
        for b in range(len(self)):
            yield order[b * self.batch_size:(b + 1) * self.batch_size].tolist()
