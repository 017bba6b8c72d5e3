"""What an image-file dataset declares about itself, in one :class:`DatasetSpec` at the end of its module.

The spec gathers the facts that the loaders, ``dml-prepare``, the smoke mode and the tests read: where the dataset
comes from and how its tree looks, its archive (where one is published), the reader that lists its images, its
builder, the official counts, and the fixture writers that make a tiny tree in its layout.
:mod:`dml_runner.datasets.registry` collects the specs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Archive:
    """An archive that the dataset's authors publish at an address that has stayed put, with its checksum.

    ``file`` is the name it is saved under, ``top`` the directory it unpacks to.
    """

    url: str
    file: str
    md5: str
    top: str


@dataclass(frozen=True)
class Variant:
    """Builder settings whose counts ``dml-prepare`` compares with the official ones (``label`` names them in the
    report; ``official_counts`` is ``None`` where there are none, as for your own images)."""

    label: str = ""
    settings: Mapping[str, Any] = field(default_factory=dict)
    official_counts: Mapping[str, int] | None = None


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

    def class_numbers(self, dataset: str, first_test_class: int) -> list[int]:
        """The class numbers of a tree split at a class number (CUB, Cars): training classes 1, 2, ... and test
        classes ``first_test_class``, ``first_test_class + 1``, ..."""
        if self.train_classes >= first_test_class or self.test_classes >= first_test_class:
            raise ValueError(f"{dataset} has {first_test_class - 1} training and {first_test_class - 1} test classes")
        return [*range(1, self.train_classes + 1), *range(first_test_class, first_test_class + self.test_classes)]


@dataclass(frozen=True)
class DatasetSpec:
    """One image-file dataset: its name (``conf/dataset/<name>.yaml``), its sources and layout, its code, its counts.

    - ``title``, ``url``, ``dir``, ``layout``: what it is, where to get it, its directory's official name and what
      that directory holds (error messages and ``dml-prepare --sources`` print them).
    - ``build``: the builder the config's ``_target_`` names; ``listed_images(root)``: every image path the split
      files name (raises :class:`~dml_runner.DMLRunnerError` for a missing split file).
    - ``variants``: the builder settings checked against the official counts.
    - ``make_fixture(parent)``: the tests' small tree, written as ``parent/<fixture_dir>``;
      ``fixture_tree(parent, size, image_size)``: a tree holding :class:`TreeSize`'s classes (the smoke mode's).
    - ``archive``: the download, where one exists; ``own_images``: the user brings the images (nothing to fetch).
    """

    name: str
    title: str
    url: str
    dir: str
    layout: str
    build: Callable[..., Any]
    listed_images: Callable[[Path], list[str]]
    make_fixture: Callable[..., Path]
    fixture_tree: Callable[..., Path]
    variants: tuple[Variant, ...] = (Variant(),)
    archive: Archive | None = None
    own_images: bool = False
    fixture_dir: str = ""

    def __post_init__(self) -> None:
        if not self.fixture_dir:
            object.__setattr__(self, "fixture_dir", self.dir)
