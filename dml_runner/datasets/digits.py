"""The embedded default dataset: scikit-learn's 8x8 handwritten digits (1,797 images, no download).

Class-disjoint split as in DML benchmarks: training on digits 0-4, retrieval on the unseen digits 5-9.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from dml_runner.datasets.base import (DatasetSplits, SubsetLabelledDataset, TensorLabelledDataset,
                                      with_validation_split)


SOURCE = "sklearn.datasets.load_digits"


class RandomShift:
    """Translate a (C, H, W) image by up to ``max_shift`` pixels with zero padding (train-time augmentation)."""

    def __init__(self, max_shift: int = 1) -> None:
        self.max_shift = max_shift

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.max_shift <= 0:
            return image
        s = self.max_shift
        padded = torch.nn.functional.pad(image, (s, s, s, s))
        dy, dx = torch.randint(0, 2 * s + 1, (2,)).tolist()
        return padded[:, dy:dy + image.shape[1], dx:dx + image.shape[2]]


class DigitFromFile:
    """An image file (PIL image) as a digits item: grey, ``size`` x ``size`` (area-resized when it is not), pixel
    values scaled to [0, 1] (a PNG written from a digit as ``round(255 * value)`` reads back within 1/510)."""

    def __init__(self, size: int = 8) -> None:
        self.size = size

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}): grey, [0, 1]"

    def __call__(self, image: Any) -> torch.Tensor:
        from PIL import Image

        grey = image.convert("L")
        if grey.size != (self.size, self.size):
            grey = grey.resize((self.size, self.size), Image.Resampling.BOX)
        return torch.from_numpy(np.asarray(grey, dtype=np.float32) / 255.0)[None]


def file_transform(**_: Any) -> tuple[DigitFromFile, int]:
    """``(transform, in_channels)`` that turns an image file into a digits model input (see :class:`DigitFromFile`)."""
    return DigitFromFile(), 1


def build(train_classes: Sequence[int] = (0, 1, 2, 3, 4), test_classes: Sequence[int] = (5, 6, 7, 8, 9),
          max_shift: int = 1, val_fraction: float = 0.0, seed: int = 0, protocol: str = "classes",
          test_fraction: float = 0.3) -> DatasetSplits:
    """Load sklearn's digits, scale pixels to [0, 1] and split them.

    ``protocol="classes"``: train on ``train_classes``, retrieve the unseen ``test_classes`` (class-disjoint, as DML
    benchmarks; ``val_fraction`` holds out training classes). ``protocol="images"``: every class in both splits, a
    fixed stratified ``test_fraction`` of the images held out for retrieval (the same test images for every seed);
    ``val_fraction`` holds out that share of each digit's training images.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)  # (N, 1, 8, 8)
    labels = bunch.target.astype(np.int64)
    if protocol == "images":
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"dataset.test_fraction={test_fraction}: give a fraction in (0, 1)")
        rng = np.random.default_rng(2019)  # fixed: every seed retrieves the same held-out images
        held = np.zeros(labels.size, dtype=bool)
        for c in np.unique(labels):
            members = np.flatnonzero(labels == c)
            held[rng.choice(members, size=max(2, round(test_fraction * members.size)), replace=False)] = True
        train_idx, test_idx = np.flatnonzero(~held), np.flatnonzero(held)
    elif protocol == "classes":
        overlap = set(train_classes) & set(test_classes)
        if overlap:
            raise ValueError(f"dataset.train_classes and dataset.test_classes overlap: {sorted(overlap)}; "
                             "a class-disjoint split needs them apart (dataset.protocol=images holds out images)")
        train_idx = np.flatnonzero(np.isin(labels, list(train_classes)))
        test_idx = np.flatnonzero(np.isin(labels, list(test_classes)))
    else:
        raise ValueError(f"dataset.protocol={protocol!r}: choose 'classes' (class-disjoint) or 'images'")
    if train_idx.size == 0 or test_idx.size == 0:
        raise ValueError("dataset.train_classes / dataset.test_classes must name digits 0-9")
    locators = np.asarray([f"{SOURCE}#{i}" for i in range(labels.size)])  # the row of load_digits()
    train = TensorLabelledDataset(images[train_idx], labels[train_idx], transform=RandomShift(max_shift),
                                  name="digits", paths=list(locators[train_idx]))
    test = TensorLabelledDataset(images[test_idx], labels[test_idx], name="digits", paths=list(locators[test_idx]))
    splits = DatasetSplits(name="digits", train=train, test=test,
                           info={"source": SOURCE, "protocol": protocol})
    if protocol == "images":
        return _image_validation_split(splits, val_fraction, seed)
    return with_validation_split(splits, val_fraction, seed)


def _image_validation_split(splits: DatasetSplits, val_fraction: float, seed: int) -> DatasetSplits:
    """protocol=images: the validation split holds out images of every digit, as the test split does."""
    if not val_fraction:
        return splits
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"dataset.val_fraction={val_fraction}: give a fraction in (0, 1)")
    labels = np.asarray(splits.train.labels)
    rng = np.random.default_rng([seed, 1])
    held = np.zeros(labels.size, dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        held[rng.choice(members, size=max(1, round(val_fraction * members.size)), replace=False)] = True
    splits.val = SubsetLabelledDataset(splits.train, np.flatnonzero(held), transform=splits.test.transform)
    splits.train = SubsetLabelledDataset(splits.train, np.flatnonzero(~held))
    splits.info["val_fraction"] = val_fraction
    return splits
