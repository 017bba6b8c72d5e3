"""k-means's assignment certified from neighbour lists (dml_runner/evaluation/kmeans.py, ``_assign_listed``)
against the float64 brute force: exact lists, a perturbed previous assignment, re-seeded empty clusters, and a
mutation (lists that break their bound must give wrong assignments)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dml_runner.evaluation.kmeans as km


def _data(seed: int = 0, n: int = 1200, k: int = 120, dim: int = 8, sep: float = 2.0):
    """k Gaussian blobs (unit noise, centres N(0, sep^2) per dimension) and their labels."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    x = rng.normal(size=(k, dim))[y] * sep + rng.normal(size=(n, dim))
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y)


def _lists(x: torch.Tensor, length: int, shrink: float = 1.0):
    """Exact top-``length`` neighbour lists (self excluded) and their bound: the next squared distance (times
    ``shrink``: < 1 keeps the guarantee, > 1 breaks it)."""
    xd = x.double()
    d2 = torch.cdist(xd, xd) ** 2
    d2.fill_diagonal_(float("inf"))
    vals, idx = torch.topk(d2, length + 1, largest=False)
    return idx[:, :length], vals[:, :length].float(), (vals[:, length] * shrink).float()


def _centroids(x: torch.Tensor, prev: torch.Tensor, k: int) -> torch.Tensor:
    c = torch.zeros(k, x.shape[1]).index_add_(0, prev, x)
    cnt = torch.bincount(prev, minlength=k)
    c[cnt > 0] /= cnt[cnt > 0, None].float()
    empty = (cnt == 0).nonzero().ravel()
    c[empty] = x[: empty.numel()]  # re-seeded on points, as Lloyd does
    return c


def _listed(xc, c, prev, neighbours, monkeypatch):
    """``_assign_listed`` with lists built as kmeans builds them; also the rows it sent to the full product."""
    full_rows = {"n": 0}
    real = km._assign

    def counting(x_aug, centroids, *a, **kw):
        if centroids.shape[0] == c.shape[0]:
            full_rows["n"] += x_aug.shape[0]
        return real(x_aug, centroids, *a, **kw)

    monkeypatch.setattr(km, "_assign", counting)
    lists = km._ReverseLists(neighbours, xc.shape[0], xc.device)
    got = km._assign_listed(xc, km.augment(xc, torch.float32), c, prev, lists, torch.float32, 512)
    return got, full_rows["n"]


def _brute(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return torch.cdist(x.double(), c.double()).argmin(1)


def _prev(y: torch.Tensor, k: int, seed: int, reassign: float) -> torch.Tensor:
    """The blob labels as the previous assignment, a fraction of them moved to random clusters."""
    gen = torch.Generator().manual_seed(seed)
    prev = y.clone()
    sel = torch.rand(y.shape[0], generator=gen) < reassign
    prev[sel] = torch.randint(k, (int(sel.sum()),), generator=gen)
    return prev


@pytest.mark.parametrize("reassign", [0.0, 0.1])
@pytest.mark.parametrize("loose", [4, 32])
def test_certified_assignment_equals_the_brute_force(monkeypatch, reassign, loose):
    x, y = _data(sep=6.0)
    k = 120
    xc = x - x.mean(0, keepdim=True)
    prev = _prev(y, k, 1, reassign)
    c = _centroids(xc, prev, k)
    monkeypatch.setattr(km, "LOOSE_CLUSTERS", loose)
    got, full_rows = _listed(xc, c, prev, _lists(xc, 16, 0.999), monkeypatch)
    assert torch.equal(got, _brute(xc, c))
    if reassign == 0:
        assert full_rows < xc.shape[0] // 4  # the lists settled most points without the full product


def test_empty_clusters_are_always_candidates(monkeypatch):
    x, y = _data(2)
    k = 120
    xc = x - x.mean(0, keepdim=True)
    prev = _prev(y, k, 3, 0.0)
    prev[prev >= 100] = 0  # clusters 100..119 lose their members; their centroids are re-seeded on points
    c = _centroids(xc, prev, k)
    monkeypatch.setattr(km, "LOOSE_CLUSTERS", 4)
    got, _ = _listed(xc, c, prev, _lists(xc, 12), monkeypatch)
    assert torch.equal(got, _brute(xc, c))


def test_lists_that_break_their_bound_give_wrong_assignments(monkeypatch):
    """The check can fail: bounds far above the true next distance certify points whose nearest centroid is
    not among their candidates."""
    x, y = _data(4)
    k = 120
    xc = x - x.mean(0, keepdim=True)
    prev = _prev(y, k, 5, 0.3)
    c = _centroids(xc, prev, k)
    monkeypatch.setattr(km, "LOOSE_CLUSTERS", 1)
    got, _ = _listed(xc, c, prev, _lists(xc, 2, 50.0), monkeypatch)
    assert not torch.equal(got, _brute(xc, c))


def test_kmeans_with_lists_matches_kmeans_without(monkeypatch):
    """Whole k-means with the lists (seeding and every assignment) against the same call without: equal cost and
    clusters up to float32 rounding of the seeding's weights."""
    from dml_runner.evaluation import nmi_from_assignments

    x, y = _data(6, n=3000, k=300)
    monkeypatch.setattr(km, "LOOSE_CLUSTERS", 16)
    c0, a0 = km.kmeans(x, 300, seed=0, precision="fp32")
    c1, a1 = km.kmeans(x, 300, seed=0, precision="fp32", neighbours=_lists(x, 16, 0.999))
    assert nmi_from_assignments(a1, a0) > 0.95
    inertia = lambda c, a: float(((x.numpy() - c[a]) ** 2).sum())  # noqa: E731
    assert inertia(c1, a1) == pytest.approx(inertia(c0, a0), rel=0.02)
    assert nmi_from_assignments(a1, y) == pytest.approx(nmi_from_assignments(a0, y), abs=0.02)


def test_a_singleton_cluster_is_its_members_candidate(monkeypatch):
    """A point alone in its cluster: its list never names it, yet its own centroid (itself) is nearest."""
    x, y = _data(sep=6.0)
    k = 121
    xc = x - x.mean(0, keepdim=True)
    prev = y.clone()
    prev[0] = 120
    c = _centroids(xc, prev, k)
    monkeypatch.setattr(km, "LOOSE_CLUSTERS", 4)
    got, full_rows = _listed(xc, c, prev, _lists(xc, 16, 0.999), monkeypatch)
    assert int(got[0]) == 120
    assert torch.equal(got, _brute(xc, c)) and full_rows < xc.shape[0] // 4


def test_a_wide_cluster_whose_members_are_all_far_keeps_its_point_uncertified(monkeypatch):
    """Cluster A: 16 points at +-5 e_i around the origin (centroid 0, spread 25), none in the origin's list (four
    points at distance 1, then one at 3). The origin's nearest centroid is A's, not its candidates': only the
    spread term (bound - tau) stops the lists from certifying the wrong one."""
    dim = 8
    eye = np.eye(dim)
    pts = [np.zeros(dim)] + [eye[i] for i in range(4)]  # cluster 0: the origin and four points at distance 1
    pts += [s * 5 * eye[i] for i in range(dim) for s in (1, -1)]  # cluster 1: the wide one
    pts += [np.r_[100.0, 50.0, [0.0] * (dim - 2)], np.r_[100.0, -50.0, [0.0] * (dim - 2)]]  # cluster 2: wider
    pts += [3 * eye[dim - 1]]  # cluster 3: a singleton
    x = torch.tensor(np.array(pts), dtype=torch.float32)
    prev = torch.tensor([0] * 5 + [1] * 16 + [2] * 2 + [3])
    c = _centroids(x, prev, 4)
    monkeypatch.setattr(km, "LOOSE_CLUSTERS", 1)
    got, _ = _listed(x, c, prev, _lists(x, 4, 0.999), monkeypatch)
    assert int(got[0]) == 1
    assert torch.equal(got, _brute(x, c))


def test_evaluate_hands_the_symmetric_search_lists_to_kmeans(monkeypatch):
    """Leave-one-out with the symmetric search: k-means gets its lists (and NMI matches the run without them);
    the float32 search keeps none."""
    from dml_runner.evaluation import evaluate

    x, y = _data(7, sep=6.0)
    x, y = x.numpy(), y.numpy()
    monkeypatch.setattr(km, "LOOSE_CLUSTERS", 8)
    calls = {"n": 0}
    real = km._assign_listed

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(km, "_assign_listed", counting)
    metrics = ("recall", "map_at_r", "nmi")
    with_lists = evaluate(x, y, metrics=metrics, device="cpu", backend="torch_symmetric")
    assert calls["n"] > 0
    calls["n"] = 0
    without = evaluate(x, y, metrics=metrics, device="cpu", backend="torch_fp32")
    assert calls["n"] == 0
    assert with_lists["nmi"] == pytest.approx(without["nmi"], abs=0.02)
    assert with_lists["map@r"] == pytest.approx(without["map@r"], abs=1e-9)


def test_points_with_more_candidates_than_kept_take_the_full_product(monkeypatch):
    x, y = _data(8, sep=6.0)
    k = 120
    xc = x - x.mean(0, keepdim=True)
    prev = _prev(y, k, 9, 0.0)
    c = _centroids(xc, prev, k)
    monkeypatch.setattr(km, "LOOSE_CLUSTERS", 4)
    monkeypatch.setattr(km, "CANDIDATES", 2)
    lists = _lists(xc, 16, 0.999)
    got, full_rows = _listed(xc, c, prev, lists, monkeypatch)
    assert torch.equal(got, _brute(xc, c))
    usable = lists[1] < lists[2][:, None]
    named = torch.cat([torch.where(usable, prev[lists[0]], prev[:, None]), prev[:, None]], dim=1)
    many = sum(int(torch.unique(row).numel() > 2) for row in named)
    assert 0 < many <= full_rows
