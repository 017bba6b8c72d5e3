"""Fast paths of the evaluation engine against brute-force oracles: bf16 k-means pieces and the memory model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dml_runner.evaluation import estimate_memory_bytes, evaluate
from dml_runner.evaluation.kmeans import BLOCK, _assign, block_argmax, torch_kmeans


def test_block_argmax_matches_first_argmax_with_ties():
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 5, (300, 4 * BLOCK), generator=g).float()  # many exact ties
    want = np.array([np.flatnonzero(row == row.max())[0] for row in s.numpy()])
    assert np.array_equal(block_argmax(s).numpy(), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_assignment_matches_brute_force_nearest_centroid(dtype):
    rng = np.random.default_rng(1)
    centroids = rng.normal(size=(70, 32)).astype(np.float32) * 4
    x = (centroids[rng.integers(0, 70, 500)] + 0.3 * rng.normal(size=(500, 32))).astype(np.float32)
    d = ((x[:, None, :].astype(np.float64) - centroids[None]) ** 2).sum(-1)
    want = d.argmin(1)
    x_aug = torch.cat([torch.from_numpy(x), torch.ones(500, 1)], 1).to(dtype)
    got = _assign(x_aug, torch.from_numpy(centroids), dtype, chunk=128).numpy()
    assert np.array_equal(got, want)


def test_torch_kmeans_is_a_lloyd_fixed_point_and_recovers_clusters():
    rng = np.random.default_rng(2)
    y = np.repeat(np.arange(12), 25)
    x = (rng.normal(size=(12, 16))[y] * 10 + rng.normal(size=(300, 16))).astype(np.float32)
    assign, iters = torch_kmeans(x, 12, seed=0, iters=100, tol=0.0, dtype=torch.float32)
    means = np.stack([x[assign == k].mean(0) for k in np.unique(assign)])
    ids = np.unique(assign)
    nearest = ids[((x[:, None] - means[None]) ** 2).sum(-1).argmin(1)]
    assert np.array_equal(nearest, assign) and iters < 100
    r = evaluate(x, y, metrics=("nmi", "f1"), device="cpu", seed=0)
    assert r["nmi"] > 0.9


def test_kmeans_backends_agree_on_easy_data():
    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(5), 40)
    x = (rng.normal(size=(5, 8))[y] * 20 + rng.normal(size=(200, 8))).astype(np.float32)
    a = evaluate(x, y, metrics=("nmi", "f1"), device="cpu", kmeans_backend="torch")
    b = evaluate(x, y, metrics=("nmi", "f1"), device="cpu", kmeans_backend="faiss")
    # Both are Lloyd from random seeds: either may stop in a local optimum (two seeds in one class) on 5 classes.
    assert a["nmi"] > 0.8 and b["nmi"] > 0.8


def test_memory_estimate_is_linear_in_n():
    e = [estimate_memory_bytes(n, 512, num_classes=n // 5) for n in (20_000, 40_000, 80_000, 160_000)]
    steps = np.diff(e)
    assert np.all(steps > 0) and steps[2] == pytest.approx(2 * steps[1], rel=0.05)
