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
                 fix: str = "dataset.verify_images=true decodes every image before training; "
                                 "dataset.skip_bad_images=true leaves the unreadable ones out") -> None:
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


# The end-of-image marker a complete file of the format carries within its last bytes (a JPEG's entropy-coded data
# escape 0xFF, so 0xFFD9 marks the end only); a file cut short lacks it.
_END_MARKERS = {".jpg": b"\xff\xd9", ".jpeg": b"\xff\xd9", ".png": b"IEND"}
_TAIL_BYTES = 4096


def _intact(path: str) -> bool:
    """False for a missing file, an empty one, or a JPEG / PNG cut short (its end marker absent from its last bytes
    and PIL unable to decode it): a cheap check of every file, reading a few KB at its end, no decoding."""
    try:
        size = Path(path).stat().st_size
        marker = _END_MARKERS.get(Path(path).suffix.lower())
        if size == 0:
            return False
        if marker is None:
            return True
        with open(path, "rb") as f:
            f.seek(max(0, size - _TAIL_BYTES))
            if marker in f.read():
                return True
    except OSError:
        return False
    return _decodes(path)  # no end marker: bytes after it, or cut short? a full decode decides


def find_bad_images(paths: Sequence[str], decode: bool = False, workers: int = 8) -> list[str]:
    """Paths that do not exist or are cut short (a JPEG / PNG without its end marker that PIL cannot decode), and,
    with ``decode``, every path that PIL cannot fully decode."""
    check = _decodes if decode else _intact
    with ThreadPoolExecutor(max_workers=workers) as pool:  # file reads and PIL's decoding release the GIL
        ok = list(pool.map(lambda p: Path(p).is_file() and check(p), paths, chunksize=64))
    return [p for p, good in zip(paths, ok) if not good]


def data_root(paths: Sequence[str], info: Mapping[str, Any]) -> str:
    """The dataset's root as a message can name it: ``info["root"]``, else the folder the paths share."""
    import os

    if info.get("root"):
        return str(info["root"])
    try:
        return os.path.commonpath([str(Path(p).parent) for p in paths]) if paths else "<dataset.root>"
    except ValueError:  # paths on different drives
        return "<dataset.root>"


def drop_bad_images(dataset: str, split: str, paths: list[str], labels: np.ndarray, skip_bad_images: bool,
                    verify_images: bool, info: dict[str, Any]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Check every listed image up front (missing or cut short; with ``verify_images`` fully decoded); raise on
    them, or drop them with a warning naming the files when ``skip_bad_images``.

    Returns the kept paths, labels and the kept positions (indices into the input lists).
    """
    bad = find_bad_images(paths, decode=verify_images)
    keep = np.ones(len(paths), dtype=bool)
    if bad:
        what = "missing or unreadable" if verify_images else "missing or cut short"
        if not skip_bad_images:
            raise DMLRunnerError(
                f"dataset {dataset}: {len(bad)} {split} image(s) are {what}, e.g. {bad[0]}. Replace them "
                f"(`dml-prepare {dataset} {data_root(paths, info)}` lists them all), or set "
                f"dataset.skip_bad_images=true to leave them out (counted in results.json); "
                f"dataset.verify_images=true also decodes every image before training.")
        bad_set = set(bad)
        keep = np.array([p not in bad_set for p in paths], dtype=bool)
        skipped = info.setdefault("skipped_images", {})
        skipped[split] = skipped.get(split, 0) + len(bad)
        info.setdefault("skipped_examples", []).extend(bad[:5])
        log.warning("dataset %s: skipped %d %s %s image(s) (dataset.skip_bad_images=true): %s%s",
                    dataset, len(bad), what, split, ", ".join(bad[:5]), ", ..." if len(bad) > 5 else "")
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
               f"Check the download with `dml-prepare {dataset} {info.get('root') or '<dataset.root>'}`.")
    info["count_warning"] = message
    log.warning(message)
    warnings.warn(message, DatasetCountWarning, stacklevel=3)


def singleton_classes(labels: np.ndarray) -> int:
    """Number of classes with exactly one image (in leave-one-out retrieval such a query has no positive)."""
    _, counts = np.unique(labels, return_counts=True)
    return int((counts == 1).sum())


Transform = Callable[[Any], torch.Tensor]


def sized_transforms(transform: Any, default_transform: str,
                     image_size: int | None = None) -> tuple[Transform, Transform, str]:
    """``(train, test, name)`` of an image dataset: the transform group's (:func:`resolve_transforms`); with
    ``image_size`` (``dataset.image_size``) and no transform chosen, the default ``rrc_224`` at that side instead:
    RandomResizedCrop ``image_size`` + flip (train), resize + centre crop ``image_size`` (test)."""
    from dml_runner.datasets.transforms import resolve_transforms, rrc_224

    chosen = transform if isinstance(transform, Mapping) else {"train": transform, "test": transform}
    if image_size and (chosen.get("train") is not None or chosen.get("test") is not None):
        raise DMLRunnerError(f"dataset.image_size={image_size} sets the size of the default transform, but "
                             f"transform={chosen.get('name') or 'custom'} is chosen and sets its own; drop one of them")
    if image_size:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise DMLRunnerError(f"dataset.image_size={image_size}: the side in pixels of the crop, an integer >= 1, "
                                 "or null to fit it to the images")
        size = int(image_size)
        return (rrc_224(train=True, crop=size), rrc_224(train=False, crop=size, resize=size),
                f"rrc_224 at {size} px (dataset.image_size={size})")
    return resolve_transforms(transform, default_transform)


def check_test_split(name: str, test_labels: np.ndarray, query_mask: np.ndarray | None = None,
                     gallery_mask: np.ndarray | None = None) -> None:
    """Refuse a test split whose retrieval metrics would be trivial: fewer than two classes (every neighbour is a
    positive: 100% whatever the model), or no query with a positive in its searchable set (nothing to score)."""
    labels = np.asarray(test_labels)
    classes = np.unique(labels)
    fix = ("give the test split at least 2 classes with 2+ images each (more classes under dataset.root, or another "
           "split: dataset.split_file)")
    if classes.size < 2:
        raise DMLRunnerError(f"dataset {name}: the test split holds {classes.size} class(es), so every retrieved "
                             f"neighbour is a positive and every metric reads 100% whatever the model; {fix}")
    if query_mask is None or gallery_mask is None:
        _, counts = np.unique(labels, return_counts=True)
        scored = int((counts >= 2).sum())
    else:
        q, g = np.asarray(query_mask, bool), np.asarray(gallery_mask, bool)
        gallery_count = {c: n for c, n in zip(*np.unique(labels[g], return_counts=True))}
        # a query's positives: gallery items of its class, less itself where it is also in the gallery
        scored = sum(1 for i in np.flatnonzero(q) if gallery_count.get(labels[i], 0) - int(g[i]) > 0)
    if scored == 0:
        raise DMLRunnerError(f"dataset {name}: no test query has a positive to retrieve (every test class holds a "
                             f"single image{'' if query_mask is None else ' in the gallery'}), so no retrieval "
                             f"metric can be measured; {fix}")


def assemble(name: str, train: ImageListDataset, test: ImageListDataset, transform: Any, default_transform: str,
             val_fraction: float, seed: int, info: dict[str, Any], eval_recall_at: list[int],
             eval_mode: str = "loo", query_mask: np.ndarray | None = None,
             gallery_mask: np.ndarray | None = None,
             eval_draws: list[tuple[np.ndarray, np.ndarray]] | None = None,
             image_size: int | None = None) -> DatasetSplits:
    """Refuse a trivial test split, attach the train/test transforms, build the :class:`DatasetSplits` and hold out
    the validation classes."""
    check_test_split(name, test.labels, query_mask, gallery_mask)
    train_tf, test_tf, tf_name = sized_transforms(transform, default_transform, image_size)
    train.transform, test.transform = train_tf, test_tf
    root = data_root([*train.paths[:1], *test.paths[:1]], info)
    for split in (train, test):  # what a file that breaks during training says
        split.fix = (f"`dml-prepare {name} {root}` lists every unreadable image; dataset.verify_images=true "
                     f"decodes them all before training, dataset.skip_bad_images=true leaves them out")
    info["transform"] = tf_name
    info.setdefault("singleton_test_classes", singleton_classes(test.labels))
    splits = DatasetSplits(name=name, train=train, test=test, eval_mode=eval_mode, query_mask=query_mask,
                           gallery_mask=gallery_mask, eval_recall_at=list(eval_recall_at), info=info,
                           eval_draws=eval_draws)
    return with_validation_split(splits, val_fraction, seed, val_transform=test_tf)


def file_transform(transform: Any = None, default_transform: str = "rrc_224", image_size: int | None = None,
                   **_: Any) -> tuple[Callable[[Image.Image], torch.Tensor], int]:
    """``(test transform, in_channels)`` that turns an RGB image file into the model input the dataset config's
    test split gives (its ``transform``, ``default_transform`` and ``image_size``); dml-embed / dml-search read
    images with it."""
    return sized_transforms(transform, default_transform, image_size)[1], 3


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
                      class_names: Mapping[int, str] | None = None, image_size: int | None = None) -> DatasetSplits:
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
    return assemble(dataset, train, test, transform, default_transform, val_fraction, seed, info, eval_recall_at,
                    image_size=image_size)


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
