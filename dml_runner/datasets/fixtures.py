"""Tiny dataset trees in the official layouts (real JPEGs, a real cars_annos.mat): the data of the smoke mode
(``scripts/reproduce.py --smoke``) and of the tests.

Each dataset's module writes its own tree (``make_<dataset>``, named by its spec's ``make_fixture``); this module
gathers them. Every ``make_<dataset>(parent, ...)`` writes ``parent/<official dir name>`` and returns that path,
which is what ``dataset.root`` expects. Images are small JPEGs whose colour depends on the class (plus noise), so a
model can learn something on them in a smoke reproduction run. Example::

    from dml_runner.datasets.fixtures import make_cub200
    root = make_cub200(tmp_path)                # tmp_path/CUB_200_2011
    # dml-run dataset=cub200 dataset.root=<root> ...
"""

from __future__ import annotations

from pathlib import Path

from dml_runner.datasets.cars196 import make_cars196, write_cars_annos
from dml_runner.datasets.cub200 import make_cub200
from dml_runner.datasets.folder import make_folder
from dml_runner.datasets.images import FIXTURE_SIZE as SIZE
from dml_runner.datasets.images import write_jpeg
from dml_runner.datasets.inshop import make_inshop, write_inshop_partition
from dml_runner.datasets.registry import SPECS
from dml_runner.datasets.sop import make_sop
from dml_runner.datasets.spec import TreeSize
from dml_runner.datasets.vehicleid import make_vehicleid

__all__ = [
    "FULL_BATCH_SIZE", "FULL_DC_SIZE", "MAKERS", "ROOT_DIRS", "SIZE", "SMOKE_SIZE", "TreeSize", "make_all",
    "make_cars196", "make_cub200", "make_folder", "make_inshop", "make_sop", "make_tree", "make_vehicleid",
    "write_cars_annos", "write_inshop_partition", "write_jpeg",
]

MAKERS = {name: spec.make_fixture for name, spec in SPECS.items()}
ROOT_DIRS = {name: spec.fixture_dir for name, spec in SPECS.items()}

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
    if name not in SPECS:
        raise ValueError(f"no fixture tree for dataset {name!r}; choose one of {sorted(MAKERS)}")
    return SPECS[name].fixture_tree(Path(parent), size, image_size)


def make_all(parent: Path) -> dict[str, Path]:
    """Every fixture tree under ``parent``: ``{dataset name: dataset.root}``."""
    return {name: make(Path(parent)) for name, make in MAKERS.items()}
