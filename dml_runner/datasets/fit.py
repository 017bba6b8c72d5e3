"""A dataset of your own fits the run to its images before anything is built: the crop size and the batch.

A dataset config that has the keys ``fit`` and ``fitted`` and whose module offers ``training_images(**config)``
(``dataset=folder``, ``dataset=csv``) is measured cheaply: the class counts of its training split, and the sizes and
modes of a seeded sample of its images read from the file headers only (PIL opens a file lazily). From them
:func:`fit_run_config` chooses, for every value the command line did not set:

- ``dataset.image_size``: the crop side of the default transform, the median shorter side of the images, at most
  224 (the default transform's own crop; larger images keep it); left alone when a transform is chosen;
- the batch: P classes x K images, K (``sampler.samples_per_class``) at most 4 and at most the images of the
  poorest training class (at least 2), P at most 16 and at most the training classes (``trainer.batch_size``
  = P x K); for the N-pair sampler N classes x 2.

It logs one line saying what it chose and how to override it, and writes the choice to ``dataset.fitted`` (the
dataset records it in results.json, ``dataset.info.fit``). ``dataset.fit=false`` turns it off.
:func:`warn_thin_classes` warns, for any dataset, when a class-balanced batch asks more images of a class than it
holds.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

HEADER_SAMPLE = 64          # images whose headers are read
MAX_CROP = 224              # the default transform's crop: larger images keep it
MAX_SAMPLES_PER_CLASS = 4   # the class_balanced sampler's default K
MIN_SAMPLES_PER_CLASS = 2   # a positive pair per class and batch
MAX_CLASSES_PER_BATCH = 16  # 16 x 4 = the default batch of 64
MAX_NPAIR_CLASSES = 32      # 32 x 2 = the default batch of 64
GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}
OVERRIDE_HINT = ("override with dataset.image_size=N or transform=<name>, trainer.batch_size=N, "
                 "sampler.samples_per_class=K, or dataset.fit=false")


def header_sizes(paths: Sequence[str], n: int = HEADER_SAMPLE, seed: int = 0) -> list[tuple[int, int, str]]:
    """``(width, height, mode)`` of up to ``n`` of ``paths`` (a seeded sample), from the headers alone; unreadable
    files are skipped (the dataset's own check names them)."""
    from PIL import Image

    picked = np.random.default_rng(seed).permutation(len(paths))[:n]
    out = []
    for i in sorted(picked):
        try:
            with Image.open(paths[i]) as image:
                out.append((int(image.width), int(image.height), str(image.mode)))
        except Exception:  # noqa: BLE001 - a broken file is reported by the dataset's up-front check
            continue
    return out


def user_keys(hydra_meta: dict[str, Any] | None) -> set[str]:
    """The config keys (``trainer.batch_size``) and groups (``transform``) the command line set."""
    from dml_runner.rundir import split_override

    return {split_override(o)[0] for o in (hydra_meta or {}).get("overrides", [])}


def _set_by_user(keys: set[str], key: str) -> bool:
    return any(k == key or k.startswith(f"{key}.") for k in keys)


def choose_batch(counts: np.ndarray, batch_size: int, samples_per_class: int | None, batch_by_user: bool,
                 k_by_user: bool, npair: bool) -> tuple[int, int | None]:
    """``(batch_size, samples_per_class)`` for training classes holding ``counts`` images each (see the module)."""
    classes, fewest = int(counts.size), int(counts.min())
    if npair:
        return (batch_size if batch_by_user else 2 * min(classes, MAX_NPAIR_CLASSES)), None
    if samples_per_class is None:  # a sampler without classes x images batches: at most the training images
        return (batch_size if batch_by_user else min(batch_size, int(counts.sum()))), None
    fitted_k = min(MAX_SAMPLES_PER_CLASS, max(MIN_SAMPLES_PER_CLASS, fewest))
    if batch_by_user and k_by_user:
        return batch_size, samples_per_class
    if batch_by_user:  # the largest fitting K that divides the batch
        k = next((k for k in range(fitted_k, 0, -1) if batch_size % k == 0), samples_per_class)
        return batch_size, k
    k = samples_per_class if k_by_user else fitted_k
    return k * max(1, min(classes, MAX_CLASSES_PER_BATCH)), k


def fit_run_config(cfg: Any, hydra_meta: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Fit ``cfg`` (a composed run config, changed in place) to the dataset's images; returns what was chosen, or
    None when the dataset does not fit itself."""
    from omegaconf import OmegaConf, open_dict

    node = cfg.get("dataset")
    if node is None or "fitted" not in node or not node.get("fit") or not isinstance(node.get("_target_"), str):
        return None
    module = importlib.import_module(node["_target_"].rsplit(".", 1)[0])
    lister = getattr(module, "training_images", None)
    if lister is None:
        return None
    settings = OmegaConf.to_container(node, resolve=True)
    paths, labels = lister(**{k: v for k, v in settings.items() if not str(k).startswith("_")})
    if not len(paths):
        return None  # the dataset's build names what is missing
    keys = user_keys(hydra_meta)
    _, counts = np.unique(labels, return_counts=True)
    folds = int(settings.get("folds") or 0)
    if folds >= 2:  # a fold model trains without its validation fold: fit the batch to the fewest classes left
        counts = np.sort(counts)[:max(1, counts.size - -(-counts.size // folds))]
    sizes = header_sizes(paths)
    chosen: dict[str, Any] = {"train_images": len(paths), "train_classes": int(counts.size),
                              "fewest_images_per_class": int(counts.min()), "headers_read": len(sizes)}
    said = []
    if sizes:
        widths, heights = np.array([s[0] for s in sizes]), np.array([s[1] for s in sizes])
        grey = all(s[2] in GREY_MODES for s in sizes)
        chosen.update(median_width=int(np.median(widths)), median_height=int(np.median(heights)), grey=grey)
        said.append(f"images ~{chosen['median_width']}x{chosen['median_height']}"
                    + (" grey (read as 3 equal channels)" if grey else ""))
    # the crop size
    transform = cfg.get("transform") or {}
    transform_chosen = _set_by_user(keys, "transform") or transform.get("train") is not None \
        or transform.get("test") is not None
    if node.get("image_size") is not None or _set_by_user(keys, "dataset.image_size"):
        chosen.update(image_size=node.get("image_size"), image_size_by="you")
        said.append(f"crop {node.get('image_size')} px (yours)")
    elif transform_chosen:
        chosen.update(image_size=None, image_size_by="transform")
        said.append(f"transform={transform.get('name') or 'custom'} (yours)")
    elif sizes:
        side = int(min(MAX_CROP, np.median(np.minimum(widths, heights))))
        chosen.update(image_size=side, image_size_by="fit")
        said.append(f"crop {side} px")
        if side < MAX_CROP:
            with open_dict(cfg):
                cfg.dataset.image_size = side
    # the batch
    sampler = cfg.get("sampler") or {}
    k_now = sampler.get("samples_per_class")
    npair = str(sampler.get("_target_", "")).endswith("NPairBatchSampler")
    batch_by_user, k_by_user = _set_by_user(keys, "trainer.batch_size"), _set_by_user(keys, "sampler.samples_per_class")
    batch, k = choose_batch(counts, int(cfg.trainer.batch_size), None if k_now is None else int(k_now), batch_by_user,
                            k_by_user, npair)
    cfg.trainer.batch_size = batch
    if k is not None and k_now is not None:
        cfg.sampler.samples_per_class = k
    per_class = 2 if npair else k
    chosen.update(batch_size=batch, samples_per_class=per_class, batch_by="you" if batch_by_user else "fit")
    shape = f" = {batch // per_class} classes x {per_class} images" if per_class and batch % per_class == 0 else ""
    said.append(f"batch {batch}{shape}" + (" (yours)" if batch_by_user else ""))
    with open_dict(cfg):
        cfg.dataset.fitted = chosen
    log.info("dataset fitted to %d training images of %d classes (fewest %d per class): %s; %s",
             len(paths), counts.size, counts.min(), ", ".join(said), OVERRIDE_HINT)
    return chosen


def check_built(data: Any, cfg: Any) -> None:
    """What a built dataset (any, plug-ins too) is checked for before training: a test split with trivial metrics
    is refused (:func:`~dml_runner.datasets.images.check_test_split`), thin classes warned of
    (:func:`warn_thin_classes`)."""
    from dml_runner.datasets.images import check_test_split

    check_test_split(data.name, data.test.labels, data.query_mask, data.gallery_mask)
    warn_thin_classes(data.train.labels, cfg)


def warn_thin_classes(labels: np.ndarray, cfg: Any) -> str | None:
    """One warning (logged and returned) when ``sampler.samples_per_class`` is above the images of some training
    classes: their share of every batch repeats images."""
    sampler = cfg.get("sampler") or {}
    k = sampler.get("samples_per_class")
    if k is None:
        return None
    _, counts = np.unique(np.asarray(labels), return_counts=True)
    thin = int((counts < int(k)).sum())
    if not thin:
        return None
    message = (f"sampler.samples_per_class={k} is above the images of {thin} of {counts.size} training classes "
               f"(fewest: {int(counts.min())}): their {k} images per batch repeat the same images; lower it to "
               f"{max(1, int(counts.min()))} for batches without duplicates")
    log.warning(message)
    return message
