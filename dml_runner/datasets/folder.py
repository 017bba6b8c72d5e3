"""Bring your own data: images in class folders, with a class-disjoint train/test split.

Layouts (docs/DATASETS.md):

- ``root/<class_name>/<image>``: the classes are split in two, seeded: the sorted class names shuffled with
  ``split_seed``, the first half trains and the rest tests (``split_seed: null``: the first half of the sorted names
  trains), or the training classes are those listed in ``split_file`` (one per line, ``#`` comments allowed; a
  relative path is read from ``root``);
- ``root/train/<class_name>/<image>`` and ``root/test/<class_name>/<image>``: the folders are the split.

Labels are the positions of the class names in sorted order. Evaluation: leave-one-out Recall@K over the test
classes. Before a run, :mod:`dml_runner.datasets.fit` reads :func:`training_images` to fit the image size and the
batch to the data (``fit``, ``image_size``; what it chose arrives as ``fitted`` and is recorded in results.json).
:data:`SPEC` declares it to the registry.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dml_runner import DMLRunnerError
from dml_runner.datasets.base import DatasetSplits
from dml_runner.datasets.images import (FIXTURE_SIZE, IMAGE_EXTENSIONS, build_class_split, require_dir, require_file,
                                       write_jpeg)
from dml_runner.datasets.spec import DatasetSpec, TreeSize

log = logging.getLogger(__name__)

NAME = "folder"
FIXTURE_DIR = "my_images"
SPLIT_DIRS = ("train", "test")


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


@dataclass
class FolderSplit:
    """The images of a folder tree, split by class: paths and labels of each side, every class name, and the
    sentence that states the split."""

    train_paths: list[str]
    train_labels: np.ndarray
    test_paths: list[str]
    test_labels: np.ndarray
    class_names: list[str]
    split: str
    train_classes: list[str] = field(default_factory=list)


def has_split_dirs(base: Path) -> bool:
    """``root/train/`` and ``root/test/`` both exist: the folders split the classes."""
    return all((base / name).is_dir() for name in SPLIT_DIRS)


def split_tree(root: str, split_file: str | None = None, split_seed: int | None = None) -> FolderSplit:
    """Read the tree under ``root`` and split it by class (see the module's layouts)."""
    base = require_dir(root, SPEC)
    if has_split_dirs(base):
        if split_file:
            raise DMLRunnerError(f"dataset.split_file={split_file}: {base} holds train/ and test/ folders, which "
                                 "already split the classes; leave dataset.split_file unset (null)")
        sides = {name: scan_tree(base / name) for name in SPLIT_DIRS}
        class_names = sorted(set(sides["train"][0]) | set(sides["test"][0]))
        index = {n: i for i, n in enumerate(class_names)}
        out = {}
        for name, (names, paths, labels) in sides.items():
            if not names:
                raise DMLRunnerError(f"dataset folder: {base / name} holds no <class>/ sub-directory with images "
                                     f"({', '.join(IMAGE_EXTENSIONS)})")
            out[name] = (paths, np.array([index[names[i]] for i in labels], dtype=np.int64))
        shared = set(sides["train"][0]) & set(sides["test"][0])
        split = (f"the folders {base / 'train'} ({len(sides['train'][0])} classes) and {base / 'test'} "
                 f"({len(sides['test'][0])} classes)" + (f"; {len(shared)} class names in both" if shared else ""))
        return FolderSplit(*out["train"], *out["test"], class_names, split, sorted(sides["train"][0]))
    class_names, paths, labels = scan_tree(base)
    if len(class_names) < 2:
        raise DMLRunnerError(f"dataset folder: {base} must contain at least two <class>/ sub-directories with images "
                             f"({', '.join(IMAGE_EXTENSIONS)}), or train/ and test/ folders of them; found "
                             f"{len(class_names)}")
    if split_file:
        split_path = Path(split_file).expanduser()
        split_path = split_path if split_path.is_absolute() else base / split_path
        train_names = read_split_file(require_file(split_path, SPEC, base), class_names)
        if not train_names or len(train_names) == len(class_names):
            raise DMLRunnerError(f"{split_path}: must list some but not all of the {len(class_names)} classes")
        split = (f"the {len(train_names)} training classes listed in {split_path}, the other "
                 f"{len(class_names) - len(train_names)} test")
    elif split_seed is None:
        train_names = set(class_names[: len(class_names) // 2])
        split = (f"the first half of the sorted class names trains ({len(train_names)} classes), the rest test "
                 f"({len(class_names) - len(train_names)}; dataset.split_seed=null)")
    else:
        order = np.random.default_rng(int(split_seed)).permutation(len(class_names))
        train_names = {class_names[i] for i in order[: len(class_names) // 2]}
        split = (f"classes shuffled with dataset.split_seed={split_seed}: {len(train_names)} train, "
                 f"{len(class_names) - len(train_names)} test")
    is_train = np.isin(labels, [i for i, n in enumerate(class_names) if n in train_names])
    train_idx, test_idx = np.flatnonzero(is_train), np.flatnonzero(~is_train)
    return FolderSplit([paths[i] for i in train_idx], labels[train_idx], [paths[i] for i in test_idx],
                       labels[test_idx], class_names, split, sorted(train_names))


def training_images(root: str, split_file: str | None = None, split_seed: int | None = None,
                    **_: Any) -> tuple[list[str], np.ndarray]:
    """The training split's image paths and labels, as :func:`build` reads them (what the fit measures)."""
    tree = split_tree(root, split_file, split_seed)
    return tree.train_paths, tree.train_labels


def build(root: str, split_file: str | None = None, split_seed: int | None = None,
          recall_at: list[int] | tuple[int, ...] = (1, 2, 4, 8), transform: Any = None,
          default_transform: str = "rrc_224", image_size: int | None = None, fit: bool = True,
          fitted: dict[str, Any] | None = None, val_fraction: float = 0.0, seed: int = 0,
          skip_bad_images: bool = False, verify_images: bool = False) -> DatasetSplits:
    """A class-per-directory tree split by class (seeded halves, ``split_file`` or train/ + test/ folders).

    ``split_seed``: conf/dataset/folder.yaml gives 0; the builder's own default (None, the sorted halves) is the split
    of runs whose config.json predates the key, so dml-eval and dml-embed rebuild their test split unchanged.
    ``image_size``: the side of the default transform's crop (null: ``rrc_224``'s 224); ``fit`` and ``fitted`` are
    :mod:`dml_runner.datasets.fit`'s (``fitted``, what it chose, is recorded in ``info["fit"]``).
    """
    tree = split_tree(root, split_file, split_seed)
    base = Path(root).expanduser()
    log.info("dataset folder: class split: %s", tree.split)
    names = tree.class_names
    info: dict[str, Any] = {"root": str(base), "split": tree.split,
                            "class_names": names if len(names) <= 200 else None,
                            "train_class_names": tree.train_classes if len(tree.train_classes) <= 200 else None}
    if fitted:
        info["fit"] = dict(fitted)
    return build_class_split(
        NAME, tree.train_paths, tree.train_labels, tree.test_paths, tree.test_labels, None, transform=transform,
        default_transform=default_transform, val_fraction=val_fraction, seed=seed, skip_bad_images=skip_bad_images,
        verify_images=verify_images, eval_recall_at=list(recall_at), info=info, class_names=dict(enumerate(names)),
        image_size=image_size)


def listed_images(root: Path) -> list[str]:
    """Every image of the tree's class directories (of train/ and test/ where the tree has them)."""
    root = Path(root)
    if has_split_dirs(root):
        return [p for name in SPLIT_DIRS for p in scan_tree(root / name)[1]]
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
    """Fixture of ``size``: the training and test classes in one tree (split in halves by dataset.split_seed)."""
    return make_folder(parent, n_classes=size.train_classes + size.test_classes, per_class=size.per_class,
                       size=image_size)


SPEC = DatasetSpec(
    name=NAME, title="your own images", url="(your own images: nothing to download)", dir="<any>",
    layout="<root>/<class_name>/<image>.{jpg,png,...} (optionally a split file listing the train classes), or "
           "<root>/train/<class_name>/<image> + <root>/test/<class_name>/<image>",
    build=build, listed_images=listed_images, own_images=True,
    make_fixture=make_folder, fixture_tree=fixture_tree, fixture_dir=FIXTURE_DIR)
