"""Clustering metrics: k-means assignments, NMI and the pairwise F1 of Song et al. (2016).

Both metrics are computed from the sparse cluster x class contingency counts; no N x N matrix is built.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import normalized_mutual_info_score


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


def nmi_from_assignments(assignments: np.ndarray, labels: np.ndarray) -> float:
    """NMI(labels, clusters) = I / ((H(labels) + H(clusters)) / 2) (arithmetic normalisation)."""
    return float(normalized_mutual_info_score(labels, assignments, average_method="arithmetic"))


def kmeans_assignments(
    x: np.ndarray, k: int, *, seed: int = 0, iters: int = 50, backend: str = "torch",
    device: str = "cpu", tol: float = 1e-3, precision: str = "auto",
) -> np.ndarray:
    """Cluster id of every row of ``x`` after seeded k-means with k clusters (:func:`dml_runner.evaluation.kmeans.
    kmeans`).

    backend ``torch`` (default): greedy k-means++ seeding, Lloyd iterations with a bf16 or float32 assignment
    (``precision``: auto | bf16 | fp32) and early stop when at most ``tol`` of the points change cluster;
    ``faiss``: faiss.Kmeans (random seeding) for exactly ``iters`` iterations (GPU when ``device`` is cuda and
    faiss sees a GPU).
    """
    from dml_runner.evaluation.kmeans import kmeans

    return kmeans(x, k, niter=iters, seed=seed, backend=backend, device=device, tol=tol, precision=precision)[1]
