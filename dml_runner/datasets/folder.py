"""Bring your own data: a ``root/<class_name>/<image>`` tree with a class-disjoint train/test split.

The training classes are the first half of the sorted class names, or the names listed in ``split_file`` (one per
line, ``#`` comments allowed; a relative path is read from ``root``); every other class is a test class. Labels
are the positions of the class names in sorted order. Evaluation: leave-one-out Recall@K over the test classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dml_runner import DMLRunnerError
from dml_runner.datasets.base import DatasetSplits
from dml_runner.datasets.images import IMAGE_EXTENSIONS, build_class_split, require_dir, require_file

NAME = "folder"


def scan_tree(root: Path) -> tuple[list[str], list[str], np.ndarray]:
    """``(class_names, paths, labels)``: sorted non-hidden sub-directories holding at least one image file."""
    class_names, paths, labels = [], [], []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in class_dir.iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
        if not files:
            continue
        label = len(class_names)
        class_names.append(class_dir.name)
        paths += [str(p) for p in files]
        labels += [label] * len(files)
    return class_names, paths, np.array(labels, dtype=np.int64)


def read_split_file(path: Path, class_names: list[str]) -> set[str]:
    known, train = set(class_names), set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            name = line.split("#", 1)[0].strip()
            if not name:
                continue
            if name not in known:
                raise DMLRunnerError(f"{path}:{lineno}: class {name!r} is not a sub-directory with images of the "
                                     f"dataset root")
            train.add(name)
    return train


def build(root: str, split_file: str | None = None, recall_at: list[int] | tuple[int, ...] = (1, 2, 4, 8),
          transform: Any = None, default_transform: str = "rrc_224", val_fraction: float = 0.0, seed: int = 0,
          skip_bad_images: bool = False, verify_images: bool = False) -> DatasetSplits:
    """A class-per-directory tree split by class (first half sorted, or ``split_file``)."""
    base = require_dir(root, NAME)
    class_names, paths, labels = scan_tree(base)
    if len(class_names) < 2:
        raise DMLRunnerError(f"dataset folder: {base} must contain at least two <class>/ sub-directories with images "
                             f"({', '.join(IMAGE_EXTENSIONS)}); found {len(class_names)}")
    if split_file:
        split_path = Path(split_file).expanduser()
        split_path = split_path if split_path.is_absolute() else base / split_path
        train_names = read_split_file(require_file(split_path, NAME, base), class_names)
        if not train_names or len(train_names) == len(class_names):
            raise DMLRunnerError(f"{split_path}: must list some but not all of the {len(class_names)} classes")
        split = f"train classes from {split_path}"
    else:
        train_names = set(class_names[: len(class_names) // 2])
        split = "first half of the sorted class names train, the rest test"
    is_train = np.isin(labels, [i for i, n in enumerate(class_names) if n in train_names])
    train_idx, test_idx = np.flatnonzero(is_train), np.flatnonzero(~is_train)
    return build_class_split(
        NAME, [paths[i] for i in train_idx], labels[train_idx], [paths[i] for i in test_idx], labels[test_idx],
        None, transform=transform, default_transform=default_transform, val_fraction=val_fraction, seed=seed,
        skip_bad_images=skip_bad_images, verify_images=verify_images, eval_recall_at=list(recall_at),
        info={"root": str(base), "split": split, "class_names": class_names if len(class_names) <= 200 else None},
        class_names=dict(enumerate(class_names)))
