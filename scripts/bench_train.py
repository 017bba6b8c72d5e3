#!/usr/bin/env python
"""Training-input throughput on a generated CUB-shaped tree of photo-like JPEGs (500x375 and 800x533).

    python scripts/bench_train.py                         # 200 images, 1 worker, every paper transform
    python scripts/bench_train.py --images 2000 --workers 1 4 --json bench_train.json
    python scripts/bench_train.py --data /tmp/cubtree     # generate into (or reuse) that directory

(a) loader images/s per worker for each paper transform (train and test side): our dataset with the decoded cache
    on (``dataset.cache=auto``) and off (``dataset.cache=none``), against a plain torchvision pipeline (a Dataset
    that opens each file with PIL and applies the same torchvision transforms). The cache is built before timing
    (its build time is reported separately); every setting reads the whole set once as a warm-up (the page cache
    then holds the files and the cache) and is timed over ``--epochs`` further epochs.
(c) images/s of an evaluation embedding pass (torchvision resnet18, random init, eval mode, batch 32, 224 px
    centre crops read through the cached test loader), on CPU unless ``--device cuda``.

Prints the CPU model and flags, a Markdown table, and writes JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

SIZES = ((500, 375), (800, 533))  # CUB's typical 500-px photos and a larger camera-like size


# ------------------------------------------------------------------------------------------------ the data

def photo_like(width: int, height: int, rng: np.random.Generator, white_background: bool = False) -> Image.Image:
    """A photo-like RGB image: smooth colour regions (bicubic-upsampled coarse noise), finer texture and sensor
    noise; with ``white_background``, an object (ellipse) on a white page, as product photos (SOP) and some
    CUB images look, so that lifted_227's crop to content has something to crop."""
    coarse = rng.integers(0, 256, (max(2, height // 50), max(2, width // 50), 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
    fine = rng.integers(0, 256, (max(2, height // 5), max(2, width // 5), 3), dtype=np.uint8)
    texture = np.asarray(Image.fromarray(fine).resize((width, height), Image.BILINEAR), dtype=np.float32)
    pixels = 0.75 * base + 0.25 * texture + rng.normal(0.0, 4.0, (height, width, 3))
    if white_background:
        yy, xx = np.mgrid[0:height, 0:width]
        cy, cx = rng.uniform(0.35, 0.65) * height, rng.uniform(0.35, 0.65) * width
        ry, rx = rng.uniform(0.2, 0.35) * height, rng.uniform(0.2, 0.35) * width
        outside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 > 1.0
        pixels[outside] = 255.0
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_tree(parent: Path, images: int, seed: int = 0, classes: int = 10) -> tuple[list[str], np.ndarray]:
    """A CUB_200_2011 tree (the fixtures' layout) whose files are photo-like JPEGs, half 500x375, half 800x533
    (alternating), every third on a white background. Returns (paths, labels) in images.txt order; an existing
    tree with the same number of images is reused."""
    from dml_runner.datasets.fixtures import make_cub200

    root = Path(parent) / "CUB_200_2011"
    per_class = -(-images // classes)
    listed = root / "images.txt"
    if not (listed.is_file() and len(listed.read_text().split("\n")) - 1 == classes * per_class):
        root = make_cub200(Path(parent), classes=range(1, classes + 1), per_class=per_class, size=(8, 8))
        rng = np.random.default_rng(seed)
        for k, line in enumerate(listed.read_text().split("\n")[:-1]):
            w, h = SIZES[k % len(SIZES)]
            photo_like(w, h, rng, white_background=k % 3 == 2).save(root / "images" / line.split(" ", 1)[1],
                                                                      format="JPEG", quality=90)
    rows = [line.split(" ", 1) for line in listed.read_text().split("\n")[:-1]]
    labels = np.array([int(line.split()[1]) for line in (root / "image_class_labels.txt").read_text().split("\n")[:-1]])
    paths = [str(root / "images" / rel) for _, rel in rows]
    return paths[:images], labels[:images]
