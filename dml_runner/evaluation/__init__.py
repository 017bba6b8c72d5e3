"""Evaluation engine: retrieval (Recall@K, MAP@R, R-Precision) and clustering (NMI, F1) metrics.

See docs/EVALUATION.md for the definitions, tie handling and the query/gallery mode.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dml_runner.evaluation._validation import (
    BACKENDS,
    KNOWN_METRICS,
    check_backend,
    check_embeddings_labels,
    check_mask,
    check_metrics,
    check_recall_at,
)
from dml_runner.devices import resolve_device
from dml_runner.evaluation.clustering import f1_from_assignments, kmeans_assignments, nmi_from_assignments
from dml_runner.evaluation.cpu import (block_budget_gb, cpu_info, describe_paths, forced_search, screen_dtype,
                                       use_screen, use_symmetric)
from dml_runner.evaluation.kmeans import low_precision_dtype  # noqa: F401  (the k-means API: evaluation.kmeans.kmeans)
from dml_runner.evaluation.memory import SCREENED_BYTES_PER_ELEMENT, estimate_memory_bytes, rows_per_chunk
from dml_runner.evaluation.retrieval import RetrievalStats, exact_retrieval, faiss_retrieval
from dml_runner.evaluation.screened import screened_retrieval
from dml_runner.evaluation.symmetric import symmetric_retrieval

# The screen's fixed costs (gallery statistics, per-query float64 work) pay off from about here (docs/PERFORMANCE.md):
# bf16 screen (native bf16) from 4,096 queries x 8,192 gallery items. The float32 screen (only when forced: see
# cpu.use_screen), whose product costs as much as the float32 search's, not below 20,000 of each.
SCREEN_MIN_QUERIES, SCREEN_MIN_GALLERY = 4096, 8192
SCREEN_FP32_MIN = 20_000
# The symmetric leave-one-out search (half the product, a per-block listing pass) from this many items.
SYMMETRIC_MIN = 16_384
log = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "SYMMETRIC_MIN",
    "KNOWN_METRICS",
    "check_backend",
    "cpu_info",
    "describe_paths",
    "evaluate",
    "estimate_memory_bytes",
    "f1_from_assignments",
    "kmeans_assignments",
    "nmi_from_assignments",
]


def evaluate(
    embeddings: np.ndarray,
    labels: np.ndarray,
    *,
    recall_at: Sequence[int] = (1, 2, 4, 8),
    metrics: Sequence[str] = ("recall", "nmi", "f1", "map_at_r", "r_precision"),
    query_mask: np.ndarray | None = None,
    gallery_mask: np.ndarray | None = None,
    device: str = "auto",
    seed: int = 0,
    chunk_size: int = 4096,
    kmeans_iters: int = 50,
    max_memory_gb: float | None = None,
    backend: str = "auto",
    kmeans_precision: str = "auto",
) -> dict[str, float]:
    """Compute DML metrics; returns ``recall@K``, ``nmi``, ``f1``, ``map@r``, ``r_precision`` (as requested),
    ``num_queries`` and ``num_queries_without_positive``.

    Leave-one-out when no mask is given (every item queries all others); otherwise queries = ``query_mask`` items
    searched against ``gallery_mask`` items, an item in both excluded from its own results. Queries without any
    positive in their searchable set are left out of Recall@K, MAP@R and R-Precision and counted in
    ``num_queries_without_positive``. Clustering uses all items (LOO) or the union of queries and gallery;
    k-means (greedy k-means++ seeding) stops after ``kmeans_iters`` iterations or when at most 0.1% of points
    change cluster; ``kmeans_precision`` (auto | bf16 | fp32) is its assignment product (auto: bf16 where the CPU
    multiplies it natively and on CUDA; env DML_KMEANS_PRECISION / DML_CPU_PATH, docs/EVALUATION.md).
    ``backend``: ``auto`` (default) is ``torch_screened`` with a bf16 screen on a CPU that multiplies bf16
    natively, from 4,096 queries and 8,192 gallery items, and ``torch_fp32`` otherwise, GPUs included (env
    DML_EVAL_SEARCH, DML_SCREEN_PRECISION, DML_CPU_PATH force the choices, docs/EVALUATION.md);
    ``torch_screened`` is a bf16 (or float32) screen whose undecided items are recomputed in float64 (results equal
    a float64 brute force; see ``screened.py``); ``torch_fp32`` is a float32 chunked search; both give exact tie
    order and Recall@K for any K from one count. ``faiss``: a flat L2 index searched for the top max(K, R) + 1 (the
    GPU index when faiss sees a GPU and ``device`` is cuda).
    """
    emb, lab = check_embeddings_labels(embeddings, labels)
    ks = check_recall_at(recall_at)
    wanted = check_metrics(metrics)
    qmask, gmask = _check_masks(query_mask, gallery_mask, emb.shape[0])
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive; got {chunk_size}")
    if kmeans_iters <= 0:
        raise ValueError(f"kmeans_iters must be positive; got {kmeans_iters}")
    dev = resolve_device(device, option="eval.device")
    split = _Split.of(qmask, gmask, emb.shape[0])

    out: dict[str, float] = {}
    stats = None
    if any(m in wanted for m in ("recall", "map_at_r", "r_precision")):
        check_backend(backend)
        need_ranking = "map_at_r" in wanted or "r_precision" in wanted
        stats = _search(emb, lab, split, backend, dev, need_ranking, ks, chunk_size, max_memory_gb)
        out.update(_retrieval_metrics(stats, wanted, ks))
    if "nmi" in wanted or "f1" in wanted:
        out.update(_clustering_metrics(emb, lab, split, stats, wanted, dev, seed, kmeans_iters, kmeans_precision))
    return out


def _check_masks(query_mask: np.ndarray | None, gallery_mask: np.ndarray | None,
                 n: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Both masks checked against ``n`` items, or both None (leave-one-out)."""
    qmask = check_mask(query_mask, n, "query_mask")
    gmask = check_mask(gallery_mask, n, "gallery_mask")
    if (qmask is None) != (gmask is None):
        raise ValueError("give both query_mask and gallery_mask, or neither (leave-one-out)")
    return qmask, gmask


@dataclass(frozen=True)
class _Split:
    """Who queries whom: query and gallery item indices, each query's own position in the gallery (-1: not in it)
    and the items that k-means clusters. ``loo``: leave-one-out (queries and gallery are all items)."""

    loo: bool
    queries: np.ndarray
    gallery: np.ndarray
    self_index: np.ndarray
    clustered: np.ndarray

    @classmethod
    def of(cls, qmask: np.ndarray | None, gmask: np.ndarray | None, n: int) -> _Split:
        if qmask is None:
            return cls(True, np.arange(n), np.arange(n), np.arange(n), np.arange(n))
        q_idx, g_idx = np.flatnonzero(qmask), np.flatnonzero(gmask)
        pos_in_gallery = np.full(n, -1, dtype=np.int64)
        pos_in_gallery[g_idx] = np.arange(g_idx.size)
        return cls(False, q_idx, g_idx, pos_in_gallery[q_idx], np.flatnonzero(qmask | gmask))


def _auto_backend(split: _Split, dev: torch.device) -> str:
    """``backend="auto"``: the screened search for large query and gallery sets on a CPU it pays on, the symmetric
    search for large leave-one-out sets where it pays (or is forced), the float32 search otherwise."""
    nq, ng = split.queries.size, split.gallery.size
    big = nq >= SCREEN_MIN_QUERIES and ng >= SCREEN_MIN_GALLERY
    if screen_dtype(dev) == torch.float32:
        big = min(nq, ng) >= max(SCREEN_FP32_MIN, SCREEN_MIN_QUERIES)
    backend = "torch_screened" if big and use_screen(dev) else "torch_fp32"
    if backend == "torch_fp32" and split.loo and use_symmetric(dev) and (
            ng >= SYMMETRIC_MIN or forced_search() == "symmetric"):
        backend = "torch_symmetric"
    return backend


def _search(emb: np.ndarray, lab: np.ndarray, split: _Split, backend: str, dev: torch.device, need_ranking: bool,
            ks: tuple[int, ...], chunk_size: int, max_memory_gb: float | None) -> RetrievalStats:
    """The retrieval statistics from the chosen backend. Under ``auto`` the screened and symmetric searches may
    give up on weak embeddings (close to random); the float32 search then runs instead."""
    auto = backend == "auto"
    if auto:
        backend = _auto_backend(split, dev)
    elif backend == "torch_symmetric" and not split.loo:
        raise ValueError("backend 'torch_symmetric' searches leave-one-out only; with query/gallery masks use "
                         "'torch_fp32' or 'torch_screened'")
    q_idx, g_idx = split.queries, split.gallery
    if split.loo:  # leave-one-out: queries and gallery are the data itself (no copies)
        args = (emb, lab, emb, lab, split.self_index)
    else:
        args = (emb[q_idx], lab[q_idx], emb[g_idx], lab[g_idx], split.self_index)
    stats = None
    if backend == "faiss":
        chunk = rows_per_chunk(g_idx.size, chunk_size, max_memory_gb, budget_gb=block_budget_gb(dev))
        stats = faiss_retrieval(*args, max_k=max(ks), need_ranking=need_ranking, use_gpu=dev.type == "cuda",
                                chunk_size=chunk)
    elif backend == "torch_screened":
        sdtype = screen_dtype(dev)
        chunk = rows_per_chunk(g_idx.size, chunk_size, max_memory_gb, budget_gb=block_budget_gb(dev),
                               bytes_per_element=SCREENED_BYTES_PER_ELEMENT[sdtype])
        stats = screened_retrieval(*args, need_ranking=need_ranking, device=dev, chunk_size=chunk,
                                   give_up_if_weak=auto, dtype=sdtype)
        if stats is None:
            log.info("retrieval: the bf16 screen leaves too many items undecided (embeddings close to random); "
                     "using the float32 search")
            backend = "torch_fp32"
    if backend == "torch_symmetric":
        stats = symmetric_retrieval(emb, lab, need_ranking=need_ranking, device=dev, give_up_if_weak=auto)
        if stats is None:
            log.info("retrieval: the nearest positives lie too deep in the rankings for the symmetric search "
                     "(embeddings close to random); using the float32 search")
            backend = "torch_fp32"
    if backend == "torch_fp32":
        chunk = rows_per_chunk(g_idx.size, chunk_size, max_memory_gb, budget_gb=block_budget_gb(dev))
        stats = exact_retrieval(*args, need_ranking=need_ranking, device=dev, chunk_size=chunk)
    return stats


def _retrieval_metrics(stats: RetrievalStats, wanted: tuple[str, ...], ks: tuple[int, ...]) -> dict[str, float]:
    """Recall@K, MAP@R and R-Precision (as wanted), averaged over the queries with a positive, and the counts."""
    out: dict[str, float] = {}
    mean = lambda x: float(np.mean(x)) if x.size else float("nan")  # noqa: E731
    if "recall" in wanted:
        for k in ks:
            out[f"recall@{k}"] = mean((stats.first_rank < k).astype(np.float64))
    if "map_at_r" in wanted:
        out["map@r"] = mean(stats.map_at_r)
    if "r_precision" in wanted:
        out["r_precision"] = mean(stats.r_precision)
    out["num_queries"] = float(stats.first_rank.size)
    out["num_queries_without_positive"] = float(stats.num_without_positive)
    return out


def _clustering_metrics(emb: np.ndarray, lab: np.ndarray, split: _Split, stats: RetrievalStats | None,
                        wanted: tuple[str, ...], dev: torch.device, seed: int, iters: int,
                        precision: str) -> dict[str, float]:
    """NMI and F1 (as wanted) of k-means with one cluster per class over the clustered items."""
    x, y = emb[split.clustered], lab[split.clustered]
    neighbours = None
    if stats is not None and stats.neighbours is not None and split.loo:
        # the leave-one-out search's neighbour lists (scores -|x_i - x_j|^2 / 2) spare most of the k-means++
        # seeding's products (evaluation/kmeans.py)
        idx, score, bound = stats.neighbours
        neighbours = (idx, -2.0 * score, -2.0 * bound)
    assign = kmeans_assignments(x, np.unique(y).size, seed=seed, iters=iters, device=str(dev), precision=precision,
                                neighbours=neighbours)
    out: dict[str, float] = {}
    if "nmi" in wanted:
        out["nmi"] = nmi_from_assignments(assign, y)
    if "f1" in wanted:
        out["f1"] = f1_from_assignments(assign, y)
    return out
