"""Per-query retrieval values against a brute-force ranking, and their means against evaluate()."""

from __future__ import annotations

import numpy as np
import pytest

from dml_runner.evaluation import evaluate
from dml_runner.evaluation.per_query import per_query_values


def brute_force(emb: np.ndarray, labels: np.ndarray, qmask=None, gmask=None, ks=(1, 2, 4)):
    """Full float64 distance matrix, ranking by (distance, gallery index), one query at a time."""
    n = len(labels)
    queries = np.arange(n) if qmask is None else np.flatnonzero(qmask)
    gallery = np.arange(n) if gmask is None else np.flatnonzero(gmask)
    out = {f"recall@{k}": [] for k in ks} | {"map@r": [], "r_precision": [], "reciprocal_rank": []}
    scored = []
    for q in queries:
        cand = gallery[gallery != q]
        d = ((emb[cand].astype(np.float64) - emb[q]) ** 2).sum(axis=1)
        order = cand[np.lexsort((cand, d))]
        rel = labels[order] == labels[q]
        r = int(rel.sum())
        if r == 0:
            continue
        scored.append(q)
        first = int(np.argmax(rel))
        for k in ks:
            out[f"recall@{k}"].append(float(first < k))
        top = rel[:r]
        precision = np.cumsum(top) / np.arange(1, r + 1)
        out["map@r"].append(float((precision * top).sum() / r))
        out["r_precision"].append(float(top.sum() / r))
        out["reciprocal_rank"].append(1.0 / (first + 1))
    return np.array(scored), {k: np.array(v) for k, v in out.items()}


def data(seed: int, n: int = 90, classes: int = 7, dim: int = 6, ties: bool = False):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    emb = rng.normal(size=(n, dim)).astype(np.float32)
    if ties:  # integer coordinates: many exactly equal distances, where the tie order decides
        emb = rng.integers(-1, 2, size=(n, dim)).astype(np.float32)
    labels[0] = 99  # a class of one: no positive, not scored
    return emb, labels


@pytest.mark.parametrize("ties", [False, True])
def test_leave_one_out_matches_brute_force(ties):
    emb, labels = data(0, ties=ties)
    got = per_query_values(emb, labels, recall_at=(1, 2, 4))
    scored, want = brute_force(emb, labels)
    np.testing.assert_array_equal(got.queries, scored)
    assert got.num_without_positive == 1
    for key, values in want.items():
        np.testing.assert_allclose(got.values[key], values, rtol=0, atol=1e-12, err_msg=key)


def test_query_gallery_matches_brute_force():
    emb, labels = data(1, n=120)
    rng = np.random.default_rng(2)
    qmask = rng.random(120) < 0.4
    gmask = ~qmask | (rng.random(120) < 0.2)  # some items are both query and gallery
    got = per_query_values(emb, labels, recall_at=(1, 4), query_mask=qmask, gallery_mask=gmask)
    scored, want = brute_force(emb, labels, qmask, gmask, ks=(1, 4))
    np.testing.assert_array_equal(got.queries, scored)
    for key, values in want.items():
        np.testing.assert_allclose(got.values[key], values, rtol=0, atol=1e-12, err_msg=key)


def test_means_are_the_reported_metrics():
    emb, labels = data(3, n=200, classes=10)
    got = per_query_values(emb, labels, recall_at=(1, 2)).means()
    reported = evaluate(emb, labels, recall_at=(1, 2), metrics=("recall", "map_at_r", "r_precision"))
    for key in ("recall@1", "recall@2", "map@r", "r_precision"):
        assert got[key] == pytest.approx(reported[key], abs=1e-12), key
