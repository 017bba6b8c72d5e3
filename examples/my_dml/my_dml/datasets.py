"""Images listed in a CSV file: one row ``path,class,split`` per image (``split`` is ``train`` or ``test``).

Relative paths are read from the CSV file's folder. Classes are named by any string; labels are their positions in
sorted order. Train and test classes must be disjoint (the DML protocol); evaluation is leave-one-out Recall@K over
the test images.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from dml_runner import DMLRunnerError
from dml_runner.datasets.base import DatasetSplits
from dml_runner.datasets.images import build_class_split

NAME = "csv_list"


def read_list(csv_path: Path) -> tuple[list[str], list[str], list[str]]:
    """``(paths, class_names, splits)`` per row, paths made absolute."""
    paths, classes, splits = [], [], []
    with open(csv_path, newline="", encoding="utf-8") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            if not row or row[0].startswith("#") or (lineno == 1 and row[0] == "path"):
                continue
            if len(row) != 3 or row[2] not in ("train", "test"):
                raise DMLRunnerError(f"{csv_path}:{lineno}: expected 'path,class,train|test', got {','.join(row)!r}")
            path = Path(row[0]).expanduser()
            paths.append(str(path if path.is_absolute() else csv_path.parent / path))
            classes.append(row[1])
            splits.append(row[2])
    return paths, classes, splits


def build(csv_file: str, transform: Any = None, default_transform: str = "rrc_224", val_fraction: float = 0.0,
          seed: int = 0, recall_at: list[int] | tuple[int, ...] = (1, 2, 4, 8),
          skip_bad_images: bool = False) -> DatasetSplits:
    csv_path = Path(csv_file).expanduser()
    if not csv_path.is_file():
        raise DMLRunnerError(f"dataset.csv_file={csv_path}: no such file; write one row 'path,class,train|test' per image")
    paths, classes, splits = read_list(csv_path)
    names = sorted(set(classes))
    labels = np.array([names.index(c) for c in classes], dtype=np.int64)
    is_train = np.array([s == "train" for s in splits])
    overlap = set(labels[is_train]) & set(labels[~is_train])
    if overlap:
        raise DMLRunnerError(f"{csv_path}: classes {sorted(names[i] for i in overlap)[:5]} are in both train and test; "
                             f"a metric-learning split is class-disjoint")
    if is_train.all() or not is_train.any():
        raise DMLRunnerError(f"{csv_path}: needs rows of both splits (train and test)")
    train_idx, test_idx = np.flatnonzero(is_train), np.flatnonzero(~is_train)
    return build_class_split(
        NAME, [paths[i] for i in train_idx], labels[train_idx], [paths[i] for i in test_idx], labels[test_idx],
        None, transform=transform, default_transform=default_transform, val_fraction=val_fraction, seed=seed,
        skip_bad_images=skip_bad_images, verify_images=False, eval_recall_at=list(recall_at),
        info={"csv_file": str(csv_path), "class_names": names if len(names) <= 200 else None})
