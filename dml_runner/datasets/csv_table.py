"""Bring your own data as a table: one CSV row per image, in open-metric-learning's dataframe convention.

Columns (docs/DATASETS.md):

- ``path``: the image file; a relative path is read from ``root`` (by default the CSV file's folder);
- ``label``: the item's class (an integer or any name); labels are the positions of the sorted class names;
- ``split``: ``train`` or ``validation`` (the test split);
- optional ``is_query`` / ``is_gallery`` (``1``/``0``, ``true``/``false``; empty on training rows): the validation
  rows are evaluated query -> gallery (a row may be both: it is then never its own neighbour); without these columns,
  leave-one-out over the validation rows;
- optional ``x_1``, ``x_2``, ``y_1``, ``y_2``: a bounding box (left, right, top, bottom in pixels) the image is cropped
  to; empty cells: the whole image.

The file is ``file`` (absolute, or relative to ``root``), or the only ``*.csv`` in ``root``. Before a run,
:mod:`dml_runner.datasets.fit` fits the image size and batch (``fit``, ``image_size``, ``fitted``) as for
``dataset=folder``. :data:`SPEC` declares it to the registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dml_runner import DMLRunnerError
from dml_runner.datasets.base import DatasetSplits
from dml_runner.datasets.images import (FIXTURE_SIZE, ImageListDataset, assemble, basic_counts, drop_bad_images,
                                       require_dir, write_jpeg)
from dml_runner.datasets.spec import DatasetSpec, TreeSize

NAME = "csv"
FIXTURE_DIR = "my_table"
FIXTURE_FILE = "df.csv"
REQUIRED = ("path", "label", "split")
SPLITS = ("train", "validation")
BOX = ("x_1", "y_1", "x_2", "y_2")  # PIL's crop box order: left, upper, right, lower
TRUE, FALSE = {"1", "true", "yes", "1.0"}, {"0", "false", "no", "0.0"}


@dataclass
class Table:
    """The rows of the CSV, checked: absolute paths, class names, split and query/gallery flags, boxes."""

    file: Path
    root: Path
    paths: list[str]
    labels: np.ndarray          # int64, positions of class_names
    class_names: list[str]
    is_train: np.ndarray
    is_query: np.ndarray | None
    is_gallery: np.ndarray | None
    boxes: np.ndarray | None    # (n, 4) float, NaN where a row has no box


def find_file(root: str | None, file: str | None) -> tuple[Path, Path]:
    """``(csv file, root)`` from the dataset.root and dataset.file settings."""
    if file:
        path = Path(file).expanduser()
        if not path.is_absolute() and root:
            path = Path(root).expanduser() / path
        if not path.is_file():
            raise DMLRunnerError(f"dataset.file={file}: {path} does not exist; give the CSV file (columns "
                                 f"{', '.join(REQUIRED)}; docs/DATASETS.md)")
        return path, (Path(root).expanduser() if root else path.parent)
    if not root:
        raise DMLRunnerError("dataset=csv needs dataset.file=<your table>.csv (columns path, label, split; "
                             "docs/DATASETS.md)")
    base = require_dir(root, SPEC)
    tables = sorted(base.glob("*.csv"))
    if len(tables) != 1:
        raise DMLRunnerError(f"dataset csv: {base} holds {len(tables)} .csv files; name yours with "
                             "dataset.file=<table>.csv")
    return tables[0], base


def _flag(value: Any, path: Path, row: int, column: str) -> bool:
    text = str(value).strip().lower()
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise DMLRunnerError(f"{path}:{row}: {column} must be 1/0 or true/false on a validation row, got {value!r}")


def read_table(root: str | None = None, file: str | None = None) -> Table:
    """Read and check the CSV; every problem is one error naming the file and line."""
    import pandas as pd

    path, base = find_file(root, file)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as err:  # noqa: BLE001 - pandas' parser errors vary
        raise DMLRunnerError(f"{path}: cannot be read as a CSV table: {err}") from err
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise DMLRunnerError(f"{path}: lacks the column(s) {', '.join(missing)} (columns: {', '.join(df.columns)}; "
                             f"needed: {', '.join(REQUIRED)}, docs/DATASETS.md)")
    if df.empty:
        raise DMLRunnerError(f"{path}: holds no rows")
    line = np.arange(len(df)) + 2  # the header is line 1
    split = df["split"].str.strip().str.lower()
    wrong = np.flatnonzero(~split.isin(SPLITS).to_numpy())
    if wrong.size:
        i = wrong[0]
        raise DMLRunnerError(f"{path}:{line[i]}: split must be train or validation, got {df['split'].iloc[i]!r}")
    empty = np.flatnonzero((df["path"].str.strip() == "").to_numpy() | (df["label"].str.strip() == "").to_numpy())
    if empty.size:
        raise DMLRunnerError(f"{path}:{line[empty[0]]}: empty path or label")
    paths = [str(p if p.is_absolute() else base / p) for p in (Path(x.strip()).expanduser() for x in df["path"])]
    names = df["label"].str.strip()
    numeric = names.str.fullmatch(r"-?\d+").all()
    class_names = sorted(set(names), key=int if numeric else str)
    index = {n: i for i, n in enumerate(class_names)}
    labels = np.array([index[n] for n in names], dtype=np.int64)
    is_train = (split == "train").to_numpy()
    is_query = is_gallery = None
    has_q, has_g = "is_query" in df.columns, "is_gallery" in df.columns
    if has_q != has_g:
        raise DMLRunnerError(f"{path}: give both is_query and is_gallery columns, or neither (leave-one-out)")
    if has_q:
        is_query, is_gallery = np.zeros(len(df), bool), np.zeros(len(df), bool)
        for i in np.flatnonzero(~is_train):
            is_query[i] = _flag(df["is_query"].iloc[i], path, line[i], "is_query")
            is_gallery[i] = _flag(df["is_gallery"].iloc[i], path, line[i], "is_gallery")
    boxes = None
    present = [c for c in BOX if c in df.columns]
    if present and len(present) != len(BOX):
        raise DMLRunnerError(f"{path}: a bounding box needs all of x_1, x_2, y_1, y_2; found {', '.join(present)}")
    if present:
        boxes = np.full((len(df), 4), np.nan)
        for i in range(len(df)):
            cells = [df[c].iloc[i].strip() for c in BOX]
            if not any(cells):
                continue
            try:
                box = [float(c) for c in cells]
            except ValueError:
                raise DMLRunnerError(f"{path}:{line[i]}: x_1, x_2, y_1, y_2 must be numbers (or all empty), got "
                                     f"{cells}") from None
            if not (box[0] < box[2] and box[1] < box[3]):
                raise DMLRunnerError(f"{path}:{line[i]}: the box needs x_1 < x_2 and y_1 < y_2, got x_1={cells[0]}, "
                                     f"x_2={cells[2]}, y_1={cells[1]}, y_2={cells[3]}")
            boxes[i] = box
    if not is_train.any() or is_train.all():
        raise DMLRunnerError(f"{path}: needs rows of both splits, train and validation (found only "
                             f"{'train' if is_train.any() else 'validation'})")
    return Table(path, base, paths, labels, class_names, is_train, is_query, is_gallery, boxes)


class BoxedImageListDataset(ImageListDataset):
    """Image files cropped to their row's bounding box (a row without one: the whole image)."""

    def __init__(self, *args: Any, boxes: np.ndarray | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.boxes = boxes

    def load(self, index: int) -> Image.Image:
        image = super().load(index)
        if self.boxes is None or np.isnan(self.boxes[index]).any():
            return image
        return image.crop(tuple(int(round(v)) for v in self.boxes[index]))


def training_images(root: str | None = None, file: str | None = None, **_: Any) -> tuple[list[str], np.ndarray]:
    """The training rows' image paths and labels (what :mod:`dml_runner.datasets.fit` measures)."""
    table = read_table(root, file)
    idx = np.flatnonzero(table.is_train)
    return [table.paths[i] for i in idx], table.labels[idx]


def build(root: str | None = None, file: str | None = None, recall_at: list[int] | tuple[int, ...] = (1, 2, 4, 8),
          transform: Any = None, default_transform: str = "rrc_224", image_size: int | None = None,
          fit: bool = True, fitted: dict[str, Any] | None = None, val_fraction: float = 0.0, seed: int = 0,
          skip_bad_images: bool = False, verify_images: bool = False) -> DatasetSplits:
    """Train on the ``train`` rows; evaluate on the ``validation`` rows, query -> gallery when the table flags
    them, else leave-one-out."""
    table = read_table(root, file)
    info: dict[str, Any] = {"root": str(table.root), "file": str(table.file),
                            "split": f"the split column of {table.file}",
                            "class_names": table.class_names if len(table.class_names) <= 200 else None}
    if fitted:
        info["fit"] = dict(fitted)
    sides = {}
    for side, rows in (("train", np.flatnonzero(table.is_train)), ("test", np.flatnonzero(~table.is_train))):
        paths, labels, kept = drop_bad_images(NAME, side, [table.paths[i] for i in rows], table.labels[rows],
                                              skip_bad_images, verify_images, info)
        sides[side] = (paths, labels, rows[kept])
    info["counts"] = basic_counts(sides["train"][1], sides["test"][1])
    names = dict(enumerate(table.class_names))

    def dataset(side: str) -> ImageListDataset:
        paths, labels, rows = sides[side]
        return BoxedImageListDataset(paths, labels, name=NAME, class_names=names,
                                     boxes=None if table.boxes is None else table.boxes[rows])

    eval_mode, query, gallery = "loo", None, None
    if table.is_query is not None:
        rows = sides["test"][2]
        eval_mode, query, gallery = "query_gallery", table.is_query[rows], table.is_gallery[rows]
        info["eval_protocol"] = "query -> gallery over the validation rows (is_query / is_gallery)"
        info["counts"].update(query_images=int(query.sum()), gallery_images=int(gallery.sum()))
    else:
        info["eval_protocol"] = "leave-one-out Recall@K over the validation rows"
    if table.boxes is not None:
        info["bounding_boxes"] = int((~np.isnan(table.boxes).any(axis=1)).sum())
    return assemble(NAME, dataset("train"), dataset("test"), transform, default_transform, val_fraction, seed, info,
                    list(recall_at), eval_mode=eval_mode, query_mask=query, gallery_mask=gallery,
                    image_size=image_size)


def listed_images(root: Path) -> list[str]:
    """Every image the table names (``root``: the CSV file, or the folder holding it as its only .csv)."""
    root = Path(root)
    table = read_table(str(root.parent), root.name) if root.is_file() else read_table(str(root))
    return list(dict.fromkeys(table.paths))


def write_table(root: Path, n_train: int, n_test: int, per_class: int, size: tuple[int, int] = FIXTURE_SIZE,
                query_gallery: bool = True) -> Path:
    """Fixture: ``root/images/<class>/<k>.jpg`` and ``root/df.csv`` naming them by relative path. With
    ``query_gallery``, the validation rows flag the first image of each class a gallery item only, the last one both,
    the others queries only; the first image of each training class has a box."""
    header = ["path", "label", "split", "is_query", "is_gallery", "x_1", "x_2", "y_1", "y_2"]
    rows = []
    for c in range(n_train + n_test):
        train = c < n_train
        for k in range(per_class):
            rel = f"images/c{c:02d}/{k}.jpg"
            write_jpeg(root / rel, c + 1, k, size)
            flags = ["", ""] if train else ["0" if k == 0 else "1", "1" if k in (0, per_class - 1) else "0"]
            box = ["2", "20", "2", "20"] if train and k == 0 else ["", "", "", ""]
            rows.append([rel, str(c), "train" if train else "validation", *flags, *box])
    keep = [j for j, name in enumerate(header) if query_gallery or name not in ("is_query", "is_gallery")]
    lines = [",".join(row[j] for j in keep) for row in [header, *rows]]
    (root / FIXTURE_FILE).write_text("\n".join(lines) + "\n")
    return root


def make_table(parent: Path, name: str = FIXTURE_DIR) -> Path:
    """Fixture: 3 training and 3 validation classes of 3 images each, with a query/gallery protocol."""
    return write_table(Path(parent) / name, 3, 3, 3)


def fixture_tree(parent: Path, size: TreeSize, image_size: tuple[int, int] = FIXTURE_SIZE) -> Path:
    """Fixture of ``size`` (the table's folder, its only .csv the table)."""
    return write_table(Path(parent) / FIXTURE_DIR, size.train_classes, size.test_classes, size.per_class, image_size)


SPEC = DatasetSpec(
    name=NAME, title="your own images listed in a CSV table", url="(your own images: nothing to download)",
    dir="<any>", layout="a CSV table with columns path,label,split[,is_query,is_gallery][,x_1,x_2,y_1,y_2] "
                        "(dataset.file; relative paths from dataset.root, by default the table's folder)",
    build=build, listed_images=listed_images, own_images=True, make_fixture=make_table, fixture_tree=fixture_tree,
    fixture_dir=FIXTURE_DIR)
