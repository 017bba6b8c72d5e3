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
    device: str = "cpu", tol: float = 1e-3,
) -> np.ndarray:
    """Cluster id of every row of ``x`` after seeded k-means with k clusters.

    backend ``torch`` (default): our Lloyd iterations with bf16 assignment and early stop when fewer than ``tol`` of
    the points change cluster (``dml_runner.evaluation.kmeans``); ``faiss``: faiss.Kmeans for exactly ``iters``
    iterations (faiss GPU when ``device`` is cuda and faiss sees a GPU).
    """
    if backend == "torch":
        from dml_runner.evaluation.kmeans import torch_kmeans

        return torch_kmeans(x, k, seed=seed, iters=iters, tol=tol, device=device)[0]
    if backend != "faiss":
        raise ValueError(f"unknown k-means backend {backend!r}; use 'torch' or 'faiss'")
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    k = max(1, min(int(k), n))
    use_gpu = str(device).startswith("cuda") and faiss.get_num_gpus() > 0
    km = faiss.Kmeans(d, k, niter=int(iters), seed=int(seed), gpu=use_gpu,
                      max_points_per_centroid=max(256, n), verbose=False)
    km.train(x)
    _, assign = km.index.search(x, 1)
    return assign.ravel().astype(np.int64)
