"""Tiny dataset trees in the official layouts (real JPEGs, a real cars_annos.mat): the data of the smoke mode
(``scripts/reproduce.py --smoke``) and of the tests.

Every ``make_<dataset>(parent, ...)`` writes ``parent/<official dir name>`` and returns that path, which is what
``dataset.root`` expects. Images are small JPEGs whose colour depends on the class (plus noise), so a model can
learn something on them in a smoke reproduction run. Example::

    from dml_runner.datasets.fixtures import make_cub200
    root = make_cub200(tmp_path)                # tmp_path/CUB_200_2011
    # dml-run dataset=cub200 dataset.root=<root> ...
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = (40, 32)  # width, height: above nothing in particular; transforms upscale to 227/224


def write_jpeg(path: Path, label: int, index: int = 0, size: tuple[int, int] = SIZE) -> Path:
    """A JPEG whose mean colour is a function of ``label`` (plus per-image noise)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(label * 1009 + index)
    base = np.array([(label * 67) % 256, (label * 131) % 256, (label * 197) % 256], dtype=np.float64)
    pixels = base + rng.normal(0.0, 20.0, size=(size[1], size[0], 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, format="JPEG", quality=85)
    return path


def make_cub200(parent: Path, classes: Iterable[int] = (1, 2, 3, 101, 102, 103), per_class: int = 3,
                size: tuple[int, int] = SIZE) -> Path:
    """CUB_200_2011/{images.txt, image_class_labels.txt, train_test_split.txt, images/NNN.Name/*.jpg}."""
    root = Path(parent) / "CUB_200_2011"
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


def write_cars_annos(path: Path, entries: Sequence[tuple[str, int, int]]) -> None:
    """cars_annos.mat in the official struct layout; ``entries`` = (relative_im_path, class, test)."""
    import scipy.io

    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    annos = np.zeros((1, len(entries)), dtype=[(f, "O") for f in fields])
    for i, (rel, label, test) in enumerate(entries):
        annos[0, i]["relative_im_path"] = np.array([rel])
        for name, value in zip(fields[1:5], (1, 2, 30, 25)):
            annos[0, i][name] = np.array([[value]], dtype=np.uint16)
        annos[0, i]["class"] = np.array([[label]], dtype=np.uint8)
        annos[0, i]["test"] = np.array([[test]], dtype=np.uint8)
    class_names = np.empty((1, 196), dtype=object)
    class_names[0, :] = [f"Make Model {c}" for c in range(1, 197)]
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(path), {"annotations": annos, "class_names": class_names})


def make_cars196(parent: Path, classes: Iterable[int] = (1, 2, 3, 99, 100, 101), per_class: int = 3,
                 size: tuple[int, int] = SIZE) -> Path:
    """cars196/{cars_annos.mat, car_ims/NNNNNN.jpg}; the 'test' flag alternates (it must be ignored)."""
    root = Path(parent) / "cars196"
    entries = []
    for c in classes:
        for k in range(per_class):
            rel = f"car_ims/{len(entries) + 1:06d}.jpg"
            write_jpeg(root / rel, c, k, size)
            entries.append((rel, c, len(entries) % 2))
    write_cars_annos(root / "cars_annos.mat", entries)
    return root


SOP_HEADER = "image_id class_id super_class_id path"


def make_sop(parent: Path, train_classes: Iterable[int] = (1, 2, 3, 4), test_classes: Iterable[int] = (11, 12, 13),
             per_class: int = 2, size: tuple[int, int] = SIZE) -> Path:
    """Stanford_Online_Products/{Ebay_train.txt, Ebay_test.txt, <super>_final/<product>_<k>.JPG}."""
    root = Path(parent) / "Stanford_Online_Products"
    supers = ["bicycle", "cabinet", "chair"]
    image_id = 0
    for filename, classes in (("Ebay_train.txt", train_classes), ("Ebay_test.txt", test_classes)):
        lines = [SOP_HEADER]
        for c in classes:
            super_id = c % len(supers) + 1
            for k in range(per_class):
                image_id += 1
                rel = f"{supers[super_id - 1]}_final/{1000 + c}_{k}.JPG"
                write_jpeg(root / rel, c, k, size)
                lines.append(f"{image_id} {c} {super_id} {rel}")
        (root / filename).write_text("\n".join(lines) + "\n")
    return root


INSHOP_HEADER = "image_name item_id evaluation_status"


def write_inshop_partition(path: Path, rows: Sequence[tuple[str, str, str]], declared: int | None = None) -> None:
    lines = [str(len(rows) if declared is None else declared), INSHOP_HEADER]
    lines += [f"{rel}  {item}  {status}" for rel, item, status in rows]  # the official file pads with spaces
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def make_inshop(parent: Path, train_items: Iterable[int] = (2, 3, 4), test_items: Iterable[int] = (7, 8, 9),
                train_per_item: int = 2, query_per_item: int = 2, gallery_per_item: int = 1,
                size: tuple[int, int] = SIZE) -> Path:
    """InShop/{Eval/list_eval_partition.txt, img/WOMEN/Dresses/id_XXXXXXXX/NN_K_front.jpg}."""
    root = Path(parent) / "InShop"
    rows = []
    for item, statuses in [(i, ["train"] * train_per_item) for i in train_items] + \
                          [(i, ["query"] * query_per_item + ["gallery"] * gallery_per_item) for i in test_items]:
        for k, status in enumerate(statuses):
            rel = f"img/WOMEN/Dresses/id_{item:08d}/{k + 1:02d}_{k % 4 + 1}_front.jpg"
            write_jpeg(root / rel, item, k, size)
            rows.append((rel, f"id_{item:08d}", status))
    write_inshop_partition(root / "Eval" / "list_eval_partition.txt", rows)
    return root


def make_vehicleid(parent: Path, train_ids: Iterable[int] = (1, 2, 3, 4), test_ids: Sequence[int] = (11, 12, 13, 14, 15, 16),
                   per_id: int = 3, singleton_ids: Iterable[int] = (16,), size: tuple[int, int] = SIZE) -> Path:
    """VehicleID_V1.0/{train_test_split/{train_list,test_list_800,test_list_1600,test_list_2400}.txt, image/*.jpg}.

    The large list holds every test id, medium the first two thirds, small the first third; ids in
    ``singleton_ids`` get one image only.
    """
    root = Path(parent) / "VehicleID_V1.0"
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


def make_folder(parent: Path, n_classes: int = 6, per_class: int = 3, size: tuple[int, int] = SIZE,
                name: str = "my_images") -> Path:
    """<name>/<class_XX>/<k>.jpg (and one .png) for the ``folder`` dataset."""
    root = Path(parent) / name
    for c in range(n_classes):
        for k in range(per_class):
            path = write_jpeg(root / f"class_{c:02d}" / f"{k}.jpg", c + 1, k, size)
            if k == 0 and c == 0:
                Image.open(path).save(path.with_suffix(".png"))
                path.unlink()
    return root


MAKERS = {"cub200": make_cub200, "cars196": make_cars196, "sop": make_sop, "inshop": make_inshop,
          "vehicleid": make_vehicleid, "folder": make_folder}
ROOT_DIRS = {"cub200": "CUB_200_2011", "cars196": "cars196", "sop": "Stanford_Online_Products", "inshop": "InShop",
             "vehicleid": "VehicleID_V1.0", "folder": "my_images"}


@dataclass(frozen=True)
class TreeSize:
    """How big a fixture tree is: training classes x images per class, and test classes (same images per class).

    Training classes and images bound the batches a row can draw (an N-pair batch of N classes x 2, a
    class-balanced batch of P x K, K Divide and Conquer learners each needing classes of their own); test classes
    bound the retrieval evaluation.
    """

    train_classes: int
    per_class: int
    test_classes: int = 6


# Smoke reproduction runs and the per-row real-path tests: a few classes per batch, up to K = 8 Divide and Conquer
# clusters of ~4 classes each, 4 images per class (the largest images-per-class of the rows' batches).
SMOKE_SIZE = TreeSize(train_classes=32, per_class=4, test_classes=6)
# One step at a row's full batch: 64 classes x 2 (N-pair), 40 x 3 (triplets), 20 x 4 (Divide and Conquer).
FULL_BATCH_SIZE = TreeSize(train_classes=64, per_class=4, test_classes=4)
# A Divide and Conquer row at full size clusters every training image at 224 px first: just over one 20 x 4 batch.
FULL_DC_SIZE = TreeSize(train_classes=24, per_class=4, test_classes=4)


def make_tree(name: str, parent: Path, size: TreeSize, image_size: tuple[int, int] = SIZE) -> Path:
    """The ``name`` tree under ``parent`` in its official layout, holding ``size``'s classes; returns its root.

    CUB and Cars keep their class-number split (training classes from 1, test classes from the first test class),
    SOP its train/test lists, In-shop its train/query/gallery partition (per test item: all images but one are
    queries, one is the gallery), VehicleID its train list and three test lists.
    """
    parent = Path(parent)
    train, k = list(range(1, size.train_classes + 1)), size.per_class
    if name in ("cub200", "cars196"):
        first_test = {"cub200": 101, "cars196": 99}[name]
        if size.train_classes >= first_test or size.test_classes >= first_test:
            raise ValueError(f"{name} has {first_test - 1} training and {first_test - 1} test classes")
        return MAKERS[name](parent, [*train, *range(first_test, first_test + size.test_classes)], k, image_size)
    test = list(range(1001, 1001 + size.test_classes))
    if name == "sop":
        return make_sop(parent, train, test, k, image_size)
    if name == "inshop":
        return make_inshop(parent, train, test, train_per_item=k, query_per_item=max(1, k - 1), gallery_per_item=1,
                           size=image_size)
    if name == "vehicleid":
        return make_vehicleid(parent, train, test, per_id=k, singleton_ids=(), size=image_size)
    if name == "folder":
        return make_folder(parent, n_classes=size.train_classes + size.test_classes, per_class=k, size=image_size)
    raise ValueError(f"no fixture tree for dataset {name!r}; choose one of {sorted(MAKERS)}")


def make_all(parent: Path) -> dict[str, Path]:
    """Every fixture tree under ``parent``: ``{dataset name: dataset.root}``."""
    return {name: make(Path(parent)) for name, make in MAKERS.items()}
