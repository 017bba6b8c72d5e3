"""Shared machinery of the image-file datasets (CUB-200-2011, Cars196, SOP, In-shop, VehicleID, folder).

One module owns: the lazily-decoding :class:`ImageListDataset`, the missing-file messages (what a dataset's
:class:`~dml_runner.datasets.spec.DatasetSpec` says about where to get it), split-file parsing with file:line errors,
the up-front existence check (``skip_bad_images``), the comparison of the counts found with the official ones (a
partial download must never silently produce a paper-looking table), the final assembly of a :class:`DatasetSplits`,
and the JPEG writer of the fixture trees.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dml_runner import DMLRunnerError
from dml_runner.datasets.base import DatasetSplits, LabelledDataset, with_validation_split
from dml_runner.datasets.spec import DatasetSpec

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class DatasetCountWarning(UserWarning):
    """The counts found differ from those of a full official download."""


def where_to_get(spec: DatasetSpec, root: Path | str) -> str:
    """The 'how to fix it' part of every missing-file error."""
    if spec.own_images:
        return (f"Put your images in {spec.layout} and point dataset.root at that directory; check it with "
                f"`dml-prepare {spec.name} {root}`. See docs/DATASETS.md.")
    get = (f"Get it with `dml-prepare {spec.name} {root} --download`, or download" if spec.archive is not None
           else "Download")
    return (f"{get} {spec.title} from {spec.url}, lay it out as {spec.layout} and point "
            f"dataset.root (or $DML_DATA) at it; check the tree with "
            f"`dml-prepare {spec.name} {root}`. See docs/DATASETS.md.")


def require_dir(root: Path | str, spec: DatasetSpec) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DMLRunnerError(f"dataset {spec.name}: root directory {root} does not exist. {where_to_get(spec, root)}")
    return root


def require_file(path: Path, spec: DatasetSpec, root: Path | str) -> Path:
    if not path.is_file():
        raise DMLRunnerError(f"dataset {spec.name}: split file {path} does not exist. {where_to_get(spec, root)}")
    return path


def read_rows(path: Path, n_fields: int, skip: int = 0, last_field_rest: bool = False) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(line_number, fields)`` of a whitespace-separated list file (1-based line numbers, blank lines skipped).

    ``last_field_rest`` lets the last field contain spaces (file paths). A line with another field count raises
    :class:`DMLRunnerError` naming the file and line.
    """
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if lineno <= skip or not line.strip():
                continue
            fields = line.split(None, n_fields - 1) if last_field_rest else line.split()
            fields = [x.strip() for x in fields]
            if len(fields) != n_fields:
                raise DMLRunnerError(f"{path}:{lineno}: expected {n_fields} fields, got {len(fields)}: {line.rstrip()!r}")
            yield lineno, fields


def parse_int(value: str, path: Path, lineno: int, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DMLRunnerError(f"{path}:{lineno}: {what} must be an integer, got {value!r}") from None


class ImageListDataset(LabelledDataset):
    """Image files decoded lazily with PIL (``.convert("RGB")``) in :meth:`load`; labels are the original class ids.

    ``fix`` is the advice an unreadable file's error ends with.
    """

    def __init__(self, paths: Sequence[Path | str], labels: np.ndarray,
                 transform: Callable[[Any], torch.Tensor] | None = None, name: str = "",
                 class_names: Mapping[int, str] | None = None,
                 fix: str = "run `dml-prepare <dataset> <root>` to find every unreadable image") -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        super().__init__(labels, transform=transform, in_channels=3, name=name, paths=[str(p) for p in paths],
                         class_names=class_names)
        self.fix = fix

    def load(self, index: int) -> Image.Image:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for broken files
            raise DMLRunnerError(f"dataset {self.name}: cannot read image {path}: {err} ({self.fix})") from err


def class_names_from_dirs(paths: Sequence[str], labels: np.ndarray, template: str = "{dir}") -> dict[int, str]:
    """label -> name from the directory of the label's first image (``template`` may also use ``{label}``)."""
    labels = np.asarray(labels)
    classes, first = np.unique(labels, return_index=True)
    return {int(c): template.format(dir=Path(paths[i]).parent.name, label=int(c)) for c, i in zip(classes, first)}


def _decodes(path: str) -> bool:
    try:
        with Image.open(path) as image:
            image.load()
        return True
    except Exception:
        return False


def find_bad_images(paths: Sequence[str], decode: bool = False, workers: int = 8) -> list[str]:
    """Paths that do not exist (and, with ``decode``, that PIL cannot fully decode)."""
    bad = [p for p in paths if not Path(p).is_file()]
    if decode:
        missing = set(bad)
        present = [p for p in paths if p not in missing]
        with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL releases the GIL while decoding
            ok = list(pool.map(_decodes, present, chunksize=64))
        bad += [p for p, good in zip(present, ok) if not good]
    return bad


def drop_bad_images(dataset: str, split: str, paths: list[str], labels: np.ndarray, skip_bad_images: bool,
                    verify_images: bool, info: dict[str, Any]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Check every listed image up front; raise on the first bad one, or drop them when ``skip_bad_images``.

    Returns the kept paths, labels and the kept positions (indices into the input lists).
    """
    bad = find_bad_images(paths, decode=verify_images)
    keep = np.ones(len(paths), dtype=bool)
    if bad:
        what = "missing or unreadable" if verify_images else "missing"
        if not skip_bad_images:
            raise DMLRunnerError(
                f"dataset {dataset}: {len(bad)} {split} image(s) listed in the split files are {what}, e.g. {bad[0]}. "
                f"Fix the download (`dml-prepare {dataset} <root>` lists them all) or set "
                f"dataset.skip_bad_images=true to leave them out (they are counted in results.json).")
        bad_set = set(bad)
        keep = np.array([p not in bad_set for p in paths], dtype=bool)
        skipped = info.setdefault("skipped_images", {})
        skipped[split] = skipped.get(split, 0) + len(bad)
        info.setdefault("skipped_examples", []).extend(bad[:5])
        log.warning("dataset %s: skipped %d %s %s images (dataset.skip_bad_images=true), e.g. %s",
                    dataset, len(bad), what, split, bad[0])
    kept = np.flatnonzero(keep)
    return [paths[i] for i in kept], np.asarray(labels)[kept], kept


def basic_counts(train_labels: np.ndarray, test_labels: np.ndarray) -> dict[str, int]:
    return {"train_images": int(len(train_labels)), "train_classes": int(np.unique(train_labels).size),
            "test_images": int(len(test_labels)), "test_classes": int(np.unique(test_labels).size)}


def check_counts(dataset: str, found: Mapping[str, int], official: Mapping[str, int],
                 info: dict[str, Any]) -> None:
    """Record ``found`` and ``official`` in ``info``; warn loudly (and set ``info["count_warning"]``) if they differ."""
    info["counts"] = dict(found)
    info["official_counts"] = dict(official)
    diffs = {k: (found.get(k), v) for k, v in official.items() if found.get(k) != v}
    if not diffs:
        return
    detail = ", ".join(f"{k} {got} (official {want})" for k, (got, want) in diffs.items())
    message = (f"dataset {dataset}: the counts found differ from a full official download: {detail}. "
               f"Results on this tree are NOT comparable with published numbers. "
               f"Check the download with `dml-prepare <dataset> <root>`.")
    info["count_warning"] = message
    log.warning(message)
    warnings.warn(message, DatasetCountWarning, stacklevel=3)


def singleton_classes(labels: np.ndarray) -> int:
    """Number of classes with exactly one image (in leave-one-out retrieval such a query has no positive)."""
    _, counts = np.unique(labels, return_counts=True)
    return int((counts == 1).sum())


def assemble(name: str, train: ImageListDataset, test: ImageListDataset, transform: Any, default_transform: str,
             val_fraction: float, seed: int, info: dict[str, Any], eval_recall_at: list[int],
             eval_mode: str = "loo", query_mask: np.ndarray | None = None,
             gallery_mask: np.ndarray | None = None,
             eval_draws: list[tuple[np.ndarray, np.ndarray]] | None = None) -> DatasetSplits:
    """Attach the train/test transforms, build the :class:`DatasetSplits` and hold out the validation classes."""
    from dml_runner.datasets.transforms import resolve_transforms

    train_tf, test_tf, tf_name = resolve_transforms(transform, default_transform)
    train.transform, test.transform = train_tf, test_tf
    info["transform"] = tf_name
    info.setdefault("singleton_test_classes", singleton_classes(test.labels))
    splits = DatasetSplits(name=name, train=train, test=test, eval_mode=eval_mode, query_mask=query_mask,
                           gallery_mask=gallery_mask, eval_recall_at=list(eval_recall_at), info=info,
                           eval_draws=eval_draws)
    return with_validation_split(splits, val_fraction, seed, val_transform=test_tf)


def file_transform(transform: Any = None, default_transform: str = "rrc_224",
                   **_: Any) -> tuple[Callable[[Image.Image], torch.Tensor], int]:
    """``(test transform, in_channels)`` that turns an RGB image file into the model input the dataset config's
    test split gives (its ``transform`` and ``default_transform``); dml-embed / dml-search read images with it."""
    from dml_runner.datasets.transforms import resolve_transforms

    return resolve_transforms(transform, default_transform)[1], 3


def split_at_class(paths: list[str], labels: np.ndarray,
                   first_test_class: int) -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    """The standard CUB / Cars split: classes below ``first_test_class`` train, the rest test."""
    is_train = labels < first_test_class
    train_idx, test_idx = np.flatnonzero(is_train), np.flatnonzero(~is_train)
    return [paths[i] for i in train_idx], labels[train_idx], [paths[i] for i in test_idx], labels[test_idx]


def build_class_split(dataset: str, train_paths: list[str], train_labels: np.ndarray, test_paths: list[str],
                      test_labels: np.ndarray, official: Mapping[str, int] | None, *, transform: Any,
                      default_transform: str, val_fraction: float, seed: int, skip_bad_images: bool,
                      verify_images: bool, eval_recall_at: list[int], info: dict[str, Any],
                      class_names: Mapping[int, str] | None = None) -> DatasetSplits:
    """The common tail of the leave-one-out datasets (CUB, Cars, SOP, folder): check images, count, assemble."""
    info = dict(info)
    info.setdefault("eval_protocol", "leave-one-out Recall@K over the test classes")
    train_paths, train_labels, _ = drop_bad_images(dataset, "train", train_paths, train_labels, skip_bad_images,
                                                   verify_images, info)
    test_paths, test_labels, _ = drop_bad_images(dataset, "test", test_paths, test_labels, skip_bad_images,
                                                 verify_images, info)
    found = basic_counts(train_labels, test_labels)
    if official is None:
        info["counts"] = found
    else:
        check_counts(dataset, found, official, info)
    train = ImageListDataset(train_paths, train_labels, name=dataset, class_names=class_names)
    test = ImageListDataset(test_paths, test_labels, name=dataset, class_names=class_names)
    return assemble(dataset, train, test, transform, default_transform, val_fraction, seed, info, eval_recall_at)


FIXTURE_SIZE = (40, 32)  # width, height of a fixture image: above nothing in particular; transforms upscale it


def write_jpeg(path: Path, label: int, index: int = 0, size: tuple[int, int] = FIXTURE_SIZE) -> Path:
    """A fixture JPEG whose mean colour is a function of ``label`` (plus per-image noise), so that a model can learn
    something on a fixture tree."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(label * 1009 + index)
    base = np.array([(label * 67) % 256, (label * 131) % 256, (label * 197) % 256], dtype=np.float64)
    pixels = base + rng.normal(0.0, 20.0, size=(size[1], size[0], 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, format="JPEG", quality=85)
    return path
