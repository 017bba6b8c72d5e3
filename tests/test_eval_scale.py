"""k-means (dml_runner/evaluation/kmeans.py) against brute-force oracles on every assignment precision, and the
memory model. Every precision runs on every CPU (bf16 products are emulated by torch where the CPU lacks them)."""

from __future__ import annotations

import importlib

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

kmeans_module = importlib.import_module("dml_runner.evaluation.kmeans")  # the module (to count its products)

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


# --- k-means++ rounds with neighbour lists (kmeanspp / kmeans ``neighbours=(idx, d2, bound)``) ---------------------


def _lists(x: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact neighbour lists by brute force (float64): each row's ``size`` nearest other rows, bound = the next
    distance (every row not listed is at least that far)."""
    d = ((x[:, None, :].astype(np.float64) - x[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    order = np.argsort(d, axis=1, kind="stable")
    idx = order[:, :size]
    bound = np.take_along_axis(d, order[:, size : size + 1], 1)[:, 0]
    return (torch.from_numpy(idx), torch.from_numpy(np.take_along_axis(d, idx, 1)).float(),
            torch.from_numpy(bound).float())


def _nearest_seed(x: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    return ((x[:, None, :].astype(np.float64) - x[seeds][None]) ** 2).sum(-1).argmin(1)


def _grid_blobs(k: int = 300, per: int = 5, d: int = 8, seed: int = 0) -> np.ndarray:
    """Small integers: every float32 distance (lists, products) is exact, so both paths must agree bit for bit."""
    rng = np.random.default_rng(seed)
    return (rng.integers(-6, 7, size=(k, d))[np.repeat(np.arange(k), per)] * 4
            + rng.integers(-1, 2, size=(k * per, d))).astype(np.float32)


def _seed(x, k, gen_seed=0, low=None, neighbours=None, rounds=None):
    xt = torch.from_numpy(x)
    x_aug = augment(xt, low) if low is not None else None
    s, a = kmeanspp(xt, k, torch.Generator().manual_seed(gen_seed), rounds=rounds, x_aug=x_aug, return_assign=True,
                    neighbours=neighbours)
    return s.numpy(), a.numpy()


def _count_product_rows(monkeypatch) -> list[int]:
    """Rows the rounds multiply against their new seeds (every _assign call of the seeding)."""
    rows: list[int] = []
    real = kmeans_module._assign

    def counting(x_aug, *args, **kwargs):
        rows.append(x_aug.shape[0])
        return real(x_aug, *args, **kwargs)

    monkeypatch.setattr(kmeans_module, "_assign", counting)
    return rows


@pytest.mark.parametrize("low", [None, torch.float32])
def test_neighbour_lists_give_the_same_seeding_with_fewer_products(low, monkeypatch):
    """Exact float32 data: the lists change which products run, not the D^2, draws, seeds or nearest seeds."""
    x = _grid_blobs()
    want = _seed(x, 300, low=low)
    rows = _count_product_rows(monkeypatch)
    got = _seed(x, 300, low=low, neighbours=_lists(x, 8))
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    assert np.array_equal(got[1], _nearest_seed(x, got[0]))
    if low is not None:  # the shortcut ran: far fewer rows multiplied than a full product per round
        full = len(rows) * x.shape[0]
        assert 0 < sum(rows) < 0.5 * full, (sum(rows), full)


@pytest.mark.parametrize("low", [None, torch.float32, torch.bfloat16])
def test_neighbour_lists_keep_every_point_on_its_nearest_seed(low):
    x, _ = _blobs(300, per=8, d=16, sep=1.0, seed=11)  # overlapping blobs: many seeds compete for each point
    seeds, assign = _seed(x, 300, low=low, neighbours=_lists(x, 12))
    assert np.unique(seeds).size == 300
    assert (assign == _nearest_seed(x, seeds)).mean() > (0.99 if low is torch.bfloat16 else 0.999)


def test_neighbour_list_entries_at_or_beyond_the_bound_are_ignored():
    x, _ = _blobs(300, per=6, d=16, sep=1.0, seed=12)
    n = x.shape[0]
    idx, d2, bound = _lists(x, 10)
    rng = np.random.default_rng(0)
    junk_idx = torch.from_numpy(rng.integers(-3, n + 3, size=(n, 6)))  # random rows, some out of range
    junk_d2 = torch.cat([bound[:, None].expand(n, 3), torch.full((n, 3), 1e30)], 1)  # d2 == bound, huge d2
    noisy = (torch.cat([junk_idx[:, :3], idx, junk_idx[:, 3:]], 1),
             torch.cat([junk_d2[:, :3], d2, junk_d2[:, 3:]], 1), bound)
    clean = _seed(x, 300, low=torch.float32, neighbours=(idx, d2, bound))
    got = _seed(x, 300, low=torch.float32, neighbours=noisy)
    assert np.array_equal(got[0], clean[0]) and np.array_equal(got[1], clean[1])
    # a bound no listed distance is below: nothing usable, exactly the run without lists
    for useless in (torch.zeros(n), torch.full((n,), -np.inf)):
        got = _seed(x, 300, low=torch.float32, neighbours=(idx, d2, useless))
        plain = _seed(x, 300, low=torch.float32)
        assert np.array_equal(got[0], plain[0]) and np.array_equal(got[1], plain[1])


@pytest.mark.parametrize("low", [None, torch.bfloat16])
def test_empty_neighbour_lists_change_nothing(low):
    x, _ = _blobs(300, per=6, d=16, sep=1.0, seed=13)
    n = x.shape[0]
    empty = (torch.full((n, 4), -1), torch.zeros(n, 4), torch.full((n,), np.inf))
    got, want = _seed(x, 300, low=low, neighbours=empty), _seed(x, 300, low=low)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_lists_that_break_the_bound_give_wrong_nearest_seeds():
    """The check above can fail: lists of the farthest points with bound = +inf claim far seeds are the nearest."""
    x, _ = _blobs(300, per=6, d=16, sep=1.0, seed=14)
    n = x.shape[0]
    d = ((x[:, None, :].astype(np.float64) - x[None]) ** 2).sum(-1)
    far = np.argsort(-d, axis=1)[:, :40]
    wrong = (torch.from_numpy(far), torch.from_numpy(np.take_along_axis(d, far, 1)).float(),
             torch.full((n,), np.inf))
    seeds, assign = _seed(x, 300, low=torch.float32, neighbours=wrong)
    assert (assign != _nearest_seed(x, seeds)).any()
    seeds, assign = _seed(x, 300, low=torch.float32, neighbours=_lists(x, 40))
    assert (assign == _nearest_seed(x, seeds)).mean() > 0.999


@PRECISIONS
def test_kmeans_with_neighbour_lists_recovers_many_blobs(precision):
    x, y = _blobs(300, per=10, d=16, sep=10.0, seed=15)
    _, a = kmeans(x, 300, seed=0, precision=precision, neighbours=_lists(x, 20))
    assert nmi_from_assignments(a, y) > 0.99


def test_bad_neighbour_lists_are_refused():
    x = np.zeros((10, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="neighbours"):
        kmeans(x, 3, neighbours=(torch.zeros(10, 3, dtype=torch.int64), torch.zeros(10, 4), torch.zeros(10)))
    with pytest.raises(ValueError, match="neighbours"):
        kmeans(x, 3, neighbours=(torch.zeros(10, 3), torch.zeros(10, 3), torch.zeros(10)))
