"""Uniformly shuffled batches (no control over how many positives a batch holds)."""

from __future__ import annotations

from collections.abc import Iterator

from dml_runner.samplers.base import EpochBatchSampler


class RandomBatchSampler(EpochBatchSampler):
    """A random permutation cut into ``batch_size`` chunks; the incomplete last chunk is dropped."""

    def __iter__(self) -> Iterator[list[int]]:
        order = self._rng().permutation(len(self.labels))
        for b in range(len(self)):
            yield order[b * self.batch_size:(b + 1) * self.batch_size].tolist()
