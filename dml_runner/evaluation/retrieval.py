"""Retrieval metrics (Recall@K, MAP@R, R-Precision) by exact chunked k-NN search; never builds an N x N matrix.

Distances are squared Euclidean (same order as Euclidean). Ties between equal distances are broken by gallery
index, lower first, so every query sees one well-defined ranking of the searchable set.

Per query q (searchable set = gallery minus q itself):
- ``first_rank`` = #items ranked before the nearest positive; Recall@K counts q iff first_rank < K.
- MAP@R = (1/R) sum_{i<=R} P(i) rel(i) and R-Precision = #positives in top R / R, R = #positives of q.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dml_runner.devices import exact_float32_matmul

log = logging.getLogger(__name__)


@dataclass
class PositiveIndex:
    """Gallery items grouped by label (CSR-like) to look up each query's positives."""

    order: torch.Tensor  # gallery indices sorted by (label, index)
    start: torch.Tensor  # per query: first position in ``order`` of its label
    count: torch.Tensor  # per query: number of gallery items with its label


def build_positive_index(query_labels: np.ndarray, gallery_labels: np.ndarray, device: torch.device) -> PositiveIndex:
    order = np.argsort(gallery_labels, kind="stable")
    sorted_labels = gallery_labels[order]
    start = np.searchsorted(sorted_labels, query_labels, side="left")
    end = np.searchsorted(sorted_labels, query_labels, side="right")
    return PositiveIndex(
        torch.as_tensor(order, device=device),
        torch.as_tensor(start, device=device),
        torch.as_tensor(end - start, device=device),
    )


def positives_of(pidx: PositiveIndex, rows: torch.Tensor, self_cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded (c, m) gallery indices of the positives of query ``rows`` and a validity mask (self excluded)."""
    counts = pidx.count[rows]
    m = max(int(counts.max()), 1)
    offs = torch.arange(m, device=rows.device)
    valid = offs[None, :] < counts[:, None]
    pos = torch.where(valid, pidx.start[rows, None] + offs[None, :], torch.zeros_like(offs)[None, :])
    cols = pidx.order[pos.clamp_max(pidx.order.numel() - 1)]
    valid &= cols != self_cols[:, None]
    return cols, valid


def ordered_topk(dist: torch.Tensor, k: int) -> torch.Tensor:
    """Gallery indices of the k nearest, ordered by (distance, index); exact under ties."""
    n = dist.shape[1]
    kk = min(k + 1, n)
    vals, idx = torch.topk(dist, kk, dim=1, largest=False, sorted=True)
    # Order within the returned set by (value, index): sort by index, then stable sort by value.
    idx_sorted, perm = torch.sort(idx, dim=1)
    vals_by_idx = vals.gather(1, perm)
    vals2, perm2 = torch.sort(vals_by_idx, dim=1, stable=True)
    idx = idx_sorted.gather(1, perm2)
    vals = vals2
    if kk > k:
        # The k-th and (k+1)-th value tie: the set itself may be wrong (a lower index could be left out).
        amb = (vals[:, k] == vals[:, k - 1]).nonzero().ravel()
        if amb.numel():
            _, full = torch.sort(dist[amb], dim=1, stable=True)
            idx[amb] = full[:, :kk]
    return idx[:, :k]


def nearest_positive(dist: torch.Tensor, pos_cols: torch.Tensor,
                     pos_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance t1 and gallery index p1 of each row's nearest positive (lowest index among equals)."""
    inf = torch.tensor(float("inf"), device=dist.device, dtype=dist.dtype)
    pd = torch.where(pos_valid, dist.gather(1, pos_cols), inf)
    t1 = pd.min(dim=1).values
    big = torch.iinfo(torch.int64).max
    p1 = torch.where(pos_valid & (pd == t1[:, None]), pos_cols, torch.full_like(pos_cols, big)).min(dim=1).values
    return t1, p1


def first_positive_rank_(dist: torch.Tensor, t1: torch.Tensor, p1: torch.Tensor) -> torch.Tensor:
    """#items ordered before the nearest positive under (distance, index) order. OVERWRITES ``dist``.

    One in-place pass turns the block into sign(t1 - d) (+1 closer, 0 tied, -1 farther); its row sum is
    L - G, and after abs_() the row sum is L + G = n - E, so L (closer) and E (tied) come out of two reductions
    with no temporary block (the values are small integers: float32 sums are exact below 2^24 items per row).
    Rows with ties (E > 1: the nearest positive itself is one) add the tied items of lower index than p1.
    """
    n = dist.shape[1]
    torch.sub(t1[:, None], dist, out=dist)
    torch.sign(dist, out=dist)
    signed = dist.sum(dim=1)
    dist.abs_()
    unsigned = dist.sum(dim=1)
    rank = ((signed + unsigned) / 2).to(torch.int64)
    tied_count = n - unsigned
    tied = (tied_count > 1).nonzero().ravel()
    if tied.numel():
        cols = torch.arange(n, device=dist.device)
        extra = ((dist[tied] == 0) & (cols[None, :] < p1[tied, None])).sum(dim=1)
        rank[tied] += extra
    return rank


def map_r_and_r_precision(rel: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rel: (c, k) relevance of the ordered top k (k >= max R); r: (c,) R per query.

    MAP@R = (1/R) sum_{i<=R} P(i) rel(i), P(i) = (1/i) sum_{j<=i} rel(j); R-Precision = sum_{i<=R} rel(i) / R.
    """
    k = rel.shape[1]
    pos = torch.arange(1, k + 1, device=rel.device, dtype=torch.float64)
    within = pos[None, :] <= r[:, None]
    relf = (rel & within).to(torch.float64)
    precision_at_i = torch.cumsum(relf, dim=1) / pos[None, :]
    rf = r.to(torch.float64)
    return (precision_at_i * relf).sum(dim=1) / rf, relf.sum(dim=1) / rf


@dataclass
class RetrievalStats:
    """Per-query results for queries with >= 1 positive."""

    first_rank: np.ndarray  # int64
    map_at_r: np.ndarray  # float64
    r_precision: np.ndarray  # float64
    num_without_positive: int
    # Leave-one-out searches that keep per-item neighbour lists (the symmetric one): (idx (n, L) int64, score
    # (n, L) float32 = -|x_i - x_j|^2 / 2 as the float32 product gave it, bound (n,) float32): every item missing
    # from row i scores <= bound[i], so a listed entry above it is among row i's nearest. None otherwise.
    neighbours: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


@dataclass
class Queries:
    """What both torch searches need about the queries: positives, self positions, R, labels, scored rows."""

    pidx: PositiveIndex
    self_index: torch.Tensor  # gallery position of each query, -1 if not in the gallery
    r: torch.Tensor  # R = number of positives in the searchable set
    labels: torch.Tensor
    gallery_labels: torch.Tensor
    scored: torch.Tensor  # queries with R > 0, the only ones searched


def prepare_queries(query_labels: np.ndarray, gallery_labels: np.ndarray, self_index: np.ndarray,
                    device: torch.device) -> Queries:
    pidx = build_positive_index(query_labels, gallery_labels, device)
    selft = torch.as_tensor(self_index, device=device)
    r_all = pidx.count - (selft >= 0).to(pidx.count.dtype) * (pidx.count > 0).to(pidx.count.dtype)
    return Queries(pidx, selft, r_all, torch.as_tensor(query_labels, device=device),
                   torch.as_tensor(gallery_labels, device=device), (r_all > 0).nonzero().ravel())


def collect_stats(ranks: list, maps: list, rps: list, num_queries: int, num_scored: int) -> RetrievalStats:
    """Concatenate per-chunk tensors into :class:`RetrievalStats`."""
    cat = lambda xs, dt: torch.cat(xs).cpu().numpy() if xs else np.zeros(0, dtype=dt)  # noqa: E731
    return RetrievalStats(first_rank=cat(ranks, np.int64), map_at_r=cat(maps, np.float64),
                          r_precision=cat(rps, np.float64), num_without_positive=int(num_queries - num_scored))


@exact_float32_matmul()  # float32 products never in TF32 on CUDA
def exact_retrieval(
    queries: np.ndarray,
    query_labels: np.ndarray,
    gallery: np.ndarray,
    gallery_labels: np.ndarray,
    self_index: np.ndarray,
    *,
    need_ranking: bool = True,
    device: torch.device = torch.device("cpu"),
    chunk_size: int = 4096,
) -> RetrievalStats:
    """Exact float32 search, one chunk of queries against the whole gallery at a time.

    ``self_index[i]`` is the gallery position of query i (excluded from its own results) or -1.
    """
    q = torch.as_tensor(queries, device=device)
    g = torch.as_tensor(gallery, device=device)
    gn = (g * g).sum(dim=1)
    qs = prepare_queries(query_labels, gallery_labels, self_index, device)
    pidx, selft, r_all, lab_q, lab_g, scored = qs.pidx, qs.self_index, qs.r, qs.labels, qs.gallery_labels, qs.scored
    ranks, maps, rps = [], [], []
    # One reusable block: a fresh (chunk x N) tensor per chunk costs as much in page faults as the counting itself.
    block = torch.empty(min(chunk_size, max(scored.numel(), 1)), g.shape[0], device=device)
    for s in range(0, scored.numel(), chunk_size):
        rows = scored[s : s + chunk_size]
        dist = block[: rows.numel()]
        # |g|^2 - 2 q.g: the squared distance minus the per-row constant |q|^2, which no within-row comparison needs.
        torch.addmm(gn[None, :], q[rows], g.T, beta=1.0, alpha=-2.0, out=dist)
        has_self = (selft[rows] >= 0).nonzero().ravel()
        dist[has_self, selft[rows][has_self]] = float("inf")
        cols, valid = positives_of(pidx, rows, selft[rows])
        t1, p1 = nearest_positive(dist, cols, valid)
        if need_ranking:  # before the rank count, which overwrites the block
            r = r_all[rows]
            top = ordered_topk(dist, int(r.max()))
            rel = lab_g[top] == lab_q[rows, None]
            m, rp = map_r_and_r_precision(rel, r)
            maps.append(m)
            rps.append(rp)
        ranks.append(first_positive_rank_(dist, t1, p1))
    del block
    return collect_stats(ranks, maps, rps, queries.shape[0], scored.numel())


FAISS_GPU_MAX_K = 2048  # faiss's GPU search (flat index) returns at most this many neighbours per query


def faiss_gpu(index: Any, device: torch.device | None = None) -> tuple[Any, Any] | None:
    """``(gpu_index, resources)``: ``index`` copied to the one GPU ``device`` (``cuda:N``; a bare ``cuda`` is torch's
    current device, the rank's under torchrun), never to every GPU; None when faiss has no GPU support or sees no
    GPU. Keep ``resources`` alive as long as the index."""
    import faiss

    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        return None
    number = device.index if device is not None and device.index is not None else torch.cuda.current_device()
    resources = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(resources, number, index), resources


def faiss_retrieval(
    queries: np.ndarray,
    query_labels: np.ndarray,
    gallery: np.ndarray,
    gallery_labels: np.ndarray,
    self_index: np.ndarray,
    *,
    max_k: int,
    need_ranking: bool = True,
    use_gpu: bool = False,
    chunk_size: int = 4096,
    device: torch.device | None = None,
) -> RetrievalStats:
    """The same statistics from a faiss flat (exact L2) index: top-k search with k = max(max K, max R) + 1.

    ``first_rank`` is exact for ranks below ``max_k`` (larger ranks are reported as ``max_k``, which no requested
    K reaches). Ties are ordered by index within the returned neighbours; an item tied with the k-th neighbour may
    be left out by faiss (the torch backend breaks every tie exactly). ``use_gpu``: faiss's GPU index on ``device``
    alone (:func:`faiss_gpu`), unless k exceeds its limit (:data:`FAISS_GPU_MAX_K`: a class with more gallery items,
    or a Recall@K beyond it): then the CPU index answers (logged).
    """
    import faiss

    q = np.ascontiguousarray(queries, dtype=np.float32)
    g = np.ascontiguousarray(gallery, dtype=np.float32)
    index = faiss.IndexFlatL2(g.shape[1])
    classes, counts = np.unique(gallery_labels, return_counts=True)
    pos = np.clip(np.searchsorted(classes, query_labels), 0, classes.size - 1)
    known = classes[pos] == query_labels
    r_all = np.where(known, counts[pos], 0) - ((self_index >= 0) & known)
    scored = np.flatnonzero(r_all > 0)
    k_needed = max(max_k, int(r_all.max()) if scored.size else 1)
    k = min(k_needed + 1, g.shape[0])
    gpu = None
    if use_gpu and k > FAISS_GPU_MAX_K:
        log.info("retrieval: faiss's GPU search returns at most %d neighbours and k = %d is needed (max(K, R) + 1); "
                 "searching faiss's CPU index", FAISS_GPU_MAX_K, k)
    elif use_gpu:
        gpu = faiss_gpu(index, device)
        if gpu is not None:
            index = gpu[0]
    index.add(g)
    ranks, maps, rps = [], [], []
    for s in range(0, scored.size, chunk_size):
        rows = scored[s : s + chunk_size]
        dist, idx = index.search(q[rows], k)
        # drop the query itself (or the farthest neighbour when the query is not in the gallery's top k)
        own = idx == self_index[rows, None]
        own[~own.any(axis=1), -1] = True
        keep = ~own
        idx = idx[keep].reshape(rows.size, k - 1)
        dist = dist[keep].reshape(rows.size, k - 1)
        order = np.lexsort((idx, dist), axis=1)  # by distance, then index
        idx = np.take_along_axis(idx, order, axis=1)
        rel = gallery_labels[np.maximum(idx, 0)] == query_labels[rows, None]
        rel &= idx >= 0
        first = np.where(rel.any(axis=1), rel.argmax(axis=1), max_k)
        ranks.append(np.minimum(first, max_k))
        if need_ranking:
            m, rp = map_r_and_r_precision(torch.as_tensor(rel), torch.as_tensor(r_all[rows]))
            maps.append(m.numpy())
            rps.append(rp.numpy())
    cat = lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dtype=dt)  # noqa: E731
    return RetrievalStats(first_rank=cat(ranks, np.int64).astype(np.int64), map_at_r=cat(maps, np.float64),
                          r_precision=cat(rps, np.float64), num_without_positive=int(q.shape[0] - scored.size))
