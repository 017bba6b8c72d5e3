"""DeepFashion In-shop Clothes Retrieval: query -> gallery retrieval on item ids unseen in training.

Layout (``root``): ``Eval/list_eval_partition.txt`` (line 1 the image count, line 2 the header
"image_name item_id evaluation_status", then "img/WOMEN/Dresses/id_00000002/02_1_front.jpg id_00000002 train")
and the ``img/`` tree it names. ``test`` holds the query and gallery images (file order) with boolean masks;
retrieval is query -> gallery only, Recall@1/10/20/30/40/50. Official counts: train 3,997 items / 25,882 images;
query 14,218 and gallery 12,612 images of 3,985 items. :data:`SPEC` declares it to the registry.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dml_runner import DMLRunnerError
from dml_runner.datasets.base import DatasetSplits
from dml_runner.datasets.images import (
    FIXTURE_SIZE, ImageListDataset, assemble, basic_counts, check_counts, drop_bad_images, read_rows, require_dir,
    require_file, write_jpeg,
)
from dml_runner.datasets.spec import DatasetSpec, TreeSize, Variant

NAME = "inshop"
PARTITION_FILE = "Eval/list_eval_partition.txt"
OFFICIAL_COUNTS = {"train_images": 25882, "train_classes": 3997, "test_images": 26830, "test_classes": 3985,
                   "query_images": 14218, "gallery_images": 12612}
RECALL_AT = [1, 10, 20, 30, 40, 50]
HEADER = ["image_name", "item_id", "evaluation_status"]
_ITEM_ID = re.compile(r"^id_(\d+)$")
STATUSES = ("train", "query", "gallery")


def read_partition(root: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(paths, item_ids, status)`` of list_eval_partition.txt; status is an array of "train"/"query"/"gallery"."""
    path = require_file(root / PARTITION_FILE, SPEC, root)
    with open(path, encoding="utf-8") as f:
        first, second = f.readline().strip(), f.readline().split()
    try:
        declared = int(first)
    except ValueError:
        raise DMLRunnerError(f"{path}:1: expected the image count, got {first!r}") from None
    if second != HEADER:
        raise DMLRunnerError(f"{path}:2: expected the header {' '.join(HEADER)!r}, got {' '.join(second)!r}")
    paths, items, status = [], [], []
    for lineno, (rel, item, state) in read_rows(path, 3, skip=2):
        match = _ITEM_ID.match(item)
        if not match:
            raise DMLRunnerError(f"{path}:{lineno}: item_id must look like id_00000002, got {item!r}")
        if state not in STATUSES:
            raise DMLRunnerError(f"{path}:{lineno}: evaluation_status must be one of {STATUSES}, got {state!r}")
        paths.append(str(root / rel))
        items.append(int(match.group(1)))
        status.append(state)
    if len(paths) != declared:
        raise DMLRunnerError(f"{path}: line 1 declares {declared} images but {len(paths)} are listed "
                             f"(truncated or edited file?)")
    return paths, np.array(items, dtype=np.int64), np.array(status)


def build(root: str, transform: Any = None, default_transform: str = "rrc_224", val_fraction: float = 0.0,
          seed: int = 0, skip_bad_images: bool = False, verify_images: bool = False) -> DatasetSplits:
    """In-shop: train on the 'train' items; evaluate query -> gallery (Recall@1/10/20/30/40/50)."""
    base = require_dir(root, SPEC)
    paths, items, status = read_partition(base)
    info: dict[str, Any] = {"root": str(base), "split": PARTITION_FILE,
                            "eval_protocol": "query -> gallery Recall@K (queries and gallery are disjoint images)"}
    train_idx = np.flatnonzero(status == "train")
    test_idx = np.flatnonzero(status != "train")
    shared = np.intersect1d(items[train_idx], items[test_idx])
    if shared.size:
        raise DMLRunnerError(f"{base / PARTITION_FILE}: {shared.size} item id(s) are both train and query/gallery, "
                             f"e.g. id_{int(shared[0]):08d}; the official split is item-disjoint")
    train_paths, train_labels, _ = drop_bad_images(NAME, "train", [paths[i] for i in train_idx], items[train_idx],
                                                   skip_bad_images, verify_images, info)
    test_paths, test_labels, kept = drop_bad_images(NAME, "test", [paths[i] for i in test_idx], items[test_idx],
                                                    skip_bad_images, verify_images, info)
    test_status = status[test_idx][kept]
    query_mask, gallery_mask = test_status == "query", test_status == "gallery"
    found = basic_counts(train_labels, test_labels)
    found.update(query_images=int(query_mask.sum()), gallery_images=int(gallery_mask.sum()))
    check_counts(NAME, found, OFFICIAL_COUNTS, info)
    # A query whose item has no gallery image can never be answered; the evaluator counts/excludes it.
    info["queries_without_gallery_match"] = int(
        (~np.isin(test_labels[query_mask], test_labels[gallery_mask])).sum())
    names = {int(i): f"id_{int(i):08d}" for i in np.unique(items)}
    train = ImageListDataset(train_paths, train_labels, name=NAME, class_names=names)
    test = ImageListDataset(test_paths, test_labels, name=NAME, class_names=names)
    return assemble(NAME, train, test, transform, default_transform, val_fraction, seed, info, RECALL_AT,
                    eval_mode="query_gallery", query_mask=query_mask, gallery_mask=gallery_mask)


def listed_images(root: Path) -> list[str]:
    """Every image list_eval_partition.txt lists."""
    return read_partition(root)[0]


def write_inshop_partition(path: Path, rows: Sequence[tuple[str, str, str]], declared: int | None = None) -> None:
    """Fixture: list_eval_partition.txt of ``rows`` = (image_name, item_id, evaluation_status); line 1 declares
    ``declared`` images (by default as many as there are rows)."""
    lines = [str(len(rows) if declared is None else declared), " ".join(HEADER)]
    lines += [f"{rel}  {item}  {status}" for rel, item, status in rows]  # the official file pads with spaces
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def make_inshop(parent: Path, train_items: Iterable[int] = (2, 3, 4), test_items: Iterable[int] = (7, 8, 9),
                train_per_item: int = 2, query_per_item: int = 2, gallery_per_item: int = 1,
                size: tuple[int, int] = FIXTURE_SIZE) -> Path:
    """Fixture: InShop/{Eval/list_eval_partition.txt, img/WOMEN/Dresses/id_XXXXXXXX/NN_K_front.jpg}."""
    root = Path(parent) / SPEC.dir
    rows = []
    for item, statuses in [(i, ["train"] * train_per_item) for i in train_items] + \
                          [(i, ["query"] * query_per_item + ["gallery"] * gallery_per_item) for i in test_items]:
        for k, status in enumerate(statuses):
            rel = f"img/WOMEN/Dresses/id_{item:08d}/{k + 1:02d}_{k % 4 + 1}_front.jpg"
            write_jpeg(root / rel, item, k, size)
            rows.append((rel, f"id_{item:08d}", status))
    write_inshop_partition(root / PARTITION_FILE, rows)
    return root


def fixture_tree(parent: Path, size: TreeSize, image_size: tuple[int, int] = FIXTURE_SIZE) -> Path:
    """Fixture of ``size``: training items from 1, test items from 1001; per test item all images but one are
    queries, one is the gallery."""
    return make_inshop(parent, range(1, size.train_classes + 1), range(1001, 1001 + size.test_classes),
                       train_per_item=size.per_class, query_per_item=max(1, size.per_class - 1), gallery_per_item=1,
                       size=image_size)


SPEC = DatasetSpec(
    name=NAME, title="DeepFashion In-shop Clothes Retrieval Benchmark",
    url="https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html "
        "(Eval/list_eval_partition.txt and Img/img.zip, unzipped so that img/ sits next to Eval/)",
    dir="InShop", layout="InShop/{Eval/list_eval_partition.txt, img/WOMEN/..., img/MEN/...}",
    build=build, listed_images=listed_images, variants=(Variant(official_counts=OFFICIAL_COUNTS),),
    make_fixture=make_inshop, fixture_tree=fixture_tree)
