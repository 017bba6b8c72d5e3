"""PKU VehicleID with its small / medium / large test lists and both evaluation protocols.

Layout (``root`` = ``VehicleID_V1.0/``): ``train_test_split/train_list.txt`` and
``train_test_split/test_list_{800,1600,2400}.txt`` with lines "<image_name> <vehicle_id>"; images at
``image/<image_name>.jpg``. ``test_size`` small / medium / large = the 800 / 1,600 / 2,400-id list.

Protocols (``protocol``):

- ``original`` (Liu et al. 2016): per draw, one random image of every test id forms the gallery, all other images
  are queries; the draw is repeated ``repeats`` times (default 10) and the metrics averaged. The returned
  :class:`DatasetSplits` carries the first draw as ``query_mask`` / ``gallery_mask`` and ``info["protocol_repeats"]``;
  :func:`vehicleid_gallery_draws` gives every draw (the first equals the masks) for the trainer to average over.
  An id with a single image contributes no query (its image is a gallery distractor).
- ``loo``: leave-one-out Recall@K over the whole test list (the official Divide-and-Conquer code's evaluation, on
  the 2,400-id list only); queries without any positive (ids with one image, counted in
  ``info["singleton_test_classes"]``) are left out of Recall@K by the evaluator and counted in
  ``num_queries_without_positive``, where the official code counts them as misses. Under ``original`` every query
  has a positive (its id's gallery image). The D&C paper rows use ``original``: the official code's LOO R@1 on the
  large list (91.54, its README) is far above the paper's 82.9, so the paper's table most likely used it.

Official counts (line counts of the released V1.0 lists; the 2016 paper's table gives slightly different numbers):
train 113,346 images / 13,164 ids; test 7,332 / 800 (small), 12,995 / 1,600 (medium), 20,038 / 2,400 (large).
:data:`SPEC` declares it to the registry.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dml_runner import DMLRunnerError
from dml_runner.datasets.base import DatasetSplits
from dml_runner.datasets.images import (
    FIXTURE_SIZE, ImageListDataset, assemble, basic_counts, check_counts, drop_bad_images, parse_int, read_rows,
    require_dir, require_file, write_jpeg,
)
from dml_runner.datasets.spec import DatasetSpec, TreeSize, Variant

NAME = "vehicleid"
TEST_LISTS = {"small": 800, "medium": 1600, "large": 2400}
OFFICIAL_TRAIN = {"train_images": 113346, "train_classes": 13164}
OFFICIAL_TEST_IMAGES = {"small": 7332, "medium": 12995, "large": 20038}
PROTOCOLS = ("original", "loo")
RECALL_AT = [1, 5]


def read_list(root: Path, filename: str) -> tuple[list[str], np.ndarray]:
    """``(paths, vehicle_ids)`` of one list file under ``train_test_split/``."""
    path = require_file(root / "train_test_split" / filename, SPEC, root)
    paths, ids = [], []
    for lineno, (image_name, vehicle_id) in read_rows(path, 2):
        ids.append(parse_int(vehicle_id, path, lineno, "vehicle_id"))
        paths.append(str(root / "image" / f"{image_name}.jpg"))
    return paths, np.array(ids, dtype=np.int64)


def vehicleid_gallery_draws(labels: np.ndarray, repeats: int = 10,
                            seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """The original protocol's draws: ``repeats`` pairs ``(query_mask, gallery_mask)`` over ``labels``.

    Each draw puts one uniformly chosen image of every id into the gallery and the rest into the queries.
    Deterministic in ``seed``; the masks are disjoint and cover every item.
    """
    labels = np.asarray(labels)
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(repeats):
        order = rng.permutation(labels.size)
        _, first = np.unique(labels[order], return_index=True)  # first item of each id in a random order
        gallery = np.zeros(labels.size, dtype=bool)
        gallery[order[first]] = True
        draws.append((~gallery, gallery))
    return draws


def official_counts(test_size: str, protocol: str) -> dict[str, int]:
    ids, images = TEST_LISTS[test_size], OFFICIAL_TEST_IMAGES[test_size]
    counts = dict(OFFICIAL_TRAIN, test_images=images, test_classes=ids)
    if protocol == "original":
        counts.update(query_images=images - ids, gallery_images=ids)
    return counts


def build(root: str, test_size: str = "large", protocol: str = "original", repeats: int = 10,
          transform: Any = None, default_transform: str = "rrc_224", val_fraction: float = 0.0, seed: int = 0,
          skip_bad_images: bool = False, verify_images: bool = False) -> DatasetSplits:
    """VehicleID: train on train_list.txt; test on the ``test_size`` list with the ``protocol`` (R@1/R@5)."""
    if test_size not in TEST_LISTS:
        raise DMLRunnerError(f"dataset.test_size={test_size!r}: choose one of {sorted(TEST_LISTS)}")
    if protocol not in PROTOCOLS:
        raise DMLRunnerError(f"dataset.protocol={protocol!r}: choose one of {PROTOCOLS}")
    base = require_dir(root, SPEC)
    test_file = f"test_list_{TEST_LISTS[test_size]}.txt"
    train_paths, train_labels = read_list(base, "train_list.txt")
    test_paths, test_labels = read_list(base, test_file)
    shared = np.intersect1d(train_labels, test_labels)
    if shared.size:
        raise DMLRunnerError(f"{base}: train_list.txt and {test_file} share {shared.size} vehicle id(s), e.g. "
                             f"{int(shared[0])}; the official split is id-disjoint")
    info: dict[str, Any] = {"root": str(base), "split": f"train_list.txt / {test_file}", "test_size": test_size,
                            "protocol": protocol}
    train_paths, train_labels, _ = drop_bad_images(NAME, "train", train_paths, train_labels, skip_bad_images,
                                                   verify_images, info)
    test_paths, test_labels, _ = drop_bad_images(NAME, "test", test_paths, test_labels, skip_bad_images,
                                                 verify_images, info)
    found = basic_counts(train_labels, test_labels)
    query_mask = gallery_mask = draws = None
    if protocol == "original":
        draws = vehicleid_gallery_draws(test_labels, repeats, seed)
        query_mask, gallery_mask = draws[0]
        found.update(query_images=int(query_mask.sum()), gallery_images=int(gallery_mask.sum()))
        info.update(protocol_repeats=int(repeats), protocol_seed=int(seed),
                    eval_protocol=f"original: one random gallery image per id, the rest queries; {repeats} draws "
                                  f"(vehicleid_gallery_draws) averaged by the trainer")
    else:
        info["eval_protocol"] = "leave-one-out Recall@K over the whole test list"
    check_counts(NAME, found, official_counts(test_size, protocol), info)
    train = ImageListDataset(train_paths, train_labels, name=NAME)
    test = ImageListDataset(test_paths, test_labels, name=NAME)
    return assemble(NAME, train, test, transform, default_transform, val_fraction, seed, info, RECALL_AT,
                    eval_mode="query_gallery" if protocol == "original" else "loo",
                    query_mask=query_mask, gallery_mask=gallery_mask, eval_draws=draws)


def listed_images(root: Path) -> list[str]:
    """Every image the train list and the three test lists name, once (the test lists overlap)."""
    paths = read_list(root, "train_list.txt")[0]
    for n in TEST_LISTS.values():
        paths += read_list(root, f"test_list_{n}.txt")[0]
    return list(dict.fromkeys(paths))


def make_vehicleid(parent: Path, train_ids: Iterable[int] = (1, 2, 3, 4),
                   test_ids: Sequence[int] = (11, 12, 13, 14, 15, 16), per_id: int = 3,
                   singleton_ids: Iterable[int] = (16,), size: tuple[int, int] = FIXTURE_SIZE) -> Path:
    """Fixture: VehicleID_V1.0/{train_test_split/{train_list,test_list_800,test_list_1600,test_list_2400}.txt,
    image/*.jpg}.

    The large list holds every test id, medium the first two thirds, small the first third; ids in
    ``singleton_ids`` get one image only.
    """
    root = Path(parent) / SPEC.dir
    image_no = 0

    def rows_for(ids: Iterable[int]) -> list[str]:
        nonlocal image_no
        rows = []
        for vid in ids:
            for k in range(1 if vid in set(singleton_ids) else per_id):
                image_no += 1
                name = f"{image_no:07d}"
                write_jpeg(root / "image" / f"{name}.jpg", vid, k, size)
                rows.append(f"{name} {vid:04d}")
        return rows

    split = root / "train_test_split"
    split.mkdir(parents=True, exist_ok=True)
    (split / "train_list.txt").write_text("\n".join(rows_for(train_ids)) + "\n")
    test_ids = list(test_ids)
    large = rows_for(test_ids)
    by_id: dict[int, list[str]] = {}
    for row in large:
        by_id.setdefault(int(row.split()[1]), []).append(row)
    for n, fraction in ((800, 1 / 3), (1600, 2 / 3), (2400, 1.0)):
        ids = test_ids[: max(1, round(len(test_ids) * fraction))]
        (split / f"test_list_{n}.txt").write_text("\n".join(r for i in ids for r in by_id[i]) + "\n")
    return root


def fixture_tree(parent: Path, size: TreeSize, image_size: tuple[int, int] = FIXTURE_SIZE) -> Path:
    """Fixture of ``size``: training ids from 1, test ids from 1001, no singleton id."""
    return make_vehicleid(parent, range(1, size.train_classes + 1), range(1001, 1001 + size.test_classes),
                          per_id=size.per_class, singleton_ids=(), size=image_size)


SPEC = DatasetSpec(
    name=NAME, title="PKU VehicleID",
    url="https://www.pkuml.org/resources/pku-vehicleid.html (VehicleID_V1.0, on request from the authors)",
    dir="VehicleID_V1.0",
    layout="VehicleID_V1.0/{train_test_split/{train_list.txt, test_list_800.txt, test_list_1600.txt, "
           "test_list_2400.txt}, image/<image_name>.jpg}",
    build=build, listed_images=listed_images,
    variants=tuple(Variant(f"test_size={size}", {"test_size": size, "protocol": "original"},
                           official_counts(size, "original")) for size in TEST_LISTS),
    make_fixture=make_vehicleid, fixture_tree=fixture_tree)
