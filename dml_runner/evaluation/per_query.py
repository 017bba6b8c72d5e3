"""Per-query retrieval values: each scored query's Recall@K hit, MAP@R, R-Precision and reciprocal rank; on request,
precision@K and MAP@K from the ordered top K (:func:`top_k_values`), and a per-class breakdown.

The means of these arrays are the metrics :func:`dml_runner.evaluation.evaluate` reports; the arrays themselves are
what a paired comparison of two models on the same queries resamples (:mod:`dml_runner.evaluation.bootstrap`).
They come from the exact float32 search (ties broken by gallery index, as every backend does), so they equal the
reported metrics wherever that search is the one the evaluation chose (below the screened and symmetric searches'
sizes; above them the reported values are float64-exact and may differ on a query whose nearest distances tie
within float32 rounding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dml_runner.devices import resolve_device
from dml_runner.evaluation._validation import check_embeddings_labels, check_mask, check_recall_at
from dml_runner.evaluation.retrieval import exact_retrieval, ordered_topk


@dataclass
class PerQuery:
    """``queries``: item indices of the scored queries (those with at least one positive), in item order;
    ``values``: metric name -> one float64 per scored query (``recall@K`` as 1.0/0.0, ``map@r``,
    ``r_precision``, ``reciprocal_rank`` = 1 / (rank of the nearest positive))."""

    queries: np.ndarray
    values: dict[str, np.ndarray]
    num_without_positive: int

    def means(self) -> dict[str, float]:
        return {k: float(v.mean()) if v.size else float("nan") for k, v in self.values.items()}


def _split(emb: np.ndarray, lab: np.ndarray, query_mask: np.ndarray | None,
           gallery_mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Query and gallery item indices and each query's gallery position (-1: not in the gallery)."""
    n = emb.shape[0]
    qmask, gmask = check_mask(query_mask, n, "query_mask"), check_mask(gallery_mask, n, "gallery_mask")
    if (qmask is None) != (gmask is None):
        raise ValueError("give both query_mask and gallery_mask, or neither (leave-one-out)")
    if qmask is None:
        return np.arange(n), np.arange(n), np.arange(n)
    q_idx, g_idx = np.flatnonzero(qmask), np.flatnonzero(gmask)
    pos_in_gallery = np.full(n, -1, dtype=np.int64)
    pos_in_gallery[g_idx] = np.arange(g_idx.size)
    return q_idx, g_idx, pos_in_gallery[q_idx]


def _positives(lab: np.ndarray, q_idx: np.ndarray, g_idx: np.ndarray, self_index: np.ndarray) -> np.ndarray:
    """Each query's number of positives in its searchable set (its gallery class members other than itself)."""
    classes, counts = np.unique(lab[g_idx], return_counts=True)
    at = np.clip(np.searchsorted(classes, lab[q_idx]), 0, classes.size - 1)
    known = classes[at] == lab[q_idx]
    return np.where(known, counts[at], 0) - ((self_index >= 0) & known)


def per_query_values(embeddings: np.ndarray, labels: np.ndarray, *, recall_at: Sequence[int] = (1, 2, 4, 8),
                     query_mask: np.ndarray | None = None, gallery_mask: np.ndarray | None = None,
                     device: str = "cpu", chunk_size: int = 4096) -> PerQuery:
    """Leave-one-out over all items without masks; otherwise ``query_mask`` items against ``gallery_mask`` items
    (an item in both is excluded from its own results), as :func:`dml_runner.evaluation.evaluate`."""
    emb, lab = check_embeddings_labels(embeddings, labels)
    ks = check_recall_at(recall_at)
    q_idx, g_idx, self_index = _split(emb, lab, query_mask, gallery_mask)
    stats = exact_retrieval(emb[q_idx], lab[q_idx], emb[g_idx], lab[g_idx], self_index, need_ranking=True,
                            device=resolve_device(device, option="device"), chunk_size=chunk_size)
    # the scored queries, in the order the search returns them: those with a positive besides themselves
    scored = q_idx[_positives(lab, q_idx, g_idx, self_index) > 0]
    assert scored.size == stats.first_rank.size
    values = {f"recall@{k}": (stats.first_rank < k).astype(np.float64) for k in ks}
    values["map@r"] = stats.map_at_r.astype(np.float64)
    values["r_precision"] = stats.r_precision.astype(np.float64)
    values["reciprocal_rank"] = 1.0 / (stats.first_rank.astype(np.float64) + 1.0)
    return PerQuery(queries=scored, values=values, num_without_positive=stats.num_without_positive)


def top_k_values(embeddings: np.ndarray, labels: np.ndarray, ks: Sequence[int], *,
                 query_mask: np.ndarray | None = None, gallery_mask: np.ndarray | None = None,
                 device: str = "cpu", chunk_size: int = 1024) -> PerQuery:
    """``precision@K`` and ``map@K`` of each scored query, as open-metric-learning defines them.

    With g_i = 1 when the i-th nearest gallery item (ties by gallery index) shares the query's class, n the number
    of positives and n_i = g_1 + ... + g_i: precision@K = (g_1 + ... + g_K) / min(K, n), so a query with fewer than
    K positives can still score 1; MAP@K = (1 / n_K) sum_{i<=K} (n_i / i) g_i, and 0 when n_K = 0. The top max(K)
    items of each query come from the exact float32 search in chunks of ``chunk_size`` queries.
    """
    emb, lab = check_embeddings_labels(embeddings, labels)
    ks = check_recall_at(ks)
    q_idx, g_idx, self_index = _split(emb, lab, query_mask, gallery_mask)
    positives = _positives(lab, q_idx, g_idx, self_index)
    keep = positives > 0
    q_idx, self_index, positives = q_idx[keep], self_index[keep], positives[keep]
    dev = resolve_device(device, option="device")
    import torch

    g = torch.as_tensor(emb[g_idx], device=dev)
    gn = (g * g).sum(dim=1)
    k_max = min(max(ks), g_idx.size - 1)
    rel_rows = []
    for s in range(0, q_idx.size, chunk_size):
        rows = slice(s, s + chunk_size)
        q = torch.as_tensor(emb[q_idx[rows]], device=dev)
        dist = torch.addmm(gn[None, :], q, g.T, beta=1.0, alpha=-2.0)
        own = torch.as_tensor(self_index[rows], device=dev)
        has = (own >= 0).nonzero().ravel()
        dist[has, own[has]] = float("inf")
        top = ordered_topk(dist, k_max).cpu().numpy()
        rel_rows.append(lab[g_idx][top] == lab[q_idx[rows]][:, None])
    rel = np.concatenate(rel_rows) if rel_rows else np.zeros((0, k_max), dtype=bool)
    found = np.cumsum(rel, axis=1)  # n_i
    values = {}
    for k in ks:
        kk = min(k, k_max)
        values[f"precision@{k}"] = found[:, kk - 1] / np.minimum(k, positives)
        terms = (found[:, :kk] / np.arange(1, kk + 1)) * rel[:, :kk]
        n_k = found[:, kk - 1]
        values[f"map@{k}"] = np.where(n_k > 0, terms.sum(axis=1) / np.maximum(n_k, 1), 0.0)
    return PerQuery(queries=q_idx, values=values, num_without_positive=int((~keep).sum()))


def per_class(per_query: PerQuery, labels: np.ndarray, class_names: np.ndarray | None = None) -> list[dict]:
    """One record per class of the scored queries: its query count and the mean of each per-query value, worst
    first by the first value (``recall@K`` before ``map@r`` when both are there), then by class."""
    lab = np.asarray(labels)[per_query.queries]
    names = None if class_names is None else np.asarray(class_names)[per_query.queries]
    classes, inverse, counts = np.unique(lab, return_inverse=True, return_counts=True)
    means = {key: np.bincount(inverse, weights=values, minlength=classes.size) / counts
             for key, values in per_query.values.items()}
    first = np.zeros(classes.size, dtype=np.int64)
    first[inverse[::-1]] = np.arange(inverse.size)[::-1]  # a query of each class, for its name
    rows = []
    for c, cls in enumerate(classes):
        row = {"class": str(names[first[c]]) if names is not None else str(cls), "label": int(cls),
               "queries": int(counts[c])}
        row.update({key: float(m[c]) for key, m in means.items()})
        rows.append(row)
    order = [k for k in per_query.values if k.startswith("recall@")][:1] + \
        [k for k in ("map@r",) if k in per_query.values]
    return sorted(rows, key=lambda r: (*(r[k] for k in order), r["label"]))


def requested_metrics(embeddings: np.ndarray, labels: np.ndarray, *, precision_at: Sequence[int] = (),
                      map_at: Sequence[int] = (), mrr: bool = False, cmc: int = 0,
                      query_mask: np.ndarray | None = None, gallery_mask: np.ndarray | None = None,
                      device: str = "cpu") -> dict[str, float | list[float]]:
    """The metrics beyond the default evaluation, computed only when asked: ``precision@K`` and ``map@K`` for the
    K of ``precision_at`` / ``map_at``, ``mrr`` (mean reciprocal rank of the nearest positive) and ``cmc`` (the
    cumulative matching curve: Recall@k for k = 1..``cmc``, as a list)."""
    out: dict[str, float | list[float]] = {}
    masks = {"query_mask": query_mask, "gallery_mask": gallery_mask}
    ks = sorted(set(precision_at) | set(map_at))
    if ks:
        top = top_k_values(embeddings, labels, ks, device=device, **masks).means()
        out.update({f"precision@{k}": top[f"precision@{k}"] for k in sorted(set(precision_at))})
        out.update({f"map@{k}": top[f"map@{k}"] for k in sorted(set(map_at))})
    if mrr or cmc:
        pq = per_query_values(embeddings, labels, recall_at=range(1, max(cmc, 1) + 1), device=device, **masks)
        means = pq.means()
        if mrr:
            out["mrr"] = means["reciprocal_rank"]
        if cmc:
            out["cmc"] = [means[f"recall@{k}"] for k in range(1, cmc + 1)]
    return out


__all__ = ["PerQuery", "per_class", "per_query_values", "requested_metrics", "top_k_values"]
