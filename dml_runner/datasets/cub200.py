"""Caltech-UCSD Birds-200-2011 with the standard DML split: classes 1-100 train, 101-200 test.

Layout (``root`` = ``CUB_200_2011/``): ``images.txt`` ("<image_id> <relative_path>"), ``image_class_labels.txt``
("<image_id> <class_id>", 1..200) and ``images/<relative_path>``. ``train_test_split.txt`` (the classification
split) is NOT used. Official counts: train 5,864 images / 100 classes, test 5,924 / 100. :data:`SPEC` declares it
to the registry.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from dml_runner import DMLRunnerError
from dml_runner.datasets.base import DatasetSplits
from dml_runner.datasets.images import (FIXTURE_SIZE, build_class_split, class_names_from_dirs, parse_int, read_rows,
                                       require_dir, require_file, split_at_class, write_jpeg)
from dml_runner.datasets.spec import Archive, DatasetSpec, TreeSize, Variant

NAME = "cub200"
OFFICIAL_COUNTS = {"train_images": 5864, "train_classes": 100, "test_images": 5924, "test_classes": 100}
NUM_CLASSES = 200
FIRST_TEST_CLASS = 101
RECALL_AT = [1, 2, 4, 8]


def read_cub(root: Path) -> tuple[list[str], np.ndarray]:
    """All listed images (absolute paths) and their class ids (1..200), in images.txt order."""
    images_txt = require_file(root / "images.txt", SPEC, root)
    labels_txt = require_file(root / "image_class_labels.txt", SPEC, root)
    paths: dict[int, str] = {}
    for lineno, (image_id, rel) in read_rows(images_txt, 2, last_field_rest=True):
        key = parse_int(image_id, images_txt, lineno, "image_id")
        if key in paths:
            raise DMLRunnerError(f"{images_txt}:{lineno}: image_id {key} listed twice")
        paths[key] = str(root / "images" / rel)
    classes: dict[int, int] = {}
    for lineno, (image_id, class_id) in read_rows(labels_txt, 2):
        key = parse_int(image_id, labels_txt, lineno, "image_id")
        label = parse_int(class_id, labels_txt, lineno, "class_id")
        if not 1 <= label <= NUM_CLASSES:
            raise DMLRunnerError(f"{labels_txt}:{lineno}: class_id {label} is outside 1..{NUM_CLASSES}")
        if key not in paths:
            raise DMLRunnerError(f"{labels_txt}:{lineno}: image_id {key} is not in {images_txt}")
        classes[key] = label
    unlabelled = sorted(set(paths) - set(classes))
    if unlabelled:
        raise DMLRunnerError(f"{labels_txt}: no class for {len(unlabelled)} image id(s) of {images_txt}, "
                             f"e.g. {unlabelled[0]}")
    ids = list(paths)  # images.txt order
    return [paths[i] for i in ids], np.array([classes[i] for i in ids], dtype=np.int64)


def build(root: str, transform: Any = None, default_transform: str = "caffe_227", val_fraction: float = 0.0,
          seed: int = 0, skip_bad_images: bool = False, verify_images: bool = False) -> DatasetSplits:
    """CUB-200-2011: train on classes 1-100, leave-one-out retrieval on 101-200 (Recall@1/2/4/8)."""
    base = require_dir(root, SPEC)
    paths, labels = read_cub(base)
    return build_class_split(
        NAME, *split_at_class(paths, labels, FIRST_TEST_CLASS), OFFICIAL_COUNTS, transform=transform,
        default_transform=default_transform, val_fraction=val_fraction,
        seed=seed, skip_bad_images=skip_bad_images, verify_images=verify_images, eval_recall_at=RECALL_AT,
        info={"root": str(base), "split": "classes 1-100 train / 101-200 test (train_test_split.txt not used)"},
        class_names=class_names_from_dirs(paths, labels))


def listed_images(root: Path) -> list[str]:
    """Every image images.txt lists."""
    return read_cub(root)[0]


def make_cub200(parent: Path, classes: Iterable[int] = (1, 2, 3, 101, 102, 103), per_class: int = 3,
                size: tuple[int, int] = FIXTURE_SIZE) -> Path:
    """Fixture: CUB_200_2011/{images.txt, image_class_labels.txt, train_test_split.txt, images/NNN.Name/*.jpg}."""
    root = Path(parent) / SPEC.dir
    images, labels, split = [], [], []
    image_id = 0
    for c in classes:
        for k in range(per_class):
            image_id += 1
            rel = f"{c:03d}.Bird_{c}/Bird_{c}_{k:04d}_{image_id}.jpg"
            write_jpeg(root / "images" / rel, c, k, size)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c}")
            split.append(f"{image_id} {k % 2}")  # the classification split: present but NOT used
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(split) + "\n")
    return root


def fixture_tree(parent: Path, size: TreeSize, image_size: tuple[int, int] = FIXTURE_SIZE) -> Path:
    """Fixture of ``size``: training classes from 1, test classes from 101."""
    return make_cub200(parent, size.class_numbers(NAME, FIRST_TEST_CLASS), size.per_class, image_size)


SPEC = DatasetSpec(
    name=NAME, title="Caltech-UCSD Birds-200-2011",
    url="https://www.vision.caltech.edu/datasets/cub_200_2011/ (CUB_200_2011.tgz, also on data.caltech.edu)",
    dir="CUB_200_2011",
    layout="CUB_200_2011/{images.txt, image_class_labels.txt, images/<class_dir>/<image>.jpg}",
    build=build, listed_images=listed_images, variants=(Variant(official_counts=OFFICIAL_COUNTS),),
    archive=Archive(url="https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1",
                    file="CUB_200_2011.tgz", md5="97eceeb196236b17998738112f37df78", top="CUB_200_2011"),
    make_fixture=make_cub200, fixture_tree=fixture_tree)
