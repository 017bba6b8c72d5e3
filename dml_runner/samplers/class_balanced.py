"""P classes x K images per batch, the batch composition most DML losses assume."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from dml_runner.samplers.base import EpochBatchSampler


class ClassBalancedBatchSampler(EpochBatchSampler):
    """Every batch holds exactly ``batch_size // samples_per_class`` distinct classes x ``samples_per_class`` images.

    Within an epoch classes are visited in a random order without repetition until all have been used (then the
    order is redrawn), so every class is seen about equally often. A class with at least K images contributes K
    distinct images; one with fewer is sampled with replacement (duplicates are then unavoidable). Batches per epoch
    = ``len(labels) // batch_size``, so an epoch sees about as many images as the dataset holds.
    """

    too_few_classes_fix = "lower trainer.batch_size or raise sampler.samples_per_class"

    @staticmethod
    def check_config(node: dict[str, Any], config: dict[str, Any]) -> None:
        """dml-run's config validation: samples_per_class is a positive integer that divides trainer.batch_size."""
        from dml_runner import DMLRunnerError
        from dml_runner.config import positive_int

        if "samples_per_class" not in node:
            return
        spc, batch = node["samples_per_class"], config["trainer"]["batch_size"]
        positive_int("sampler.samples_per_class", spc)
        if batch % spc:
            raise DMLRunnerError(f"trainer.batch_size={batch} must be a multiple of sampler.samples_per_class="
                                 f"{spc} (each batch holds batch_size / samples_per_class classes)")

    def __init__(self, labels: np.ndarray, batch_size: int, seed: int = 0, samples_per_class: int = 4) -> None:
        super().__init__(labels, batch_size, seed)
        if samples_per_class <= 0:
            raise ValueError(f"sampler.samples_per_class must be positive, got {samples_per_class}")
        if batch_size % samples_per_class:
            raise ValueError(f"trainer.batch_size={batch_size} must be a multiple of "
                             f"sampler.samples_per_class={samples_per_class}")
        self.samples_per_class = int(samples_per_class)
        self.classes_per_batch = batch_size // samples_per_class
        self.classes, self.members = self.items_by_class()
        if self.classes.size < self.classes_per_batch:
            raise ValueError(
                f"a batch needs {self.classes_per_batch} classes (trainer.batch_size={batch_size} / "
                f"sampler.samples_per_class={samples_per_class}) but the training set has {self.classes.size}; "
                f"{self.too_few_classes_fix}")

    def __iter__(self) -> Iterator[list[int]]:
        rng = self._rng()
        p, k = self.classes_per_batch, self.samples_per_class
        queue = np.empty(0, dtype=np.int64)
        for _ in range(len(self)):
            if queue.size < p:
                fresh = rng.permutation(self.classes.size)
                # a class at the end of the old queue must not appear twice in one batch
                fresh = np.concatenate([fresh[~np.isin(fresh, queue)], fresh[np.isin(fresh, queue)]])
                queue = np.concatenate([queue, fresh])
            chosen, queue = queue[:p], queue[p:]
            batch = []
            for c in chosen:  # p classes per batch: a loop over classes, not items
                members = self.members[c]
                batch.append(rng.choice(members, size=k, replace=members.size < k))
            yield np.concatenate(batch).tolist()
