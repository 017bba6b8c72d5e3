"""k-means (dml_runner/evaluation/kmeans.py) against brute-force oracles on every assignment precision, and the
memory model. Every precision runs on every CPU (bf16 products are emulated by torch where the CPU lacks them)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dml_runner.evaluation import estimate_memory_bytes, evaluate, nmi_from_assignments
from dml_runner.evaluation.kmeans import (
    ARGMAX_BLOCK,
    _assign,
    _draw,
    augment,
    block_argmax,
    kmeans,
    kmeanspp,
    torch_kmeans,
)

PRECISIONS = pytest.mark.parametrize("precision", ["fp32", "bf16"])


def _blobs(k: int, per: int = 25, d: int = 16, sep: float = 10.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(k), per)
    return (rng.normal(size=(k, d))[y] * sep + rng.normal(size=(k * per, d))).astype(np.float32), y


def test_block_argmax_matches_first_argmax_with_ties():
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 5, (300, 4 * ARGMAX_BLOCK), generator=g).float()  # many exact ties
    want = np.array([np.flatnonzero(row == row.max())[0] for row in s.numpy()])
    assert np.array_equal(block_argmax(s).numpy(), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_assignment_matches_brute_force_nearest_centroid(dtype):
    rng = np.random.default_rng(1)
    centroids = rng.normal(size=(70, 32)).astype(np.float32) * 4
    x = (centroids[rng.integers(0, 70, 500)] + 0.3 * rng.normal(size=(500, 32))).astype(np.float32)
    d = ((x[:, None, :].astype(np.float64) - centroids[None]) ** 2).sum(-1)
    want = d.argmin(1)
    got = _assign(augment(torch.from_numpy(x), dtype), torch.from_numpy(centroids), dtype, chunk=128).numpy()
    assert np.array_equal(got, want)


def test_bf16_assignment_keeps_the_norm_term_accurate():
    """Large offsets: |c|^2 / 2 ~ 1e4 must not round away differences of ~10 (a one-part bf16 term would)."""
    rng = np.random.default_rng(4)
    centroids = (rng.normal(size=(8, 4)) + 100.0).astype(np.float32)
    x = (centroids[rng.integers(0, 8, 400)] + 0.05 * rng.normal(size=(400, 4))).astype(np.float32)
    want = ((x[:, None, :].astype(np.float64) - centroids[None]) ** 2).sum(-1).argmin(1)
    got = kmeans(x, 8, seed=0, precision="bf16")[1]
    assert nmi_from_assignments(got, want) > 0.99


def test_draw_is_proportional_to_the_weights():
    gen = torch.Generator().manual_seed(0)
    picks = _draw(torch.tensor([0.0, 1.0, 3.0]), 20_000, gen).numpy()
    freq = np.bincount(picks, minlength=3) / picks.size
    assert freq[0] == 0 and freq[2] == pytest.approx(0.75, abs=0.02)
    uniform = np.bincount(_draw(torch.zeros(4), 20_000, gen).numpy(), minlength=4) / 20_000
    assert np.allclose(uniform, 0.25, atol=0.02)


@pytest.mark.parametrize("rounds, low", [(None, None), (5, None), (5, torch.bfloat16), (5, torch.float32)])
def test_kmeanspp_puts_one_seed_in_every_far_blob(rounds, low):
    """Blobs 100 sigma apart: D^2 sampling never picks a covered blob; rounds=5 (8 draws per round) keeps that
    through the in-round acceptance (without it: 31-35 of 40 blobs covered), with float32 or bf16 products."""
    x, y = _blobs(40, per=10, sep=100.0, seed=1)
    xt = torch.from_numpy(x)
    x_aug = augment(xt, low) if low is not None else None
    init = kmeanspp(xt, 40, torch.Generator().manual_seed(0), rounds=rounds, x_aug=x_aug).numpy()
    assert init.size == 40 and np.unique(init).size == 40
    covered = np.unique(y[init]).size
    assert covered == 40 if rounds is None else covered >= 38


@pytest.mark.parametrize("rounds, low", [(None, None), (7, None), (7, torch.float32), (7, torch.bfloat16)])
def test_seeding_assigns_every_point_to_its_nearest_seed(rounds, low):
    """The seeding's by-product (Lloyd's first assignment) is the brute-force nearest seed."""
    x, _ = _blobs(30, per=12, sep=3.0, seed=8)
    xt = torch.from_numpy(x)
    init, assign = kmeanspp(xt, 30, torch.Generator().manual_seed(2), rounds=rounds, return_assign=True,
                            x_aug=augment(xt, low) if low is not None else None)
    seeds = x[init.numpy()]
    d = ((x[:, None, :].astype(np.float64) - seeds[None]) ** 2).sum(-1)
    assert (assign.numpy() == d.argmin(1)).mean() > 0.99  # rounding (bf16 above all) may flip near-ties


def test_duplicated_points_with_many_clusters_terminate():
    """k above GREEDY_MAX_K with few distinct points: all D^2 reach 0, the rounds still finish."""
    x = np.repeat(np.eye(4, dtype=np.float32), 100, axis=0)
    c, a = kmeans(x, 300, seed=0, niter=5)
    assert c.shape == (300, 4) and np.unique(a).size == 4


@PRECISIONS
def test_lloyd_reaches_a_fixed_point_and_recovers_clusters(precision):
    x, y = _blobs(12, seed=2)
    assign, iters = torch_kmeans(x, 12, seed=0, iters=100, tol=0.0,
                                 dtype=torch.float32 if precision == "fp32" else torch.bfloat16)
    assert iters < 100
    assert nmi_from_assignments(assign, y) > 0.99
    if precision == "fp32":  # exact argmin: the assignments are those of their own means
        ids = np.unique(assign)
        means = np.stack([x[assign == k].mean(0) for k in ids])
        nearest = ids[((x[:, None] - means[None]) ** 2).sum(-1).argmin(1)]
        assert np.array_equal(nearest, assign)


@PRECISIONS
@pytest.mark.parametrize("k, sep", [(5, 20.0), (12, 10.0), (30, 10.0)])
def test_well_separated_blobs_are_recovered_for_every_seed(precision, k, sep):
    """Greedy k-means++ seeds every blob; random seeding (the former init) failed here (NMI 0.69-0.90)."""
    for seed in range(4):
        x, y = _blobs(k, sep=sep, seed=seed + 3, d=8 if k == 5 else 16)
        r = evaluate(x, y, metrics=("nmi", "f1"), device="cpu", seed=seed, kmeans_precision=precision)
        assert r["nmi"] > 0.99 and r["f1"] > 0.98, (seed, r)


def test_faiss_backend_runs_through_the_same_api():
    x, y = _blobs(5, per=40, d=8, sep=20.0, seed=3)
    c, a = kmeans(x, 5, seed=0, backend="faiss")
    assert c.shape == (5, 8) and a.shape == (200,) and a.min() >= 0 and a.max() < 5
    assert nmi_from_assignments(a, y) > 0.6  # random seeding: may merge two blobs, not more


def test_api_returns_consistent_centroids_for_numpy_and_torch_inputs():
    x, y = _blobs(6, seed=5)
    c, a = kmeans(x, 6, seed=1, niter=30, precision="fp32")
    assert c.dtype == np.float32 and c.shape == (6, 16) and a.dtype == np.int64
    d = ((x[:, None, :].astype(np.float64) - c[None]) ** 2).sum(-1)
    assert np.array_equal(d.argmin(1), a)  # returned assignments belong to the returned centroids
    c2, a2 = kmeans(torch.from_numpy(x), 6, seed=1, niter=30, precision="fp32")
    assert np.array_equal(a, a2) and np.allclose(c, c2)


def test_nredo_keeps_the_lowest_cost_run():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(300, 4)).astype(np.float32)  # no structure: runs end in different optima

    def cost(c, a):
        return float(((x - c[a]) ** 2).sum())

    single = [cost(*kmeans(x, 9, seed=s, precision="fp32")) for s in range(3)]
    best = cost(*kmeans(x, 9, seed=0, nredo=3, precision="fp32"))
    assert best == pytest.approx(min(single), rel=1e-6)


def test_more_clusters_than_distinct_points_and_bad_options():
    x = np.repeat(np.eye(3, dtype=np.float32), 4, axis=0)
    c, a = kmeans(x, 5, seed=0, niter=10)
    assert np.isfinite(c).all() and a.min() >= 0 and a.max() < 5
    assert np.unique(a).size == 3  # every distinct point is its own cluster
    with pytest.raises(ValueError, match="backend"):
        kmeans(x, 2, backend="sklearn")
    with pytest.raises(ValueError, match="precision"):
        kmeans(x, 2, precision="fp16")
    with pytest.raises(ValueError, match="niter"):
        kmeans(x, 2, niter=0)


def test_memory_estimate_is_linear_in_n():
    e = [estimate_memory_bytes(n, 512, num_classes=n // 5) for n in (20_000, 40_000, 80_000, 160_000)]
    steps = np.diff(e)
    assert np.all(steps > 0) and steps[2] == pytest.approx(2 * steps[1], rel=0.05)
