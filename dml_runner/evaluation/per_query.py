"""Per-query retrieval values: each scored query's Recall@K hit, MAP@R, R-Precision and reciprocal rank.

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
from dml_runner.evaluation.retrieval import exact_retrieval


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


def per_query_values(embeddings: np.ndarray, labels: np.ndarray, *, recall_at: Sequence[int] = (1, 2, 4, 8),
                     query_mask: np.ndarray | None = None, gallery_mask: np.ndarray | None = None,
                     device: str = "cpu", chunk_size: int = 4096) -> PerQuery:
    """Leave-one-out over all items without masks; otherwise ``query_mask`` items against ``gallery_mask`` items
    (an item in both is excluded from its own results), as :func:`dml_runner.evaluation.evaluate`."""
    emb, lab = check_embeddings_labels(embeddings, labels)
    n = emb.shape[0]
    ks = check_recall_at(recall_at)
    qmask, gmask = check_mask(query_mask, n, "query_mask"), check_mask(gallery_mask, n, "gallery_mask")
    if (qmask is None) != (gmask is None):
        raise ValueError("give both query_mask and gallery_mask, or neither (leave-one-out)")
    if qmask is None:
        q_idx = g_idx = np.arange(n)
        self_index = np.arange(n)
    else:
        q_idx, g_idx = np.flatnonzero(qmask), np.flatnonzero(gmask)
        pos_in_gallery = np.full(n, -1, dtype=np.int64)
        pos_in_gallery[g_idx] = np.arange(g_idx.size)
        self_index = pos_in_gallery[q_idx]
    stats = exact_retrieval(emb[q_idx], lab[q_idx], emb[g_idx], lab[g_idx], self_index, need_ranking=True,
                            device=resolve_device(device, option="device"), chunk_size=chunk_size)
    # the scored queries, in the order the search returns them: those with a positive besides themselves
    classes, counts = np.unique(lab[g_idx], return_counts=True)
    at = np.clip(np.searchsorted(classes, lab[q_idx]), 0, classes.size - 1)
    known = classes[at] == lab[q_idx]
    positives = np.where(known, counts[at], 0) - ((self_index >= 0) & known)
    scored = q_idx[positives > 0]
    assert scored.size == stats.first_rank.size
    values = {f"recall@{k}": (stats.first_rank < k).astype(np.float64) for k in ks}
    values["map@r"] = stats.map_at_r.astype(np.float64)
    values["r_precision"] = stats.r_precision.astype(np.float64)
    values["reciprocal_rank"] = 1.0 / (stats.first_rank.astype(np.float64) + 1.0)
    return PerQuery(queries=scored, values=values, num_without_positive=stats.num_without_positive)


__all__ = ["PerQuery", "per_query_values"]
