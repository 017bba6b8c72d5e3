"""Exact retrieval metrics from a bf16 screen: low-precision distances decide what they can, float64 decides the rest.

Scores: s(q, g) = q.g - |g|^2 / 2 (larger = nearer; the same order as the Euclidean distance within a row). Each
query's nearest positive score t1 is computed exactly (float64 dot products of the float32 embeddings, over its
class only), then one bf16 product per chunk screens the whole gallery for the *shifted* score

    z = s - shift,   shift = t1 - gap,   gap > e = a rigorous bound on the product's error for that query
                                                   (``Screen.error_bound``).

The shift rides in the product as three extra bf16 columns (a float64 value split into three bf16 parts, likewise
-|g|^2/2), so near the decision point z is close to zero and the relative bf16 output rounding costs little.
Per item:

- z < 0 (sign bit set)       -> certainly farther than the nearest positive (never looked at again);
- z > (gap + e)(1 + u_bf16)  -> certainly nearer (counted);
- in between (the band)      -> recomputed in float64 and compared exactly (ties broken by index).

Items with z >= 0 are found from the int16 max/min of 64-column blocks, which also give each block's maximum for
the MAP@R search. So ``first_rank`` (hence Recall@K for every K) is the one of float64 arithmetic. MAP@R /
R-Precision: a query whose nearest positive already ranks >= R needs nothing more (closed form); the others take a
two-stage bf16 top-(R + slack) (best blocks, then their best items), recomputed in float64 and *certified*: the
R-th exact score must beat the bound on everything the screen left out; failing rows retry with more slack and,
last, a float64 search of the row. The results equal those of a float64 brute force, at the cost of one bf16
product (AMX / AVX512-BF16 on CPU) and one reduction pass per chunk.
"""

from __future__ import annotations

import numpy as np
import torch

from dml_runner.devices import exact_float32_matmul
from dml_runner.evaluation.retrieval import (
    PositiveIndex,
    RetrievalStats,
    collect_stats,
    map_r_and_r_precision,
    ordered_topk,
    positives_of,
    prepare_queries,
)

U_BF16 = 2.0**-7  # bound on the bf16 output conversion error (2^-8 when rounded to nearest; 2^-7 if truncated)
# The screen's product precision: bf16 where the CPU multiplies it natively, float32 elsewhere (same algorithm: the
# float32 screen's band is ~2^16 times thinner, its product ~2-8x slower). Output rounding bound and the integer
# type whose order matches the float's bit patterns (for the block maxima).
U_OUT = {torch.bfloat16: U_BF16, torch.float32: 2.0**-23}
INT_VIEW = {torch.bfloat16: torch.int16, torch.float32: torch.int32}
U_F32 = 2.0**-24
COL_ALIGN = 1024  # gallery padded to a multiple: 8 bools per int64 word, 128 words per byte-lane segment
SEGMENT_WORDS = 128
MAX_BLOCK = 64  # columns per block maximum (int16 max/min): candidate blocks and the two-stage top-k of MAP@R
SLACK_LEVELS = (4, 24, 160)  # extra screened neighbours per row for MAP@R, tried in turn until certified
PAIR_BATCH = 512  # small batches keep the float64 temporaries in cache (a CPU's)
PAIR_BATCH_GPU = 1 << 16  # on a GPU one kernel per 512 pairs would be thousands of tiny launches
PAD_SCORE = -1e30
BAND_SWITCH = 64  # mean candidate blocks per row above which the sure items are counted, not listed


def split3(v: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(n,) float64 -> (n, 3) ``dtype`` parts whose float64 sum equals v to ~2^-24 relative (bf16; float32: 2^-72)."""
    parts = []
    rest = v.clone()
    for _ in range(3):
        p = rest.to(dtype)
        parts.append(p)
        rest = rest - p.to(torch.float64)
    return torch.stack(parts, dim=1)


def row_count(mask: torch.Tensor) -> torch.Tensor:
    """Per-row number of True in a (r, c) bool tensor, c a multiple of COL_ALIGN.

    Reads 8 bools as one int64 word and sums 128 words at a time (each byte lane stays < 256), then the bytes:
    ~20x faster on CPU than ``mask.sum(1)``, which converts every bool to an integer.
    """
    r, c = mask.shape
    words = mask.view(torch.int64).view(r, c // (8 * SEGMENT_WORDS), SEGMENT_WORDS).sum(dim=2)
    return words.view(torch.uint8).view(r, -1).sum(dim=1, dtype=torch.int64)


def mask_nonzero(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``mask.nonzero(as_tuple=True)`` for a sparse (r, c) bool mask, c a multiple of 8: scans int64 words (8
    bools each) first, then only the bytes of the non-zero words. Same (row-major) order."""
    r, c = mask.shape
    words = mask.view(torch.int64)
    wr, wc = (words != 0).nonzero(as_tuple=True)
    k, b = mask.view(r, c // 8, 8)[wr, wc].nonzero(as_tuple=True)
    return wr[k], wc[k] * 8 + b


def pair_scores(q: torch.Tensor, g: torch.Tensor, half_sq_g: torch.Tensor, rows: torch.Tensor,
                cols: torch.Tensor) -> torch.Tensor:
    """Exact-as-float64 s = q[rows] . g[cols] - |g[cols]|^2 / 2 for paired index vectors (products of float32
    values are exact in float64; only the D-term sum rounds, at 2^-53)."""
    out = torch.empty(rows.numel(), dtype=torch.float64, device=q.device)
    step = PAIR_BATCH if q.device.type == "cpu" else PAIR_BATCH_GPU
    for s in range(0, rows.numel(), step):
        r, c = rows[s : s + step], cols[s : s + step]
        prod = q.index_select(0, r).double().mul_(g.index_select(0, c).double())  # index_select: 1.5x faster
        out[s : s + step] = prod.sum(dim=1) - half_sq_g[c]
    return out


def exact_nearest_positive(q: torch.Tensor, g: torch.Tensor, half_sq_g: torch.Tensor, pidx: PositiveIndex,
                           rows: torch.Tensor, self_cols: torch.Tensor, with_lowest: bool = False):
    """Score t1 = max over the positives p of q . g_p - |g_p|^2 / 2 (exact as float64) of each query ``rows`` and
    the lowest gallery index p1 reaching it; over its own class only (rows need >= 1 positive).
    ``with_lowest``: also the lowest positive score (the R-th best score of a query is at least that)."""
    cols, valid = positives_of(pidx, rows, self_cols)
    rr = rows[:, None].expand_as(cols)
    pscore = torch.full(cols.shape, -float("inf"), dtype=torch.float64, device=q.device)
    pscore[valid] = pair_scores(q, g, half_sq_g, rr[valid], cols[valid])
    t1 = pscore.max(dim=1).values
    big = torch.iinfo(torch.int64).max
    p1 = torch.where(valid & (pscore == t1[:, None]), cols, torch.full_like(cols, big)).min(dim=1).values
    if with_lowest:
        return t1, p1, pscore.masked_fill(~valid, float("inf")).min(dim=1).values
    return t1, p1


class Screen:
    """The augmented low-precision (bf16 or float32) gallery and the per-query error-bound terms."""

    def __init__(self, q: torch.Tensor, g: torch.Tensor, row_chunk: int = 8192, dtype: torch.dtype = torch.bfloat16):
        dev = q.device
        if dtype not in U_OUT:
            raise ValueError(f"screen dtype must be bfloat16 or float32; got {dtype}")
        self.dtype = dtype
        self.n, d = g.shape
        self.d = d
        self.k = -(-(d + 6) // 8) * 8  # K: the embedding, 3 + 3 extra columns, padded
        self.n_pad = -(-self.n // COL_ALIGN) * COL_ALIGN
        self.ga = torch.zeros(self.n_pad, self.k, dtype=dtype, device=dev)
        self.ga[:, d + 3 : d + 6] = 1
        self.ga[self.n :, d] = PAD_SCORE  # padding columns never pass any threshold
        self.half_sq_g = torch.empty(self.n, dtype=torch.float64, device=dev)
        g_norm, gb_norm, e_g, gparts_abs, g_resid = (torch.zeros(self.n, dtype=torch.float64, device=dev)
                                                      for _ in range(5))
        # per-row statistics in float64, a slice at a time (no full float64 copy of the gallery)
        for s in range(0, self.n, row_chunk):
            e = min(s + row_chunk, self.n)
            gd = g[s:e].double()
            gb = gd.to(dtype)
            hsq = 0.5 * (gd * gd).sum(dim=1)
            parts = split3(-hsq, dtype)
            self.half_sq_g[s:e] = hsq
            self.ga[s:e, :d] = gb
            self.ga[s:e, d : d + 3] = parts
            g_norm[s:e] = gd.norm(dim=1)
            gb_norm[s:e] = gb.double().norm(dim=1)
            e_g[s:e] = (gd - gb.double()).norm(dim=1)
            gparts_abs[s:e] = parts.double().abs().sum(dim=1)
            g_resid[s:e] = (-hsq - parts.double().sum(dim=1)).abs()
        self.qb = q.to(dtype)
        self.qb_norm = torch.empty(q.shape[0], dtype=torch.float64, device=dev)
        self.e_q = torch.empty(q.shape[0], dtype=torch.float64, device=dev)
        for s in range(0, q.shape[0], row_chunk):
            qd, qbd = q[s : s + row_chunk].double(), self.qb[s : s + row_chunk].double()
            self.qb_norm[s : s + row_chunk] = qbd.norm(dim=1)
            self.e_q[s : s + row_chunk] = (qd - qbd).norm(dim=1)
        # |q.g - qb.gb| <= |q - qb| |g| + |qb| |g - gb|  (Cauchy-Schwarz), with the gallery's worst case
        mx = lambda v: float(v.max()) if v.numel() else 0.0  # noqa: E731
        self.g_norm_max, self.gb_norm_max, self.e_g_max = mx(g_norm), mx(gb_norm), mx(e_g)
        self.gparts_abs_max, self.g_resid_max = mx(gparts_abs), mx(g_resid)

    def fits_bf16(self) -> bool:
        """False when a value or a squared norm overflowed the bf16 / float32 range (embeddings of norm > ~1e19)."""
        limit = 1e38
        return bool(torch.isfinite(self.ga).all()) and bool(torch.isfinite(self.qb).all()) and max(
            self.gparts_abs_max, self.g_norm_max, float(self.qb_norm.max()) if self.qb_norm.numel() else 0.0) < limit

    def error_bound(self, rows: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bound on |fp32 result - exact (s - shift)| for the product of ``rows`` with every gallery item, and the
        bf16 parts of -shift."""
        sparts = split3(-shift, self.dtype)
        s_resid = (-shift - sparts.double().sum(dim=1)).abs()
        rounding = self.e_q[rows] * self.g_norm_max + self.qb_norm[rows] * self.e_g_max
        magnitude = self.qb_norm[rows] * self.gb_norm_max + self.gparts_abs_max + sparts.double().abs().sum(dim=1)
        accumulate = 2 * (self.k + 8) * U_F32 * magnitude  # fp32 accumulation, any order
        bound = rounding + accumulate + self.g_resid_max + s_resid
        return bound * 1.0625 + 1e-30, sparts

    def product(self, rows: torch.Tensor, sparts: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        qa = torch.empty(rows.numel(), self.k, dtype=self.dtype, device=self.qb.device)
        qa.zero_()
        qa[:, : self.d] = self.qb[rows]
        qa[:, self.d : self.d + 3] = 1
        qa[:, self.d + 3 : self.d + 6] = sparts
        return torch.mm(qa, self.ga.T, out=out)


# The retrieval backends share exact_retrieval's signature on purpose: evaluate() swaps one for another.
@exact_float32_matmul()  # a float32 screen never in TF32 on CUDA (its error bound assumes float32 products)
def screened_retrieval(
    queries: np.ndarray,
    query_labels: np.ndarray,
    gallery: np.ndarray,
    gallery_labels: np.ndarray,
    self_index: np.ndarray,
    *,
    need_ranking: bool = True,
    device: torch.device = torch.device("cpu"),
    chunk_size: int = 2048,
    give_up_if_weak: bool = False,
    dtype: torch.dtype = torch.bfloat16,
) -> RetrievalStats | None:
    """Same statistics as :func:`dml_runner.evaluation.retrieval.exact_retrieval`, from a certified screen whose
    product runs in ``dtype`` (bf16, or float32 where the CPU has no native bf16); either way the results are those
    of float64 arithmetic.

    ``give_up_if_weak``: return None after the first chunk when its band (items the screen cannot decide) is so wide
    that the float64 rechecks would cost more than a float32 search (embeddings close to random: many items lie
    within the bf16 error of each query's nearest positive); the caller then runs the float32 search.
    """
    cuda_bf16 = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    if torch.device(device).type == "cuda" and dtype == torch.bfloat16 and cuda_bf16:
        # the error bound assumes float32 accumulation: no bf16 partial sums inside cuBLAS
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
        try:
            return screened_retrieval(queries, query_labels, gallery, gallery_labels, self_index,
                                      need_ranking=need_ranking, device=device, chunk_size=chunk_size,
                                      give_up_if_weak=give_up_if_weak, dtype=dtype)
        finally:
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = cuda_bf16
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        # the error bound assumes float32 products: no bf16 / TF32 inside "float32" matrix products
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            return screened_retrieval(queries, query_labels, gallery, gallery_labels, self_index,
                                      need_ranking=need_ranking, device=device, chunk_size=chunk_size,
                                      give_up_if_weak=give_up_if_weak, dtype=dtype)
        finally:
            torch.set_float32_matmul_precision(before)
    q = torch.as_tensor(queries, device=device, dtype=torch.float32)
    g = torch.as_tensor(gallery, device=device, dtype=torch.float32)
    sc = Screen(q, g, dtype=dtype)
    u_out, int_view = U_OUT[dtype], INT_VIEW[dtype]
    n = sc.n
    if not sc.fits_bf16():
        if give_up_if_weak:
            return None
        raise ValueError("embeddings too large for the bf16 screen (|x|^2 / 2 beyond the bf16 range of ~3e38); "
                         "use backend 'torch_fp32'")
    qs = prepare_queries(query_labels, gallery_labels, self_index, device)
    pidx, selft, r_all, lab_q, lab_g, scored = qs.pidx, qs.self_index, qs.r, qs.labels, qs.gallery_labels, qs.scored
    ranks, maps, rps = [], [], []
    rows_max = max(1, min(chunk_size, scored.numel()))
    block = torch.empty(rows_max, sc.n_pad, dtype=dtype, device=device)
    mask = None  # boolean block, only for the many-candidates path
    for s in range(0, scored.numel(), chunk_size):
        rows = scored[s : s + chunk_size]
        c = rows.numel()
        sel = selft[rows]
        # 1. exact nearest positive (float64) over the query's own class
        t1, p1 = exact_nearest_positive(q, g, sc.half_sq_g, pidx, rows, sel)
        # 2. screen: z = s - shift in bf16 with shift = t1 - gap and gap > the error bound e of the product
        e0, _ = sc.error_bound(rows, t1)
        gap = 1.0625 * e0
        e, sparts = sc.error_bound(rows, t1 - gap)
        while bool((e >= gap).any()):  # the bound hardly depends on the shift; this loop is a safeguard
            gap = torch.where(e >= gap, 2 * e, gap)
            e, sparts = sc.error_bound(rows, t1 - gap)
        shift = t1 - gap
        z = sc.product(rows, sparts, block[:c])
        has_self = (sel >= 0).nonzero().ravel()
        z[has_self, sel[has_self]] = -float("inf")
        # s >= t1 -> fp32 result >= gap - e > 0 -> z >= 0 (rounding keeps the sign), so z < 0 is surely farther;
        # z > hi -> s - shift >= z / (1 + u) - e > gap, i.e. surely nearer than the nearest positive.
        hi = (gap + e) * (1 + 1.01 * u_out)
        # Block maxima (int16 max/min of 64-column blocks): a block holds a candidate (z >= 0, sign bit clear)
        # iff its int16 max is >= 0; the maxima also serve the top-R search of MAP@R.
        bmax, has_cand = block_max(z, with_nonnegative=True)
        cb_r, cb_b = has_cand.nonzero(as_tuple=True)
        if cb_r.numel() <= BAND_SWITCH * c:
            vals = z.view(c, -1, MAX_BLOCK)[cb_r, cb_b]  # the candidate blocks only
            k, j = (vals.view(int_view) >= 0).nonzero(as_tuple=True)
            ri, cj = cb_r[k], cb_b[k] * MAX_BLOCK + j
            sure = vals[k, j].double() > hi[ri]
            rank = torch.zeros(c, dtype=torch.int64, device=device).index_add_(
                0, ri[sure], torch.ones_like(ri[sure]))
            bri, bcj = ri[~sure], cj[~sure]
        else:
            # candidates everywhere (a weak embedding): count the sure ones without listing them, list the band
            if mask is None:
                mask = torch.empty(rows_max, sc.n_pad, dtype=torch.bool, device=device)
            m = mask[:c]
            torch.ge(z.view(int_view), 0, out=m)  # sign bit clear: +0 or positive (-inf self, padding excluded)
            hi_b = (hi * (1 + 64 * u_out)).to(dtype)  # rounded up: z > hi_b still implies z > hi
            sure_mask = torch.gt(z, hi_b[:, None])
            rank = row_count(sure_mask)
            torch.logical_xor(m, sure_mask, out=m)
            del sure_mask
            bri, bcj = mask_nonzero(m)
        if give_up_if_weak and s == 0 and bri.numel() > band_limit(n) * c:
            return None
        if bri.numel():
            exact = pair_scores(q, g, sc.half_sq_g, rows[bri], bcj)
            before = (lab_g[bcj] != lab_q[rows[bri]]) & (
                (exact > t1[bri]) | ((exact == t1[bri]) & (bcj < p1[bri])))
            rank.index_add_(0, bri[before], torch.ones_like(bri[before]))
        ranks.append(rank)
        if need_ranking:
            r = r_all[rows]
            ap, rp = _map_rows(q, g, sc, z, bmax, rows, rank, r, shift, e, sel, lab_g, lab_q)
            maps.append(ap)
            rps.append(rp)
    del block, mask
    return collect_stats(ranks, maps, rps, queries.shape[0], scored.numel())


def band_limit(gallery_size: int) -> float:
    """Mean band items per query above which float64 rechecks (~1 us each) cost more than the float32 search of
    that query (~3.5 ns more per gallery item than the screen on the CPU measured in docs/PERFORMANCE.md)."""
    return max(64.0, gallery_size / 256)


def block_max(z: torch.Tensor, with_nonnegative: bool = False):
    """(c, n_pad) bf16 -> (c, n_pad / MAX_BLOCK) bf16 maxima of consecutive column blocks [, and whether each block
    holds a value with the sign bit clear].

    Reduces the int16 view (about 4x faster than bf16 reductions on CPU): bf16 bit patterns order like int16 for
    non-negative values and in reverse for negative ones, so a block's maximum is its int16 max when that is
    >= 0 and its int16 min otherwise.
    """
    c, n = z.shape
    zi = z.view(INT_VIEW[z.dtype]).view(c, n // MAX_BLOCK, MAX_BLOCK)
    hi, lo = zi.amax(dim=2), zi.amin(dim=2)
    nonneg = hi >= 0
    bmax = torch.where(nonneg, hi, lo).view(z.dtype)
    return (bmax, nonneg) if with_nonnegative else bmax


def _map_rows(q, g, sc: Screen, z, bmax, rows, rank, r, shift, e, sel, lab_g, lab_q):
    """MAP@R and R-Precision of one chunk (see the module docstring)."""
    rf = r.to(torch.float64)
    # closed form when the nearest positive ranks >= R: only it can be in the top R (at position rank + 1 = R)
    at_r = (rank + 1 == r).to(torch.float64)
    ap = at_r / (rf * rf)
    rp = at_r / rf
    need = (rank + 1 < r).nonzero().ravel()
    if not need.numel():
        return ap, rp
    rn = r[need]
    rmax = int(rn.max())
    top = torch.empty(need.numel(), rmax, dtype=torch.int64, device=z.device)
    todo = torch.arange(need.numel(), device=z.device)
    for slack in SLACK_LEVELS:  # most rows certify with a few extra neighbours, the rest retry with more
        sub = need[todo]
        t, ok = _certified_top(q, g, sc, z, bmax, sub, rows[sub], r[sub], shift[sub], e[sub], slack, rmax)
        top[todo[ok]] = t[ok]
        todo = todo[~ok]
        if not todo.numel():
            break
    if todo.numel():
        top[todo] = _full_topk(q, g, sc, rows[need[todo]], sel[need[todo]], rmax)
    rel = (top < sc.n) & (lab_g[top.clamp_max(sc.n - 1)] == lab_q[rows[need], None])
    m, p = map_r_and_r_precision(rel, rn)
    ap[need], rp[need] = m, p
    return ap, rp


def _certified_top(q, g, sc: Screen, z, bmax, sub, rows, rn, shift, e, slack, rmax):
    """Top-rmax gallery indices (exact order) of chunk rows ``sub`` from their top R + slack screened neighbours,
    and whether the exact R-th score beats the error bound of everything the screen left out.

    The screened neighbours come from the k blocks with the highest maxima (k = max R + slack): any item among a
    row's top k lies in one of those blocks, and an item outside them is at most the k-th block maximum.
    """
    dev = z.device
    nb = bmax.shape[1]
    kb = min(rmax + slack, nb)
    bv, bi = torch.topk(bmax[sub], kb, dim=1, largest=True, sorted=True)
    cand = z.view(z.shape[0], nb, MAX_BLOCK)[sub[:, None], bi].view(sub.numel(), kb * MAX_BLOCK)
    k = min(rmax + slack, kb * MAX_BLOCK)
    zs, j = torch.topk(cand, k, dim=1, largest=True, sorted=True)
    idx = (bi[:, :, None] * MAX_BLOCK + torch.arange(MAX_BLOCK, device=dev)).view(sub.numel(), -1).gather(1, j)
    zs = zs.float()
    # per row only the first R + slack screened neighbours are recomputed; the rest is "left out"
    krow = (rn + slack).clamp_max(k)
    pos = torch.arange(k, device=dev)
    finite = torch.isfinite(zs) & (idx < sc.n) & (pos[None, :] < krow[:, None])
    ci = torch.arange(rows.numel(), device=dev)[:, None].expand_as(idx)
    exact = torch.full(idx.shape, -float("inf"), dtype=torch.float64, device=dev)
    exact[finite] = pair_scores(q, g, sc.half_sq_g, rows[ci[finite]], idx[finite])
    exact_o, idx_o = exact_order(exact, idx, finite)
    # certification: every left-out item has z <= z_last, so its s - shift <= z_last + err(z_last)
    v_r = exact_o.gather(1, (rn - 1)[:, None]).squeeze(1) - shift
    z_last = zs.gather(1, (krow - 1)[:, None]).squeeze(1)
    if kb < nb:  # items in blocks that were not fetched
        z_last = torch.maximum(z_last, bv[:, -1].float())
    z_last = z_last.double()
    left_out_max = z_last + e + U_OUT[z.dtype] * 1.01 * z_last.abs()
    exhausted = ~torch.isfinite(z_last) | (z_last <= PAD_SCORE / 2)
    return idx_o[:, :rmax], exhausted | (v_r > left_out_max)


def exact_order(exact: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's candidates ordered by (exact score descending, index ascending); invalid ones last, with the
    index int64 max."""
    big = torch.iinfo(torch.int64).max
    key = torch.where(valid, idx, torch.full_like(idx, big))
    order = torch.sort(key, dim=1).indices
    exact_o, idx_o = exact.gather(1, order), key.gather(1, order)
    order2 = torch.sort(exact_o, dim=1, descending=True, stable=True).indices
    return exact_o.gather(1, order2), idx_o.gather(1, order2)


def _full_topk(q, g, sc: Screen, rows, sel, k, col_chunk: int = 8192):
    """Float64 top-k against the whole gallery (rows the screen could not certify; rare)."""
    dist = torch.empty(rows.numel(), sc.n, dtype=torch.float64, device=q.device)
    qd = q[rows].double()
    for s in range(0, sc.n, col_chunk):
        dist[:, s : s + col_chunk] = sc.half_sq_g[s : s + col_chunk] - qd @ g[s : s + col_chunk].double().T
    has_self = (sel >= 0).nonzero().ravel()
    dist[has_self, sel[has_self]] = float("inf")
    return ordered_topk(dist, k)
