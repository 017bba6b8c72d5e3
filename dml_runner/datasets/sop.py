"""Stanford Online Products with the official class-disjoint split files.

Layout (``root`` = ``Stanford_Online_Products/``): ``Ebay_train.txt`` and ``Ebay_test.txt``, a header line then
"image_id class_id super_class_id path" (path relative to ``root``). Official counts: train 59,551 images /
11,318 classes, test 60,502 / 11,316.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dml_runner import DMLRunnerError
from dml_runner.datasets.base import DatasetSplits
from dml_runner.datasets.images import (build_class_split, class_names_from_dirs, parse_int, read_rows, require_dir,
                                       require_file)

NAME = "sop"
OFFICIAL_COUNTS = {"train_images": 59551, "train_classes": 11318, "test_images": 60502, "test_classes": 11316}
RECALL_AT = [1, 10, 100, 1000]
HEADER = ["image_id", "class_id", "super_class_id", "path"]


def read_ebay_list(root: Path, filename: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(paths, class_ids, super_class_ids)`` of ``Ebay_train.txt`` / ``Ebay_test.txt``."""
    path = require_file(root / filename, NAME, root)
    with open(path, encoding="utf-8") as f:
        header = f.readline().split()
    if header != HEADER:
        raise DMLRunnerError(f"{path}:1: expected the header {' '.join(HEADER)!r}, got {' '.join(header)!r}")
    paths, classes, supers = [], [], []
    for lineno, (image_id, class_id, super_id, rel) in read_rows(path, 4, skip=1, last_field_rest=True):
        parse_int(image_id, path, lineno, "image_id")
        classes.append(parse_int(class_id, path, lineno, "class_id"))
        supers.append(parse_int(super_id, path, lineno, "super_class_id"))
        paths.append(str(root / rel))
    return paths, np.array(classes, dtype=np.int64), np.array(supers, dtype=np.int64)


def build(root: str, transform: Any = None, default_transform: str = "caffe_227", val_fraction: float = 0.0,
          seed: int = 0, skip_bad_images: bool = False, verify_images: bool = False) -> DatasetSplits:
    """SOP: Ebay_train.txt for training, leave-one-out retrieval on Ebay_test.txt (Recall@1/10/100/1000)."""
    base = require_dir(root, NAME)
    train_paths, train_labels, _ = read_ebay_list(base, "Ebay_train.txt")
    test_paths, test_labels, _ = read_ebay_list(base, "Ebay_test.txt")
    shared = np.intersect1d(train_labels, test_labels)
    if shared.size:
        raise DMLRunnerError(f"{base}: Ebay_train.txt and Ebay_test.txt share {shared.size} class id(s), e.g. "
                             f"{int(shared[0])}; the official split is class-disjoint")
    return build_class_split(
        NAME, train_paths, train_labels, test_paths, test_labels, OFFICIAL_COUNTS, transform=transform,
        default_transform=default_transform, val_fraction=val_fraction, seed=seed, skip_bad_images=skip_bad_images,
        verify_images=verify_images, eval_recall_at=RECALL_AT,
        info={"root": str(base), "split": "Ebay_train.txt / Ebay_test.txt"},
        class_names=class_names_from_dirs(train_paths + test_paths, np.concatenate([train_labels, test_labels]),
                                          "{dir}/{label}"))
