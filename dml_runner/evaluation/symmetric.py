"""Leave-one-out retrieval metrics from the symmetric product: each block of X X^T serves its rows and its columns.

In leave-one-out every item queries all the others, so the (N x N) score matrix is symmetric. With

    m(i, j) = x_i . x_j - |x_i|^2 / 2 - |x_j|^2 / 2  (= -|x_i - x_j|^2 / 2: larger = nearer, symmetric),

one float32 product per block pair I <= J (the half norms ride in it as four extra columns, two-part splits) gives
the block M ~ m[I, J] once; its rows rank J for the queries of I and its columns rank I for the queries of J, so
the search does half the multiply-adds of a row-by-row search. Results are certified like the screened search's
(``screened.py``), so they are those of float64 arithmetic:

- each query's nearest positive score t (and its index p1) is exact (float64 over its own class);
- ``e_i`` bounds |M - m| on row i (float32 accumulation of K terms, the split residuals);
- an item with M > t + e is surely nearer than the nearest positive (counted), one with M < t - e surely farther;
  the band between is recomputed in float64 and compared exactly (ties broken by index);
- MAP@R / R-Precision: a per-query running top-k of M (queries with R >= 2; their first R + ``slack`` entries
  count), filled from the row blocks and the column blocks: the diagonal blocks seed it (top-k within the block),
  then every later block lists only the items above both the query's current (R + slack)-th value and its lowest
  positive score minus e (the R positives all score at least that, so the R-th best score does too). At the end
  the first R + slack are recomputed in float64, ordered exactly and certified (the R-th exact score must beat the
  bound on everything left out, the items under the floor included); a row that fails is searched in float64
  against all items. Queries whose nearest positive ranks >= R need no top-k (closed form).
- The top-k also serves k-means: ``RetrievalStats.neighbours`` hands it out with each row's bound (every item
  missing from the row scores at most that).
"""

from __future__ import annotations

import numpy as np
import torch

from dml_runner.devices import exact_float32_matmul
from dml_runner.evaluation.retrieval import (
    Queries,
    RetrievalStats,
    map_r_and_r_precision,
    ordered_topk,
    prepare_queries,
)
from dml_runner.evaluation.screened import U_F32, band_limit, exact_nearest_positive, exact_order, pair_scores

BLOCK_ROWS = 1024  # rows (and columns) of one block of the product: a multiple of screened.COL_ALIGN
SLACK = 8  # extra neighbours per query kept in the running top-k for MAP@R (certification margin)
SHARED_WIDTH = 64  # queries with at most this many triples in one merge share one padded matrix
MERGE_ELEMENTS = 1 << 22  # padded values per merge of queries with more (bounds its memory)
FLUSH_ITEMS = 1 << 22  # listed items kept before they are sorted out (bounds the listing's memory)
PAD = -1e30  # score of a padding row / column: below every threshold


def _flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices of the True entries of a contiguous bool tensor (numpy's scan on CPU: several times faster
    than torch's ``nonzero``)."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return mask.view(-1).nonzero().ravel()


def _round_down(v: torch.Tensor) -> torch.Tensor:
    """float64 -> the largest float32 <= v."""
    f = v.float()
    return torch.where(f.double() > v, torch.nextafter(f, torch.full_like(f, -float("inf"))), f)


def _round_up(v: torch.Tensor) -> torch.Tensor:
    """float64 -> the smallest float32 >= v."""
    f = v.float()
    return torch.where(f.double() < v, torch.nextafter(f, torch.full_like(f, float("inf"))), f)


class _TopK:
    """Per-query running top-k of the float32 scores (values descending, item indices), filled from listed pairs."""

    def __init__(self, n: int, k: int, device: torch.device):
        self.k = k
        self.vals = torch.full((n, k), -float("inf"), device=device)
        self.idx = torch.full((n, k), -1, dtype=torch.int64, device=device)

    def seed(self, rows: slice, vals: torch.Tensor, idx: torch.Tensor) -> None:
        kk = vals.shape[1]
        self.vals[rows, :kk], self.idx[rows, :kk] = vals, idx

    def merge(self, q: torch.Tensor, items: torch.Tensor, v: torch.Tensor, q_sorted: bool = False) -> None:
        """Merge listed (query, item, value) triples into the queries' top k. The triples of one query are padded
        to a common width next to its k entries and one top-k per row keeps the best; queries with few triples
        (the usual case) share one padded matrix, the others go by their count rounded up to a power of two (a
        padded width at most twice the count, at most MERGE_ELEMENTS values at a time)."""
        if not q.numel():
            return
        if not q_sorted:
            order = torch.argsort(q)
            q, items, v = q[order], items[order], v[order]
        rows, counts = torch.unique_consecutive(q, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        few = counts <= SHARED_WIDTH
        if bool(few.all()):
            self._merge_group(rows, counts, starts, items, v, int(counts.max()))
            return
        groups = [(few.nonzero().ravel(), SHARED_WIDTH)]
        bucket = torch.ceil(torch.log2(counts.double())).long()
        for bk in torch.unique(bucket[~few]).tolist():
            groups.append((((bucket == bk) & ~few).nonzero().ravel(), 1 << bk))
        for sel, width in groups:
            step = max(1, MERGE_ELEMENTS // width)
            for g0 in range(0, sel.numel(), step):
                g = sel[g0 : g0 + step]
                self._merge_group(rows[g], counts[g], starts[g], items, v, width)

    def _merge_group(self, rows, counts, starts, items, v, width):
        """Merge into ``rows`` their triples (``counts`` each from ``starts`` in ``items`` / ``v``, at most
        ``width``)."""
        dev = rows.device
        total = int(counts.sum())
        first = torch.cumsum(counts, 0) - counts
        slot = torch.repeat_interleave(torch.arange(rows.numel(), device=dev), counts, output_size=total)
        pos = torch.arange(total, device=dev) - first[slot]
        take = starts[slot] + pos
        nv = torch.full((rows.numel(), width), -float("inf"), device=dev)
        ni = torch.full((rows.numel(), width), -1, dtype=torch.int64, device=dev)
        nv[slot, pos], ni[slot, pos] = v[take], items[take]
        top_v, j = torch.topk(torch.cat([self.vals[rows], nv], dim=1), self.k, dim=1)
        self.vals[rows], self.idx[rows] = top_v, torch.cat([self.idx[rows], ni], dim=1).gather(1, j)


@exact_float32_matmul()  # float32 products never in TF32 on CUDA
def symmetric_retrieval(
    x: np.ndarray,
    labels: np.ndarray,
    *,
    need_ranking: bool = True,
    device: torch.device = torch.device("cpu"),
    block_rows: int = BLOCK_ROWS,
    slack: int = SLACK,
    give_up_if_weak: bool = False,
) -> RetrievalStats | None:
    """Leave-one-out statistics of :func:`dml_runner.evaluation.retrieval.exact_retrieval` (every item queries all
    others), from the upper-triangular blocks of one float32 product; results equal a float64 brute force.

    ``give_up_if_weak``: return None after the diagonal blocks when they predict more listed items per query than
    :func:`dml_runner.evaluation.screened.band_limit` (embeddings close to random: the nearest positive lies deep in
    the ranking, so the items before it cannot be listed cheaply); the caller then runs the float32 search.
    """
    if torch.get_float32_matmul_precision() != "highest":
        # the error bound assumes float32 products: no bf16 / TF32 inside the "float32" matrix products
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            return symmetric_retrieval(x, labels, need_ranking=need_ranking, device=device, block_rows=block_rows,
                                       slack=slack, give_up_if_weak=give_up_if_weak)
        finally:
            torch.set_float32_matmul_precision(before)
    if block_rows <= 0 or block_rows % 1024:
        raise ValueError(f"block_rows must be a positive multiple of 1024; got {block_rows}")
    dev = torch.device(device)
    xt = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32), device=dev)
    n = xt.shape[0]
    ops = _Operands.of(xt, block_rows)
    qs = prepare_queries(labels, labels, np.arange(n), dev)
    t, p1, pmin = _nearest_positives(xt, ops.h, qs)  # 1.
    e = _row_error_bounds(ops, t)  # 2.
    scan = _BlockScan(ops, qs, t, e, pmin, need_ranking, slack)  # 3.
    diag_listed = scan.diagonal_blocks()
    if give_up_if_weak and n and diag_listed * ops.nb > band_limit(n) * n:
        return None
    scan.off_diagonal_blocks()
    del ops.a, ops.bm
    ranks = _first_ranks(xt, ops.h, scan, t, p1, qs.labels)[qs.scored]  # 4.
    without_positive = int(n - qs.scored.numel())
    if not need_ranking:
        return RetrievalStats(first_rank=ranks.cpu().numpy(), map_at_r=np.zeros(0), r_precision=np.zeros(0),
                              num_without_positive=without_positive)
    ap, rp = _map_at_r(xt, ops.h, scan, qs, ranks, e, slack)  # 5.
    return RetrievalStats(first_rank=ranks.cpu().numpy(), map_at_r=ap.cpu().numpy(), r_precision=rp.cpu().numpy(),
                          num_without_positive=without_positive, neighbours=scan.neighbours())


class _Operands:
    """The two augmented operands of the block products: rows ``a`` = [x, -h_hi, -h_lo, 1, 1] and columns ``bm`` =
    [x, 1, 1, -h_hi, -h_lo] (h = |x|^2 / 2 in float64 and its two-part float32 split), padded to ``nb`` blocks of
    ``b`` items; a padding row or column scores PAD against every real one."""

    def __init__(self, h, h_hi, h_lo, split_resid, kp, a, bm, b):
        self.h, self.h_hi, self.h_lo, self.split_resid, self.kp = h, h_hi, h_lo, split_resid, kp
        self.a, self.bm, self.b = a, bm, b
        self.npad = a.shape[0]
        self.nb = self.npad // b

    @classmethod
    def of(cls, xt: torch.Tensor, b: int) -> _Operands:
        dev = xt.device
        n, d = xt.shape
        npad = -(-n // b) * b
        h = torch.empty(n, dtype=torch.float64, device=dev)
        for s in range(0, n, 8192):
            xd = xt[s : s + 8192].double()
            h[s : s + 8192] = 0.5 * (xd * xd).sum(dim=1)
        h_hi = h.float()
        h_lo = (h - h_hi.double()).float()
        split_resid = float((h - h_hi.double() - h_lo.double()).abs().max()) if n else 0.0
        kp = -(-(d + 4) // 8) * 8
        a = torch.zeros(npad, kp, device=dev)  # rows:    [x, -h_hi, -h_lo, 1, 1]
        bm = torch.zeros(npad, kp, device=dev)  # columns: [x, 1, 1, -h_hi, -h_lo]
        a[:n, :d], bm[:n, :d] = xt, xt
        a[:n, d], a[:n, d + 1], a[:n, d + 2], a[:n, d + 3] = -h_hi, -h_lo, 1.0, 1.0
        bm[:n, d], bm[:n, d + 1], bm[:n, d + 2], bm[:n, d + 3] = 1.0, 1.0, -h_hi, -h_lo
        a[n:, d] = PAD  # a padding row scores PAD against every real column
        bm[n:, d + 2] = PAD  # a padding column scores PAD against every real row
        return cls(h, h_hi, h_lo, split_resid, kp, a, bm, b)


def _nearest_positives(xt: torch.Tensor, h: torch.Tensor,
                       qs: Queries) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage 1, exact (float64 over its own class): each scored query's nearest positive score t (m scale) and
    index p1, and its lowest positive score; unscored queries keep t = +inf (nothing counts before it)."""
    n, dev = xt.shape[0], xt.device
    t = torch.full((n,), float("inf"), dtype=torch.float64, device=dev)
    p1 = torch.full((n,), -1, dtype=torch.int64, device=dev)
    pmin = torch.full((n,), float("inf"), dtype=torch.float64, device=dev)
    for s in range(0, qs.scored.numel(), 8192):
        rows = qs.scored[s : s + 8192]
        t_rows, p1[rows], low = exact_nearest_positive(xt, xt, h, qs.pidx, rows, rows, with_lowest=True)
        t[rows] = t_rows - h[rows]
        pmin[rows] = low - h[rows]
    return t, p1, pmin


def _row_error_bounds(ops: _Operands, t: torch.Tensor) -> torch.Tensor:
    """Stage 2: e_i bounds |M - m| on row i: float32 accumulation of kp terms in any order, the split residuals and
    the float64 rounding of the exact scores."""
    h = ops.h
    n = h.shape[0]
    xnorm = (2 * h).sqrt()
    parts = ops.h_hi.double().abs() + ops.h_lo.double().abs()
    xmax = float(xnorm.max()) if n else 0.0
    pmax = float(parts.max()) if n else 0.0
    e = (2 * (ops.kp + 8) * U_F32 * (xnorm * xmax + parts + pmax) + 2 * ops.split_resid) * 1.0625 + 1e-30
    return e + 2.0**-50 * (t.abs().nan_to_num(posinf=0.0) + parts + pmax)


class _BlockScan:
    """Stage 3: the upper-triangular blocks of M, each listing for its row queries and its column queries the items
    at or above their thresholds, sorted into sure counts (M > t + e), band items (within t +- e, settled in
    float64 later) and candidates for the running top-k of MAP@R.

    What a query's top-k must hold: its first k_i = R_i + slack items (R_i >= 2; with R_i = 1, MAP@R has a closed
    form), and only items at or above its lowest positive score: the R positives all score at least that, so the
    R-th best score does too. ``top_lo`` (minus the bound e, rounded down; +inf: no top-k needed) and the running
    k_i-th value are both lower bounds of what the top-k needs: an item below either is not merged.
    """

    def __init__(self, ops: _Operands, qs: Queries, t: torch.Tensor, e: torch.Tensor, pmin: torch.Tensor,
                 need_ranking: bool, slack: int):
        dev, npad, n = ops.h.device, ops.npad, ops.h.shape[0]
        sc, r_all = qs.scored, qs.r
        self.ops = ops
        self.lo = torch.full((npad,), float("inf"), device=dev)
        self.hi = torch.full((npad,), float("inf"), device=dev)
        self.lo[sc], self.hi[sc] = _round_down(t[sc] - e[sc]), _round_up(t[sc] + e[sc])
        r_max = int(r_all.max()) if n else 0
        self.kk = kk = min(r_max + slack, max(npad - 1, 1))
        self.top = _TopK(npad, kk, dev) if need_ranking and sc.numel() else None
        self.kidx = torch.full((npad,), kk - 1, dtype=torch.int64, device=dev)
        self.top_lo = torch.full((npad,), float("inf"), device=dev)
        if self.top is not None:
            wants = sc[r_all[sc] >= 2]
            self.kidx[wants] = (r_all[wants] + slack).clamp_max(kk) - 1
            e_low = e[wants] + 2.0**-50 * pmin[wants].abs()
            self.top_lo[wants] = _round_down(pmin[wants] - e_low)
        self.sure = torch.zeros(npad, dtype=torch.int64, device=dev)
        self.band_q: list[torch.Tensor] = []
        self.band_i: list[torch.Tensor] = []

    def listed(self, q: torch.Tensor, items: torch.Tensor, v: torch.Tensor, merge: bool = True,
               q_sorted: bool = False) -> None:
        """Sort the listed (query, item, M) triples into sure counts, band items and [top-k candidates]."""
        hq = self.hi[q]
        is_sure = v > hq
        self.sure.index_add_(0, q[is_sure], torch.ones_like(q[is_sure]))
        in_band = ~is_sure & (v >= self.lo[q])
        self.band_q.append(q[in_band])
        self.band_i.append(items[in_band])
        if self.top is not None and merge:
            keep = (v >= self.top_lo[q]) & (v > self.top.vals[q, self.kidx[q]])
            self.top.merge(q[keep], items[keep], v[keep], q_sorted=q_sorted)

    def threshold(self, s0: int) -> torch.Tensor:
        """Per query of s0:s0+b: list the items at or above min(lower band edge, what its top-k still takes)."""
        b = self.ops.b
        lo_s = self.lo[s0 : s0 + b]
        if self.top is None:
            return lo_s
        kth = self.top.vals[s0 : s0 + b].gather(1, self.kidx[s0 : s0 + b, None]).squeeze(1)
        return torch.minimum(lo_s, torch.maximum(self.top_lo[s0 : s0 + b], kth))

    def diagonal_blocks(self) -> int:
        """The diagonal blocks first: they seed the running top-k (tight thresholds from the start). Returns the
        number of items they listed."""
        a, bm, b, dev = self.ops.a, self.ops.bm, self.ops.b, self.ops.h.device
        m = torch.empty(b, b, device=dev)
        mask = torch.empty(b, b, dtype=torch.bool, device=dev)
        eye = torch.arange(b, device=dev)
        diag_listed = 0
        for bi in range(self.ops.nb):
            i0 = bi * b
            torch.mm(a[i0 : i0 + b], bm[i0 : i0 + b].T, out=m)
            m[eye, eye] = -float("inf")  # the query itself
            if self.top is not None:
                v, j = torch.topk(m, min(self.kk, b), dim=1)
                self.top.seed(slice(i0, i0 + b), v, j + i0)
            torch.ge(m, self.lo[i0 : i0 + b, None], out=mask)
            f = _flat_nonzero(mask)
            diag_listed += f.numel()
            self.listed(f // b + i0, f % b + i0, m.view(-1)[f], merge=False)  # the seeds hold this block's best
        return diag_listed

    def off_diagonal_blocks(self) -> None:
        """Every block above the diagonal, one block row at a time: its rows as queries sorted out per block (so
        that their k-th values rise before the next block of the row), its columns as queries per block row."""
        a, bm, b, dev = self.ops.a, self.ops.bm, self.ops.b, self.ops.h.device
        m = torch.empty(b, b, device=dev)
        mask = torch.empty(b, b, dtype=torch.bool, device=dev)
        nb = self.ops.nb
        for bi in range(nb):
            i0 = bi * b
            qs_, its_, vs_ = [], [], []  # one block row's listings, sorted out together (fewer small operations)
            for bj in range(bi + 1, nb):
                j0 = bj * b
                torch.mm(a[i0 : i0 + b], bm[j0 : j0 + b].T, out=m)
                torch.ge(m, self.threshold(j0)[None, :], out=mask)  # columns of the block as queries
                f = _flat_nonzero(mask)
                qs_.append(f % b + j0)
                its_.append(f // b + i0)
                vs_.append(m.view(-1)[f])
                torch.ge(m, self.threshold(i0)[:, None], out=mask)  # rows of the block as queries
                f = _flat_nonzero(mask)
                self.listed(f // b + i0, f % b + j0, m.view(-1)[f], q_sorted=True)  # row-major: queries ascending
                if sum(v.numel() for v in vs_) > FLUSH_ITEMS:  # bounded memory whatever the embedding
                    self.listed(torch.cat(qs_), torch.cat(its_), torch.cat(vs_))
                    qs_, its_, vs_ = [], [], []
            if qs_:
                self.listed(torch.cat(qs_), torch.cat(its_), torch.cat(vs_))

    def neighbours(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The running top-k as k-means' neighbour lists (indices, scores, each row's bound), or None without one.

        An item missing from row i was below the row's floor, or at most its k_i-th value when listed or pushed out
        (that value only rises); rows without a top-k (no positive, R = 1) keep only their diagonal seeds."""
        if self.top is None:
            return None
        n = self.ops.h.shape[0]
        bound = torch.maximum(self.top_lo, self.top.vals.gather(1, self.kidx[:, None]).squeeze(1))
        return self.top.idx[:n], self.top.vals[:n], bound[:n]


def _first_ranks(xt: torch.Tensor, h: torch.Tensor, scan: _BlockScan, t: torch.Tensor, p1: torch.Tensor,
                 lab: torch.Tensor) -> torch.Tensor:
    """Stage 4: each item's rank of its nearest positive: the sure count plus the band items before it in float64
    (a negative with a higher exact score, or an equal one and a lower index)."""
    bq, bit = torch.cat(scan.band_q), torch.cat(scan.band_i)
    rank = scan.sure
    if bq.numel():
        exact = pair_scores(xt, xt, h, bq, bit) - h[bq]
        before = (lab[bit] != lab[bq]) & ((exact > t[bq]) | ((exact == t[bq]) & (bit < p1[bq])))
        rank = rank.index_add(0, bq[before], torch.ones_like(bq[before]))
    return rank[: xt.shape[0]]


def _map_at_r(xt: torch.Tensor, h: torch.Tensor, scan: _BlockScan, qs: Queries, ranks: torch.Tensor, e: torch.Tensor,
              slack: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 5: MAP@R and R-Precision of the scored queries. Closed form where the nearest positive ranks >= R - 1;
    the others from their certified top-k (rows that fail certification: a float64 search against all items)."""
    n, lab, scored = xt.shape[0], qs.labels, qs.scored
    r = qs.r[scored]
    rf = r.to(torch.float64)
    at_r = (ranks + 1 == r).to(torch.float64)
    ap, rp = at_r / (rf * rf), at_r / rf
    need = (ranks + 1 < r).nonzero().ravel()
    if need.numel():
        rows = scored[need]
        rn = r[need]
        top_idx = _certified(xt, h, scan.top, rows, rn, e[rows], slack, scan.top_lo[rows])
        bad = (top_idx[:, 0] < 0).nonzero().ravel()
        if bad.numel():
            top_idx[bad] = _full_topk(xt, h, rows[bad], int(rn.max()))
        rel = (top_idx >= 0) & (top_idx < n) & (lab[top_idx.clamp(0, max(n - 1, 0))] == lab[rows, None])
        mp, pp = map_r_and_r_precision(rel, rn)
        ap[need], rp[need] = mp, pp
    return ap, rp


def _certified(xt: torch.Tensor, h: torch.Tensor, top: _TopK, rows: torch.Tensor, rn: torch.Tensor,
               e: torch.Tensor, slack: int, floor: torch.Tensor) -> torch.Tensor:
    """(rows, max R) item indices in exact order from the first R + slack of each running top-k, recomputed in
    float64; a row whose R-th exact score does not beat the bound on the items left out gets -1 in column 0.
    ``floor``: items with M below it were never merged (a lower bound of the R-th score, minus e)."""
    dev = xt.device
    rmax = int(rn.max())
    k = top.k
    vals, idx = top.vals[rows], top.idx[rows]
    krow = (rn + slack).clamp_max(k)
    pos = torch.arange(k, device=dev)
    live = (idx >= 0) & (idx < xt.shape[0]) & (vals > PAD / 2) & (pos[None, :] < krow[:, None])
    ci = torch.arange(rows.numel(), device=dev)[:, None].expand_as(idx)
    exact = torch.full(idx.shape, -float("inf"), dtype=torch.float64, device=dev)
    exact[live] = pair_scores(xt, xt, h, rows[ci[live]], idx[live]) - h[rows[ci[live]]]
    ex_o, idx_o = exact_order(exact, idx, live)
    v_r = ex_o.gather(1, (rn - 1)[:, None]).squeeze(1)
    # every item left out has M below the floor, or M <= the krow-th value kept (it was at or below the k-th value
    # when listed or when the threshold was set)
    v_last = vals.gather(1, (krow - 1)[:, None]).squeeze(1).double()
    exhausted = ~torch.isfinite(v_last) | (v_last <= PAD / 2)  # fewer items than krow above the floor
    ok = (exhausted | (v_r > v_last + e)) & (v_r >= floor.double() + e)
    out = idx_o[:, :rmax].clone()
    out[~ok, 0] = -1
    return out


def _full_topk(xt: torch.Tensor, h: torch.Tensor, rows: torch.Tensor, k: int, col_chunk: int = 8192) -> torch.Tensor:
    """Float64 top-k of ``rows`` against every other item, exact order (rows the certification could not settle)."""
    n = xt.shape[0]
    dist = torch.empty(rows.numel(), n, dtype=torch.float64, device=xt.device)
    xd = xt[rows].double()
    for s in range(0, n, col_chunk):
        dist[:, s : s + col_chunk] = h[s : s + col_chunk] - xd @ xt[s : s + col_chunk].double().T
    dist[torch.arange(rows.numel(), device=xt.device), rows] = float("inf")
    return ordered_topk(dist, k)
