"""Clustering metrics: k-means assignments, NMI and the pairwise F1 of Song et al. (2016).

Both metrics are computed from the sparse cluster x class contingency counts; no N x N matrix is built.
"""

from __future__ import annotations

import numpy as np


def contingency_counts(assignments: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Non-zero cells of the cluster x class table: (cell counts, cluster sizes, class sizes)."""
    a = np.unique(np.asarray(assignments), return_inverse=True)[1].ravel().astype(np.int64)
    y = np.unique(np.asarray(labels), return_inverse=True)[1].ravel().astype(np.int64)
    n_classes = int(y.max()) + 1
    _, cells = np.unique(a * n_classes + y, return_counts=True)
    return cells, np.bincount(a), np.bincount(y)


def _pairs(n: np.ndarray) -> float:
    n = n.astype(np.float64)
    return float((n * (n - 1) / 2).sum())


def f1_from_assignments(assignments: np.ndarray, labels: np.ndarray) -> float:
    """Pairwise F-measure: P = TP / #pairs in the same cluster, R = TP / #pairs in the same class, F1 = 2PR/(P+R).

    TP = sum over cells C(n_kc, 2); same-cluster pairs = sum_k C(a_k, 2); same-class pairs = sum_c C(b_c, 2).
    """
    cells, cluster_sizes, class_sizes = contingency_counts(assignments, labels)
    tp = _pairs(cells)
    predicted = _pairs(cluster_sizes)
    actual = _pairs(class_sizes)
    if tp == 0.0:
        return 0.0
    precision, recall = tp / predicted, tp / actual
    return 2.0 * precision * recall / (precision + recall)


def _entropy(sizes: np.ndarray, n: int) -> float:
    p = sizes[sizes > 0] / n
    return float(-(p * np.log(p)).sum())


def nmi_from_assignments(assignments: np.ndarray, labels: np.ndarray) -> float:
    """NMI(labels, clusters) = I / ((H(labels) + H(clusters)) / 2) (arithmetic normalisation, natural logs), from
    the sparse contingency counts; scikit-learn's conventions: 1 when both sides are a single group, 0 when the
    mutual information is 0 otherwise."""
    a = np.unique(np.asarray(assignments), return_inverse=True)[1].ravel().astype(np.int64)
    y = np.unique(np.asarray(labels), return_inverse=True)[1].ravel().astype(np.int64)
    n = a.size
    n_clusters, n_classes = (int(a.max()) + 1, int(y.max()) + 1) if n else (0, 0)
    if n_clusters == n_classes and n_classes <= 1:
        return 1.0
    cells, counts = np.unique(a * n_classes + y, return_counts=True)
    cluster_sizes, class_sizes = np.bincount(a).astype(np.float64), np.bincount(y).astype(np.float64)
    c = counts.astype(np.float64)
    mi = float(np.sum(c / n * (np.log(c) + np.log(n) - np.log(cluster_sizes[cells // n_classes])
                                - np.log(class_sizes[cells % n_classes]))))
    if mi <= 1e-15:  # independent labellings (up to rounding)
        return 0.0
    return mi / ((_entropy(cluster_sizes, n) + _entropy(class_sizes, n)) / 2)


def kmeans_assignments(
    x: np.ndarray, k: int, *, seed: int = 0, iters: int = 50, backend: str = "torch",
    device: str = "cpu", tol: float = 1e-3, precision: str = "auto", neighbours=None,
) -> np.ndarray:
    """Cluster id of every row of ``x`` after seeded k-means with k clusters (:func:`dml_runner.evaluation.kmeans.
    kmeans`).

    backend ``torch`` (default): greedy k-means++ seeding, Lloyd iterations with a bf16 or float32 assignment
    (``precision``: auto | bf16 | fp32) and early stop when at most ``tol`` of the points change cluster;
    ``faiss``: faiss.Kmeans (random seeding) for exactly ``iters`` iterations (GPU when ``device`` is cuda and
    faiss sees a GPU). ``neighbours``: per-item neighbour lists for the seeding (:func:`dml_runner.evaluation.kmeans.
    kmeans`).
    """
    from dml_runner.evaluation.kmeans import kmeans

    return kmeans(x, k, niter=iters, seed=seed, backend=backend, device=device, tol=tol, precision=precision,
                  neighbours=neighbours)[1]
