"""Bring your own data: a ``root/<class_name>/<image>`` tree with a class-disjoint train/test split.

The training classes are the first half of the sorted class names, or the names listed in ``split_file`` (one per
line, ``#`` comments allowed; a relative path is read from ``root``); every other class is a test class. Labels
are the positions of the class names in sorted order. Evaluation: leave-one-out Recall@K over the test classes.
:data:`SPEC` declares it to the registry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dml_runner import DMLRunnerError
from dml_runner.datasets.base import DatasetSplits
from dml_runner.datasets.images import (FIXTURE_SIZE, IMAGE_EXTENSIONS, build_class_split, require_dir, require_file,
                                       write_jpeg)
from dml_runner.datasets.spec import DatasetSpec, TreeSize

NAME = "folder"
FIXTURE_DIR = "my_images"


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
    base = require_dir(root, SPEC)
    class_names, paths, labels = scan_tree(base)
    if len(class_names) < 2:
        raise DMLRunnerError(f"dataset folder: {base} must contain at least two <class>/ sub-directories with images "
                             f"({', '.join(IMAGE_EXTENSIONS)}); found {len(class_names)}")
    if split_file:
        split_path = Path(split_file).expanduser()
        split_path = split_path if split_path.is_absolute() else base / split_path
        train_names = read_split_file(require_file(split_path, SPEC, base), class_names)
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


def listed_images(root: Path) -> list[str]:
    """Every image of the tree's class directories."""
    return scan_tree(root)[1]


def make_folder(parent: Path, n_classes: int = 6, per_class: int = 3, size: tuple[int, int] = FIXTURE_SIZE,
                name: str = FIXTURE_DIR) -> Path:
    """Fixture: <name>/<class_XX>/<k>.jpg (and one .png)."""
    root = Path(parent) / name
    for c in range(n_classes):
        for k in range(per_class):
            path = write_jpeg(root / f"class_{c:02d}" / f"{k}.jpg", c + 1, k, size)
            if k == 0 and c == 0:
                Image.open(path).save(path.with_suffix(".png"))
                path.unlink()
    return root


def fixture_tree(parent: Path, size: TreeSize, image_size: tuple[int, int] = FIXTURE_SIZE) -> Path:
    """Fixture of ``size``: the training and test classes in one tree (the first half trains)."""
    return make_folder(parent, n_classes=size.train_classes + size.test_classes, per_class=size.per_class,
                       size=image_size)


SPEC = DatasetSpec(
    name=NAME, title="your own images", url="(your own images: nothing to download)", dir="<any>",
    layout="<root>/<class_name>/<image>.{jpg,png,...} (optionally a split file listing the train classes)",
    build=build, listed_images=listed_images, own_images=True,
    make_fixture=make_folder, fixture_tree=fixture_tree, fixture_dir=FIXTURE_DIR)
