"""Class-disjoint cross-validation folds of the training classes (``dataset.folds=K dataset.fold=i``).

The training classes are shuffled with ``dataset.fold_seed`` (not the training seed: every seed of a fold trains on
the same classes) and cut into K folds whose sizes differ by at most one class. Fold ``i`` becomes the validation
split and the other K - 1 folds train; the test split is untouched. Every training class is in exactly one fold, so
the K validation splits together cover the training classes once (Musgrave et al. 2020, "A Metric Learning Reality
Check", section 4.2).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from dml_runner import DMLRunnerError
from dml_runner.config import check_folds
from dml_runner.datasets.base import DatasetSplits, SubsetLabelledDataset


def class_folds(labels: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """The classes of each of ``folds`` class-disjoint folds (sorted within a fold)."""
    classes = np.unique(np.asarray(labels))
    rng = np.random.default_rng(seed)
    return [np.sort(part) for part in np.array_split(rng.permutation(classes), folds)]


def with_validation_fold(splits: DatasetSplits, folds: int, fold: int, seed: int,
                         val_transform: Callable[[Any], Any] | None | str = "inherit") -> DatasetSplits:
    """Hold out fold ``fold`` of ``folds`` class-disjoint folds of the training classes as the validation split.

    ``val_transform`` is the test-time transform by default (no augmentation). ``splits.info`` records the fold,
    its seed, the held-out classes (by name) and the number of validation images.
    """
    if splits.val is not None:
        raise DMLRunnerError(f"dataset.folds={folds}: the dataset already has a validation split "
                             "(dataset.val_fraction>0 or its own); set dataset.val_fraction=0 when using folds")
    train = splits.train
    check_folds(folds, fold, int(np.unique(train.labels).size))
    held_classes = class_folds(train.labels, folds, seed)[fold]
    is_held = np.isin(train.labels, held_classes)
    if val_transform == "inherit":
        val_transform = splits.test.transform
    splits.val = SubsetLabelledDataset(train, np.flatnonzero(is_held), transform=val_transform)
    splits.train = SubsetLabelledDataset(train, np.flatnonzero(~is_held))
    splits.info.update(folds=folds, fold=fold, fold_seed=seed,
                       val_classes=[train.class_names.get(int(c), str(int(c))) for c in held_classes],
                       val_images=int(is_held.sum()))
    return splits
