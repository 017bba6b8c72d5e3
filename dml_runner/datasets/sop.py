"""Stanford Online Products with the official class-disjoint split files.

Layout (``root`` = ``Stanford_Online_Products/``): ``Ebay_train.txt`` and ``Ebay_test.txt``, a header line then
"image_id class_id super_class_id path" (path relative to ``root``). Official counts: train 59,551 images /
11,318 classes, test 60,502 / 11,316. :data:`SPEC` declares it to the registry.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from dml_runner import DMLRunnerError
from dml_runner.datasets.base import DatasetSplits
from dml_runner.datasets.images import (FIXTURE_SIZE, build_class_split, class_names_from_dirs, parse_int, read_rows,
                                       require_dir, require_file, write_jpeg)
from dml_runner.datasets.spec import Archive, DatasetSpec, TreeSize, Variant

NAME = "sop"
OFFICIAL_COUNTS = {"train_images": 59551, "train_classes": 11318, "test_images": 60502, "test_classes": 11316}
RECALL_AT = [1, 10, 100, 1000]
HEADER = ["image_id", "class_id", "super_class_id", "path"]


def read_ebay_list(root: Path, filename: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(paths, class_ids, super_class_ids)`` of ``Ebay_train.txt`` / ``Ebay_test.txt``."""
    path = require_file(root / filename, SPEC, root)
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
    base = require_dir(root, SPEC)
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


def listed_images(root: Path) -> list[str]:
    """Every image Ebay_train.txt and Ebay_test.txt list."""
    return read_ebay_list(root, "Ebay_train.txt")[0] + read_ebay_list(root, "Ebay_test.txt")[0]


def make_sop(parent: Path, train_classes: Iterable[int] = (1, 2, 3, 4), test_classes: Iterable[int] = (11, 12, 13),
             per_class: int = 2, size: tuple[int, int] = FIXTURE_SIZE) -> Path:
    """Fixture: Stanford_Online_Products/{Ebay_train.txt, Ebay_test.txt, <super>_final/<product>_<k>.JPG}."""
    root = Path(parent) / SPEC.dir
    supers = ["bicycle", "cabinet", "chair"]
    image_id = 0
    for filename, classes in (("Ebay_train.txt", train_classes), ("Ebay_test.txt", test_classes)):
        lines = [" ".join(HEADER)]
        for c in classes:
            super_id = c % len(supers) + 1
            for k in range(per_class):
                image_id += 1
                rel = f"{supers[super_id - 1]}_final/{1000 + c}_{k}.JPG"
                write_jpeg(root / rel, c, k, size)
                lines.append(f"{image_id} {c} {super_id} {rel}")
        (root / filename).write_text("\n".join(lines) + "\n")
    return root


def fixture_tree(parent: Path, size: TreeSize, image_size: tuple[int, int] = FIXTURE_SIZE) -> Path:
    """Fixture of ``size``: training classes from 1, test classes from 1001."""
    return make_sop(parent, range(1, size.train_classes + 1), range(1001, 1001 + size.test_classes), size.per_class,
                    image_size)


SPEC = DatasetSpec(
    name=NAME, title="Stanford Online Products",
    url="https://cvgl.stanford.edu/projects/lifted_struct/ (Stanford_Online_Products.zip)",
    dir="Stanford_Online_Products",
    layout="Stanford_Online_Products/{Ebay_train.txt, Ebay_test.txt, bicycle_final/..., ...}",
    build=build, listed_images=listed_images, variants=(Variant(official_counts=OFFICIAL_COUNTS),),
    archive=Archive(url="ftp://cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip",
                    file="Stanford_Online_Products.zip", md5="7f73d41a2f44250d4779881525aea32e",
                    top="Stanford_Online_Products"),
    make_fixture=make_sop, fixture_tree=fixture_tree)
