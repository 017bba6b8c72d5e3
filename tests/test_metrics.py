"""Every metric against brute-force numpy oracles (full distance matrix, loops) on small cases."""

from __future__ import annotations

import numpy as np
import pytest

from dml_runner.evaluation import evaluate, f1_from_assignments, kmeans_assignments, nmi_from_assignments

KS = (1, 2, 3, 5, 10)


def brute_retrieval(x, y, qmask=None, gmask=None, ks=KS):
    """Full float64 distance matrix; ranking by (distance, gallery index); loops over queries."""
    n = len(y)
    if qmask is None:
        qmask = gmask = np.ones(n, dtype=bool)
    g_idx = np.flatnonzero(gmask)
    d = ((x[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(-1)
    hits, maps, rps, skipped = {k: [] for k in ks}, [], [], 0
    for q in np.flatnonzero(qmask):
        cand = g_idx[g_idx != q]
        order = cand[np.lexsort((np.arange(len(cand)), d[q, cand]))]
        rel = y[order] == y[q]
        r = int(rel.sum())
        if r == 0:
            skipped += 1
            continue
        first = int(np.argmax(rel))
        for k in ks:
            hits[k].append(first < k)
        top = rel[:r]
        prec = np.cumsum(top) / np.arange(1, r + 1)
        maps.append(float((prec * top).sum() / r))
        rps.append(float(top.sum() / r))
    out = {f"recall@{k}": float(np.mean(hits[k])) for k in ks}
    out.update({"map@r": float(np.mean(maps)), "r_precision": float(np.mean(rps)),
                "num_queries": float(len(maps)), "num_queries_without_positive": float(skipped)})
    return out


def brute_f1(assign, labels):
    n = len(labels)
    same_c = assign[:, None] == assign[None, :]
    same_y = labels[:, None] == labels[None, :]
    off = ~np.eye(n, dtype=bool)
    tp = (same_c & same_y & off).sum()
    p, r = tp / (same_c & off).sum(), tp / (same_y & off).sum()
    return 0.0 if tp == 0 else 2 * p * r / (p + r)


def brute_nmi(assign, labels):
    """NMI with arithmetic normalisation from entropies computed by loops."""
    n = len(labels)
    def h(v):
        _, c = np.unique(v, return_counts=True)
        p = c / n
        return -(p * np.log(p)).sum()
    mi = 0.0
    for a in np.unique(assign):
        for b in np.unique(labels):
            nab = np.sum((assign == a) & (labels == b))
            if nab:
                mi += nab / n * np.log(n * nab / (np.sum(assign == a) * np.sum(labels == b)))
    denom = (h(assign) + h(labels)) / 2
    return 1.0 if denom == 0 else mi / denom


def _check(got, want, tol=1e-9):
    for key, val in want.items():
        assert got[key] == pytest.approx(val, abs=tol), key


def _data(seed, n=120, d=6, classes=15, integer=False):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    if integer:  # small integers: float32 distances are exact, so duplicates give exact ties
        x = rng.integers(0, 3, size=(n, d)).astype(np.float32)
    else:
        x = (rng.normal(size=(classes, d))[y] * 0.8 + rng.normal(size=(n, d))).astype(np.float32)
    return x, y


RETRIEVAL = ("recall", "map_at_r", "r_precision")
# both exact torch searches, whichever one "torch" picks on this machine
TORCH_BACKENDS = pytest.mark.parametrize("backend", ["torch_screened", "torch_fp32"])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("integer", [False, True])
@TORCH_BACKENDS
def test_loo_matches_brute_force(seed, integer, backend):
    x, y = _data(seed, integer=integer)
    got = evaluate(x, y, recall_at=KS, metrics=RETRIEVAL, device="cpu", chunk_size=37, backend=backend)
    _check(got, brute_retrieval(x, y))


@TORCH_BACKENDS
def test_exact_ties_duplicates_and_singletons(backend):
    # Many exact duplicates across classes + singleton classes (excluded, counted).
    x = np.repeat(np.eye(4, dtype=np.float32), 6, axis=0)
    y = np.array([0, 1, 2, 0, 1, 2] * 4)
    x = np.vstack([x, np.zeros((3, 4), np.float32)])
    y = np.concatenate([y, [7, 8, 9]])
    got = evaluate(x, y, recall_at=KS, metrics=RETRIEVAL, device="cpu", chunk_size=5, backend=backend)
    want = brute_retrieval(x, y)
    assert want["num_queries_without_positive"] == 3
    _check(got, want)


@pytest.mark.parametrize("seed", [3, 4])
@pytest.mark.parametrize("integer", [False, True])
@TORCH_BACKENDS
def test_query_gallery_with_overlap(seed, integer, backend):
    x, y = _data(seed, n=150, integer=integer)
    rng = np.random.default_rng(seed)
    q = rng.random(150) < 0.5
    g = (rng.random(150) < 0.6) | ~q  # overlap: some items in both
    assert (q & g).any()
    got = evaluate(x, y, recall_at=KS, metrics=RETRIEVAL, query_mask=q, gallery_mask=g, device="cpu", chunk_size=16,
                   backend=backend)
    want = brute_retrieval(x, y, q, g)
    _check(got, want)


@TORCH_BACKENDS
def test_query_without_positive_counted(backend):
    x, y = _data(5, n=60)
    q = np.zeros(60, bool)
    q[:10] = True
    g = ~q
    y = y.copy()
    y[0] = 999  # no positive anywhere in the gallery
    got = evaluate(x, y, metrics=RETRIEVAL, recall_at=KS, query_mask=q, gallery_mask=g, device="cpu", backend=backend)
    want = brute_retrieval(x, y, q, g)
    assert got["num_queries_without_positive"] >= 1
    _check(got, want)


@pytest.mark.parametrize("seed", [0, 1])
def test_f1_nmi_against_independent_computation(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 7, 200)
    assign = np.where(rng.random(200) < 0.6, labels, rng.integers(0, 9, 200)) * 3 + 5  # arbitrary ids
    assert f1_from_assignments(assign, labels) == pytest.approx(brute_f1(assign, labels), abs=1e-12)
    assert nmi_from_assignments(assign, labels) == pytest.approx(brute_nmi(assign, labels), abs=1e-10)


def test_f1_perfect_and_worst():
    y = np.array([0, 0, 1, 1, 2, 2])
    assert f1_from_assignments(y, y) == pytest.approx(1.0)
    assert f1_from_assignments(np.arange(6), y) == 0.0


def test_evaluate_clustering_uses_kmeans_assignments():
    rng = np.random.default_rng(7)
    y = rng.integers(0, 6, 300)
    x = (rng.normal(size=(6, 8))[y] * 6 + rng.normal(size=(300, 8))).astype(np.float32)
    got = evaluate(x, y, metrics=("nmi", "f1"), device="cpu", seed=3, kmeans_iters=20)
    assign = kmeans_assignments(x, 6, seed=3, iters=20)
    assert got["nmi"] == pytest.approx(nmi_from_assignments(assign, y), abs=1e-12)
    assert got["f1"] == pytest.approx(f1_from_assignments(assign, y), abs=1e-12)
    assert got["nmi"] > 0.5  # well-separated classes cluster well


def test_against_pytorch_metric_learning():
    amod = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    import torch

    x, y = _data(11, n=400, d=16, classes=40)
    calc = amod.AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
                                   k="max_bin_count", device=torch.device("cpu"))
    ref = calc.get_accuracy(torch.from_numpy(x), torch.from_numpy(y))
    got = evaluate(x, y, recall_at=(1,), metrics=RETRIEVAL, device="cpu")
    assert got["recall@1"] == pytest.approx(ref["precision_at_1"], abs=1e-6)
    assert got["map@r"] == pytest.approx(ref["mean_average_precision_at_r"], abs=1e-6)
    assert got["r_precision"] == pytest.approx(ref["r_precision"], abs=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(embeddings=np.zeros((5, 2)), labels=np.zeros(4, int)), "mismatch"),
        (dict(embeddings=np.zeros(5), labels=np.zeros(5, int)), "2-D"),
        (dict(embeddings=np.array([[0.0, np.nan], [1, 1]]), labels=np.zeros(2, int)), "NaN"),
        (dict(embeddings=np.array([[0.0, np.inf], [1, 1]]), labels=np.zeros(2, int)), "inf"),
        (dict(embeddings=np.array([[0.0, 3e18], [1, 1]]), labels=np.zeros(2, int)), "overflow float32"),
        (dict(recall_at=(0,)), "positive"),
        (dict(recall_at=(-2,)), "positive"),
        (dict(metrics=("recall", "bogus")), "unknown metric"),
        (dict(query_mask=np.ones(9, bool), gallery_mask=np.ones(10, bool)), "query_mask"),
        (dict(query_mask=np.ones(10, int), gallery_mask=np.ones(10, bool)), "boolean"),
        (dict(query_mask=np.ones(10, bool)), "both"),
    ],
)
def test_validation_errors(kwargs, match):
    base = dict(embeddings=np.random.default_rng(0).normal(size=(10, 3)), labels=np.arange(10) % 3)
    base.update(kwargs)
    emb, lab = base.pop("embeddings"), base.pop("labels")
    with pytest.raises(ValueError, match=match):
        evaluate(emb, lab, device="cpu", **base)


@pytest.mark.parametrize("masks", [False, True])
def test_faiss_backend_matches_the_exact_torch_backend(masks):
    """Random continuous data (no ties): the faiss flat index gives the same retrieval metrics."""
    from dml_runner.evaluation import evaluate

    rng = np.random.default_rng(5)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    y = rng.integers(0, 25, size=300)
    y[:3] = 99  # a singleton class: excluded from scoring by both
    kw = {}
    if masks:
        q = rng.random(300) < 0.5
        kw = {"query_mask": q, "gallery_mask": ~q | (rng.random(300) < 0.2)}
    metrics = ("recall", "map_at_r", "r_precision")
    a = evaluate(x, y, recall_at=(1, 2, 4, 8, 16), metrics=metrics, backend="auto", **kw)
    b = evaluate(x, y, recall_at=(1, 2, 4, 8, 16), metrics=metrics, backend="faiss", **kw)
    assert a.keys() == b.keys()
    for key in a:
        assert b[key] == pytest.approx(a[key], abs=1e-9), key
    with pytest.raises(ValueError, match="backend"):
        evaluate(x, y, backend="annoy")


@pytest.mark.parametrize("case", ["random", "perfect", "one_cluster", "singletons", "independent", "renamed"])
def test_nmi_matches_scikit_learn(case):
    """scikit-learn's normalized_mutual_info_score (arithmetic) as the oracle, edge cases included."""
    from sklearn.metrics import normalized_mutual_info_score

    rng = np.random.default_rng(3)
    y = rng.integers(0, 9, 400)
    assign = {"random": np.where(rng.random(400) < 0.5, y, rng.integers(0, 12, 400)),
              "perfect": y.copy(), "one_cluster": np.zeros(400, dtype=int), "singletons": np.arange(400),
              "independent": np.tile(np.arange(4), 100), "renamed": (y * 7 + 100)}[case]
    labels = np.repeat(np.arange(4), 100) if case == "independent" else y
    want = normalized_mutual_info_score(labels, assign, average_method="arithmetic")
    assert nmi_from_assignments(assign, labels) == pytest.approx(want, abs=1e-12)
    assert nmi_from_assignments(np.zeros(5, int), np.zeros(5, int)) == normalized_mutual_info_score(
        np.zeros(5, int), np.zeros(5, int))
