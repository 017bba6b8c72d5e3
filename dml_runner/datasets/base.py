"""Dataset contract shared by every `conf/dataset/<name>.yaml`.

A dataset config instantiates a :class:`DatasetSplits`. Its ``train`` / ``test`` / ``val`` members are
:class:`LabelledDataset` objects: map-style torch datasets returning ``(image_tensor, label)`` with a ``labels``
array so samplers can build batches without touching the images. Each also names its items: ``paths`` (the image
file, or another locator of the item's source) and ``class_names`` (label -> name), which embeddings.npz records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset


class LabelledDataset(Dataset):
    """A map-style dataset with integer class labels known up front.

    Subclasses implement :meth:`load` (item ``i`` -> image tensor, before ``transform``). ``labels`` holds the
    original class ids (not remapped), as int64. ``paths`` (one string per item: its image file, or a locator such
    as ``sklearn.datasets.load_digits#17``; ``None`` when unknown) and ``class_names`` (label -> readable name; a
    label without an entry is named by its number) describe the items in embeddings.npz.
    """

    def __init__(self, labels: np.ndarray, transform: Callable[[Any], torch.Tensor] | None = None,
                 in_channels: int = 3, name: str = "", paths: Sequence[str] | None = None,
                 class_names: Mapping[int, str] | None = None) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        if self.labels.ndim != 1:
            raise ValueError(f"labels must be 1-D, got shape {self.labels.shape}")
        if paths is not None and len(paths) != len(self.labels):
            raise ValueError(f"{len(paths)} paths but {len(self.labels)} labels")
        self.transform = transform
        self.in_channels = in_channels
        self.name = name
        self.paths: list[str] | None = None if paths is None else [str(p) for p in paths]
        self.class_names: dict[int, str] = {int(k): str(v) for k, v in (class_names or {}).items()}

    def item_paths(self) -> np.ndarray:
        """One string per item: ``paths``, or ``<name>#<index>`` when the dataset has none."""
        if self.paths is not None:
            return np.asarray(self.paths, dtype=str)
        return np.asarray([f"{self.name or 'item'}#{i}" for i in range(len(self))], dtype=str)

    def item_class_names(self) -> np.ndarray:
        """One string per item: the name of its class (``class_names``, else the label's number)."""
        classes, inverse = np.unique(self.labels, return_inverse=True)
        names = np.asarray([self.class_names.get(int(c), str(int(c))) for c in classes], dtype=str)
        return names[inverse] if len(self.labels) else np.zeros(0, dtype=str)

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> Any:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.load(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])

    @property
    def num_classes(self) -> int:
        return int(np.unique(self.labels).size)


class TensorLabelledDataset(LabelledDataset):
    """In-memory images (N, C, H, W) float tensor; the transform (if any) takes and returns a tensor."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None, name: str = "",
                 paths: Sequence[str] | None = None, class_names: Mapping[int, str] | None = None) -> None:
        if images.ndim != 4 or images.shape[0] != len(labels):
            raise ValueError(f"images must be (N, C, H, W) with N = len(labels); got {tuple(images.shape)}")
        super().__init__(labels, transform=transform, in_channels=int(images.shape[1]), name=name, paths=paths,
                         class_names=class_names)
        self.images = images

    def load(self, index: int) -> torch.Tensor:
        return self.images[index]


@dataclass
class DatasetSplits:
    """What a dataset config builds.

    ``eval_mode`` is ``"loo"`` (leave-one-out retrieval over ``test``) or ``"query_gallery"`` (``query_mask`` and
    ``gallery_mask`` are boolean arrays over ``test``). ``eval_recall_at`` is the dataset's customary Recall@K list
    (``None`` keeps the ``eval`` config's). ``info`` is recorded in results.json (counts, protocol, warnings).
    """

    name: str
    train: LabelledDataset
    test: LabelledDataset
    val: LabelledDataset | None = None
    eval_mode: str = "loo"
    query_mask: np.ndarray | None = None
    gallery_mask: np.ndarray | None = None
    eval_recall_at: list[int] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    # Protocols that average over several random query/gallery draws (VehicleID's original protocol): the test
    # metrics are the mean over these (query_mask, gallery_mask) pairs, with their std reported alongside.
    eval_draws: list[tuple[np.ndarray, np.ndarray]] | None = None

    def counts(self) -> dict[str, int]:
        out = {
            "train_images": len(self.train), "train_classes": self.train.num_classes,
            "test_images": len(self.test), "test_classes": self.test.num_classes,
        }
        if self.val is not None:
            out.update(val_images=len(self.val), val_classes=self.val.num_classes)
        if self.query_mask is not None and self.gallery_mask is not None:
            out.update(query_images=int(self.query_mask.sum()), gallery_images=int(self.gallery_mask.sum()))
        return out


def class_disjoint_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split item indices so that a ``fraction`` of the classes (chosen with ``seed``) is held out.

    Returns ``(kept_indices, held_out_indices)``; no class appears on both sides. Used for the class-disjoint
    validation split (model selection without looking at the test set).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    classes = np.unique(labels)
    # retrieval on one class measures nothing, so at least two classes are held out (and two kept)
    n_held = max(2, int(round(fraction * classes.size)))
    if n_held > classes.size - 2:
        raise ValueError(f"cannot hold out {n_held} of {classes.size} classes for validation: a class-disjoint "
                         "validation split needs at least 2 classes on each side (set dataset.val_fraction=0)")
    rng = np.random.default_rng(seed)
    held = rng.choice(classes, size=n_held, replace=False)
    is_held = np.isin(labels, held)
    return np.flatnonzero(~is_held), np.flatnonzero(is_held)


class SubsetLabelledDataset(LabelledDataset):
    """A view of ``base`` restricted to ``indices`` (labels, paths and class names kept, transform overridable)."""

    def __init__(self, base: LabelledDataset, indices: np.ndarray,
                 transform: Callable[[Any], torch.Tensor] | None | str = "inherit") -> None:
        indices = np.asarray(indices, dtype=np.int64)
        super().__init__(base.labels[indices], transform=None, in_channels=base.in_channels, name=base.name,
                         paths=None if base.paths is None else [base.paths[i] for i in indices],
                         class_names=base.class_names)
        self.base = base
        self.indices = indices
        self.transform = base.transform if transform == "inherit" else transform

    def load(self, index: int) -> Any:
        return self.base.load(int(self.indices[index]))


def with_validation_split(splits: DatasetSplits, val_fraction: float, seed: int,
                          val_transform: Callable[[Any], torch.Tensor] | None | str = "inherit") -> DatasetSplits:
    """Hold out ``val_fraction`` of the training classes as a class-disjoint validation set.

    ``val_transform`` should be the test-time transform (no augmentation); by default the test set's.
    """
    if not val_fraction:
        return splits
    kept, held = class_disjoint_holdout(splits.train.labels, val_fraction, seed)
    if val_transform == "inherit":
        val_transform = splits.test.transform
    splits.val = SubsetLabelledDataset(splits.train, held, transform=val_transform)
    splits.train = SubsetLabelledDataset(splits.train, kept)
    splits.info["val_fraction"] = val_fraction
    return splits
