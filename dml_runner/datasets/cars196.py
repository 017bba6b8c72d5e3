"""Stanford Cars (Cars196) with the standard DML split: classes 1-98 train, 99-196 test.

Layout (``root``): ``cars_annos.mat`` (variable ``annotations``: one struct per image with ``relative_im_path``
e.g. ``car_ims/000001.jpg``, ``bbox_x1``, ``bbox_y1``, ``bbox_x2``, ``bbox_y2``, ``class``, ``test``) and
``car_ims/``. The ``test`` flag (the classification split) is NOT used; bounding boxes are not used either (the
papers train on full images). Official counts: 16,185 images; train 8,054 / 98 classes, test 8,131 / 98.
:data:`SPEC` declares it to the registry.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dml_runner import DMLRunnerError
from dml_runner.datasets.base import DatasetSplits
from dml_runner.datasets.images import (FIXTURE_SIZE, build_class_split, require_dir, require_file, split_at_class,
                                       write_jpeg)
from dml_runner.datasets.spec import DatasetSpec, TreeSize, Variant

NAME = "cars196"
OFFICIAL_COUNTS = {"train_images": 8054, "train_classes": 98, "test_images": 8131, "test_classes": 98}
NUM_CLASSES = 196
FIRST_TEST_CLASS = 99
RECALL_AT = [1, 2, 4, 8]


def _scalar(value: Any) -> Any:
    flat = np.asarray(value).ravel()
    if flat.size != 1:
        raise ValueError(f"expected one value, got {flat.size}")
    return flat[0]


def read_cars_annos(root: Path) -> tuple[list[str], np.ndarray]:
    """All annotated images (absolute paths) and class ids (1..196), in annotation order."""
    paths, labels, _ = read_cars_mat(root)
    return paths, labels


def read_cars_mat(root: Path) -> tuple[list[str], np.ndarray, dict[int, str]]:
    """:func:`read_cars_annos` plus the class names (class id -> "AM General Hummer SUV 2000") of the file's
    ``class_names`` variable (empty when the file has none)."""
    import scipy.io

    mat_path = require_file(root / "cars_annos.mat", SPEC, root)
    try:
        mat = scipy.io.loadmat(str(mat_path))
    except Exception as err:
        raise DMLRunnerError(f"{mat_path}: not a readable MATLAB file ({err}); re-download cars_annos.mat") from err
    if "annotations" not in mat:
        raise DMLRunnerError(f"{mat_path}: no variable 'annotations' (found {sorted(k for k in mat if not k.startswith('__'))})")
    annos = np.asarray(mat["annotations"]).ravel()
    names = annos.dtype.names or ()
    missing = {"relative_im_path", "class"} - set(names)
    if missing:
        raise DMLRunnerError(f"{mat_path}: 'annotations' lacks field(s) {sorted(missing)} (has {list(names)})")
    paths, labels = [], np.empty(len(annos), dtype=np.int64)
    for i, entry in enumerate(annos):
        try:
            rel = str(_scalar(entry["relative_im_path"]))
            label = int(_scalar(entry["class"]))
        except (ValueError, TypeError, IndexError) as err:
            raise DMLRunnerError(f"{mat_path}: annotations entry {i + 1} is malformed: {err}") from None
        if not 1 <= label <= NUM_CLASSES:
            raise DMLRunnerError(f"{mat_path}: annotations entry {i + 1} ({rel}) has class {label}, "
                                 f"outside 1..{NUM_CLASSES}")
        paths.append(str(root / rel))
        labels[i] = label
    names = np.asarray(mat.get("class_names", np.zeros(0))).ravel()
    class_names = {c: str(_scalar(names[c - 1])) for c in range(1, NUM_CLASSES + 1)} if names.size == NUM_CLASSES \
        else {}
    return paths, labels, class_names


def build(root: str, transform: Any = None, default_transform: str = "caffe_227", val_fraction: float = 0.0,
          seed: int = 0, skip_bad_images: bool = False, verify_images: bool = False) -> DatasetSplits:
    """Cars196: train on classes 1-98, leave-one-out retrieval on 99-196 (Recall@1/2/4/8)."""
    base = require_dir(root, SPEC)
    paths, labels, class_names = read_cars_mat(base)
    return build_class_split(
        NAME, *split_at_class(paths, labels, FIRST_TEST_CLASS), OFFICIAL_COUNTS, transform=transform,
        default_transform=default_transform, val_fraction=val_fraction,
        seed=seed, skip_bad_images=skip_bad_images, verify_images=verify_images, eval_recall_at=RECALL_AT,
        info={"root": str(base), "split": "classes 1-98 train / 99-196 test (the 'test' flag is not used)"},
        class_names=class_names)


def listed_images(root: Path) -> list[str]:
    """Every image cars_annos.mat annotates."""
    return read_cars_annos(root)[0]


def write_cars_annos(path: Path, entries: Sequence[tuple[str, int, int]]) -> None:
    """Fixture: cars_annos.mat in the official struct layout; ``entries`` = (relative_im_path, class, test)."""
    import scipy.io

    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    annos = np.zeros((1, len(entries)), dtype=[(f, "O") for f in fields])
    for i, (rel, label, test) in enumerate(entries):
        annos[0, i]["relative_im_path"] = np.array([rel])
        for name, value in zip(fields[1:5], (1, 2, 30, 25)):
            annos[0, i][name] = np.array([[value]], dtype=np.uint16)
        annos[0, i]["class"] = np.array([[label]], dtype=np.uint8)
        annos[0, i]["test"] = np.array([[test]], dtype=np.uint8)
    class_names = np.empty((1, NUM_CLASSES), dtype=object)
    class_names[0, :] = [f"Make Model {c}" for c in range(1, NUM_CLASSES + 1)]
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(path), {"annotations": annos, "class_names": class_names})


def make_cars196(parent: Path, classes: Iterable[int] = (1, 2, 3, 99, 100, 101), per_class: int = 3,
                 size: tuple[int, int] = FIXTURE_SIZE) -> Path:
    """Fixture: cars196/{cars_annos.mat, car_ims/NNNNNN.jpg}; the 'test' flag alternates (it must be ignored)."""
    root = Path(parent) / SPEC.dir
    entries = []
    for c in classes:
        for k in range(per_class):
            rel = f"car_ims/{len(entries) + 1:06d}.jpg"
            write_jpeg(root / rel, c, k, size)
            entries.append((rel, c, len(entries) % 2))
    write_cars_annos(root / "cars_annos.mat", entries)
    return root


def fixture_tree(parent: Path, size: TreeSize, image_size: tuple[int, int] = FIXTURE_SIZE) -> Path:
    """Fixture of ``size``: training classes from 1, test classes from 99."""
    return make_cars196(parent, size.class_numbers(NAME, FIRST_TEST_CLASS), size.per_class, image_size)


SPEC = DatasetSpec(
    name=NAME, title="Stanford Cars (Cars196)",
    url="https://ai.stanford.edu/~jkrause/cars/car_dataset.html (car_ims.tgz + cars_annos.mat; "
        "mirrors exist on Kaggle since the original host went offline)",
    dir="cars196", layout="cars196/{cars_annos.mat, car_ims/000001.jpg ...}",
    build=build, listed_images=listed_images, variants=(Variant(official_counts=OFFICIAL_COUNTS),),
    make_fixture=make_cars196, fixture_tree=fixture_tree)
