"""k-means: greedy k-means++ seeding, Lloyd iterations with a bf16 or float32 assignment, early stop.

Public API: :func:`kmeans` ``(x, k, *, niter, seed, backend, ...) -> (centroids, assignments)`` for float32 numpy
arrays or torch tensors (CPU or CUDA); evaluation (NMI, F1) and any method that clusters call it.

- **Seeding**: greedy k-means++ (Arthur & Vassilvitskii 2007, with the ``2 + ln k`` local trials of scikit-learn):
  each new centre is the best of a few candidates drawn with probability proportional to D(x)^2, the squared
  distance to the nearest centre so far. Each step reads the data once, so for k > ``GREEDY_MAX_K`` the centres are
  drawn in about ``SEED_ROUNDS`` rounds of ``ceil(k / SEED_ROUNDS)`` D^2 draws each (k-means||-style oversampling),
  each draw kept with the probability that makes it a sequential k-means++ draw given those kept before it in its
  round (rejection sampling, so two draws rarely land in one cluster); a round finds each point's nearest new seed
  with the assignment product below, and the seeding's nearest seeds are Lloyd's first assignment. Up to
  ``GREEDY_MAX_K`` clusters the seeding is exactly greedy k-means++ (float32).
- **Neighbour lists** (``neighbours=(idx, d2, bound)``, optional, round mode only): for each point a list of near
  points with their squared distances and a bound below which the list is complete (the leave-one-out retrieval
  has them). A point whose list holds a seed is *known*: any later seed missing from its list lies at least
  ``bound`` away, farther than that listed seed, so only the listed seeds can still lower its D^2 and they come
  from the reversed lists (a few pairs per seed). Each round multiplies only the points not known yet against its
  new seeds: the same D^2 (up to the rounding of the listed distances against the product's), the same draws and
  the same nearest seeds, with a fraction of the products (SOP-like data, top-20 lists: 62% of the points known
  after a quarter of the rounds, 95% after three quarters, a quarter of the products of a full round pass).
- **Lloyd with neighbour lists** (:func:`_assign_listed`): the same lists settle most of each later assignment.
  With V_j the spread of cluster j (mean squared distance of its members to its centroid), |x - c_j|^2 equals the
  mean of |x - y|^2 over its members minus V_j, so a cluster none of whose members x's list holds is at least
  bound_x - V_j away. The candidates of x (the clusters of its listed neighbours, its own, and the LOOSE_CLUSTERS
  clusters of largest spread for every point) then certify its nearest centroid whenever that one is nearer than
  bound_x minus the largest remaining spread; the other points get the full product (SOP-like data: about a tenth).
- **Assignment**: argmin_k |x - c_k|^2 = argmax_k (x . c_k - |c_k|^2 / 2) on mean-centred data; |c_k|^2 / 2 rides in
  the product as two extra columns (a two-part split, so bf16 keeps it to ~2^-16), so one (chunk x k) product and a
  block argmax per chunk are the whole step. bf16 (where the CPU multiplies it natively, and on CUDA) or float32:
  :func:`dml_runner.evaluation.cpu.kmeans_dtype`; bf16 rounding can only flip points near-equidistant from two
  centroids.
- **Stop**: when at most ``tol`` of the points change cluster, or after ``niter`` iterations. An empty cluster is
  re-seeded on the point farthest from its centroid.
- ``backend="faiss"``: faiss.Kmeans (random seeding, exactly ``niter`` iterations), as pytorch-metric-learning runs
  it; ``"auto"`` is ``torch`` (see docs/PERFORMANCE.md, "k-means: ours vs faiss.Kmeans").
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import torch

from dml_runner.devices import exact_float32_matmul
from dml_runner.evaluation.cpu import kmeans_dtype

ARGMAX_BLOCK = 64  # columns per block of block_argmax (amax per block, then argmax inside the winner)
GREEDY_MAX_K = 256  # up to this k: exact greedy k-means++ (k passes over the data, 2 + ln k candidates each)
SEED_ROUNDS = 64  # above it: about this many passes over the data, several draws per pass
# Seeding steps on at most this many values run on one CPU thread: each step is a few small ops whose OpenMP
# start-up and barriers cost more than the work (3-12x slower with 2 threads on a busy 2-core machine).
SEED_ONE_THREAD_VALUES = 2**20
# With neighbour lists the rounds multiply a gathered copy of the points not known yet, gathered again once those
# are at most this fraction of the copy (until then the known rows in it are multiplied and ignored: a copy costs
# about half a product of its rows, so re-gathering every round would cost more than it saves).
GATHER_BELOW = 0.75
# Lloyd with neighbour lists: the clusters of largest spread, computed for every point (one n x LOOSE_CLUSTERS
# product); the other clusters only for the points whose lists name a member. CANDIDATE_ROWS: points per batched
# candidate product.
LOOSE_CLUSTERS = 1024
CANDIDATE_ROWS = 4096
CANDIDATES = 16
KMEANS_BACKENDS = ("auto", "torch", "faiss")


def low_precision_dtype(device: torch.device) -> torch.dtype:
    """The k-means assignment dtype chosen for ``device`` (honours DML_KMEANS_PRECISION / DML_CPU_PATH)."""
    return kmeans_dtype(device)


def block_argmax(s: torch.Tensor) -> torch.Tensor:
    """First index of the row maximum; columns a multiple of ARGMAX_BLOCK.

    torch's argmax is ~15x slower than amax on CPU, so: max per block of 64 columns (amax), argmax over the few
    block maxima, then argmax inside the winning block only.
    """
    r, k = s.shape
    blocks = s.view(r, k // ARGMAX_BLOCK, ARGMAX_BLOCK)
    best_block = blocks.amax(dim=2).argmax(dim=1)
    inside = blocks[torch.arange(r, device=s.device), best_block].argmax(dim=1)
    return best_block * ARGMAX_BLOCK + inside


def augment(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[x, 1, 1] in ``dtype``: the two ones pick up the two parts of -|c|^2 / 2."""
    n = x.shape[0]
    return torch.cat([x, torch.ones(n, 2, device=x.device)], dim=1).to(dtype)


def _assign(x_aug: torch.Tensor, centroids: torch.Tensor, dtype: torch.dtype, chunk: int,
            with_score: bool = False):
    """Nearest centroid of every row of ``x_aug`` (from :func:`augment`), lowest index among exact ties [and its
    score x . c - |c|^2 / 2 as the product gave it]."""
    k, d = centroids.shape
    kp = -(-k // ARGMAX_BLOCK) * ARGMAX_BLOCK
    half = -0.5 * (centroids.double() ** 2).sum(1)
    hi = half.to(dtype)
    lo = (half - hi.double()).to(dtype)
    c_aug = torch.zeros(kp, d + 2, device=centroids.device, dtype=dtype)
    c_aug[:k, :d] = centroids.to(dtype)
    c_aug[:k, d] = hi
    c_aug[:k, d + 1] = lo
    c_aug[k:, d] = -1e30  # padding centroids never win
    out = torch.empty(x_aug.shape[0], dtype=torch.int64, device=x_aug.device)
    best = torch.empty(x_aug.shape[0], dtype=dtype, device=x_aug.device) if with_score else None
    scores = torch.empty(min(chunk, x_aug.shape[0]), kp, dtype=dtype, device=x_aug.device)  # reused
    for s in range(0, x_aug.shape[0], chunk):
        xs = x_aug[s : s + chunk]
        sc = torch.mm(xs, c_aug.T, out=scores[: xs.shape[0]])
        idx = block_argmax(sc)
        out[s : s + chunk] = idx
        if best is not None:
            best[s : s + chunk] = sc.gather(1, idx[:, None])[:, 0]
    return (out, best) if with_score else out


def _sq_dist_to(x: torch.Tensor, xn: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(m, n) squared distances of the rows of c to the rows of x (squared norms xn), float32, >= 0."""
    return torch.addmm((c * c).sum(1)[:, None] + xn[None, :], c, x.T, alpha=-2.0).clamp_min_(0.0)


def _draw(weights: torch.Tensor, m: int, gen: torch.Generator) -> torch.Tensor:
    """m indices drawn with probability proportional to ``weights`` (uniformly when they are all zero)."""
    cum = torch.cumsum(weights.double(), 0)
    total = float(cum[-1])
    u = torch.rand(m, generator=gen, dtype=torch.float64).to(weights.device)
    if total <= 0.0:
        return (u * weights.numel()).long().clamp_max_(weights.numel() - 1)
    return torch.searchsorted(cum, u * total, right=True).clamp_max_(weights.numel() - 1)


@contextmanager
def _cpu_threads(x: torch.Tensor):
    """One intra-op thread for small CPU problems (SEED_ONE_THREAD_VALUES), the current setting otherwise."""
    before = torch.get_num_threads()
    small = x.device.type == "cpu" and x.numel() <= SEED_ONE_THREAD_VALUES and before > 1
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if small:
            torch.set_num_threads(before)


Neighbours = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class _ReverseLists:
    """The usable entries of neighbour lists (idx, d2, bound), reversed: for each point s, the rows i whose list
    holds s with d2 < bound[i] (then every point missing from row i lies at least bound[i] from x_i), as CSR."""

    def __init__(self, neighbours: Neighbours, n: int, device: torch.device):
        if not (isinstance(neighbours, (tuple, list)) and len(neighbours) == 3):
            raise ValueError("k-means neighbours must be a tuple (idx (n, L), d2 (n, L), bound (n,)); "
                             f"got {type(neighbours).__name__}")
        idx, d2, bound = (torch.as_tensor(t).to(device) for t in neighbours)
        if idx.ndim != 2 or idx.shape[0] != n or d2.shape != idx.shape or bound.shape != (n,):
            raise ValueError(f"k-means neighbours must be idx (n, L), d2 (n, L), bound (n,) with n = {n} points; "
                             f"got shapes {tuple(idx.shape)}, {tuple(d2.shape)}, {tuple(bound.shape)}")
        if idx.is_floating_point() or idx.dtype == torch.bool:
            raise ValueError(f"k-means neighbours idx must hold integer row indices; got {idx.dtype}")
        idx = idx.long()
        d2 = d2.float()
        rows = torch.arange(n, device=device)[:, None].expand_as(idx)
        ok = (idx >= 0) & (idx < n) & (idx != rows) & (d2 < bound.float()[:, None])
        col = idx[ok]
        order = torch.argsort(col, stable=True)
        self.rows = rows[ok][order]  # (nnz,) the row whose list holds the entry
        self.d2 = d2[ok][order]  # (nnz,) its listed squared distance
        self.ptr = torch.zeros(n + 1, dtype=torch.int64, device=device)  # entries of point s: ptr[s] .. ptr[s+1]
        self.ptr[1:] = torch.cumsum(torch.bincount(col, minlength=n), 0)
        # the forward lists, for the certified Lloyd assignment: usable entries' indices (-1 elsewhere), squared
        # distances (+inf elsewhere) and bounds
        self.fwd_idx = torch.where(ok, idx, torch.full_like(idx, -1))
        self.fwd_d2 = torch.where(ok, d2, torch.full_like(d2, math.inf))
        self.bound = bound.float()

    def pairs(self, pick: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row, position in pick, listed d2) of every usable list entry naming one of the points ``pick``."""
        starts = self.ptr[pick]
        lens = self.ptr[pick + 1] - starts
        pos = torch.repeat_interleave(torch.arange(pick.numel(), device=pick.device), lens)
        offs = torch.arange(pos.numel(), device=pick.device) + (starts - (torch.cumsum(lens, 0) - lens))[pos]
        return self.rows[offs], pos, self.d2[offs]


def kmeanspp(x: torch.Tensor, k: int, gen: torch.Generator, trials: int | None = None,
             rounds: int | None = None, x_aug: torch.Tensor | None = None, return_assign: bool = False,
             neighbours: Neighbours | None = None):
    """Indices of k seed points: greedy k-means++ (``trials`` candidates per centre, default 2 + ln k) in k passes
    over the data, or (default when k > GREEDY_MAX_K) in about ``rounds`` passes of several D^2 draws each.

    ``x_aug`` (:func:`augment` of ``x``, bf16 or float32): the rounds find each point's nearest new seed with the
    assignment product in its precision (D^2 = |x|^2 - 2 max score only weights the draws: its rounding changes
    which points are drawn, not the result's correctness); the greedy steps stay float32.
    ``return_assign``: also the position (in the returned seeds) of each point's nearest seed, as the seeding's
    distances found it (Lloyd's first assignment, without another pass over the data).
    ``neighbours``: ``(idx (n, L) int64, d2 (n, L) float32, bound (n,) float32)``: row i lists points near x_i
    (entries outside 0..n-1 are unused) with their squared distances; every point not listed lies at least
    ``bound[i]`` from x_i, and only entries with d2 < bound[i] are used. The rounds then multiply only the points
    whose list holds no seed yet (module docstring); the greedy steps ignore them."""
    if rounds is None:
        rounds = k if k <= GREEDY_MAX_K else SEED_ROUNDS
    lists = neighbours
    if neighbours is not None and not isinstance(neighbours, _ReverseLists):
        lists = _ReverseLists(neighbours, x.shape[0], x.device)
    with _cpu_threads(x):
        seeds, assign = _kmeanspp(x, k, gen, trials, rounds, x_aug, lists=lists)
    return (seeds, assign) if return_assign else seeds


def _kmeanspp(x: torch.Tensor, k: int, gen: torch.Generator, trials: int | None, rounds: int,
              x_aug: torch.Tensor | None, chunk: int = 8192,
              lists: _ReverseLists | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[0]
    xn = (x * x).sum(1)
    first = torch.randint(n, (1,), generator=gen).to(x.device)
    chosen = [first]
    d2 = _sq_dist_to(x, xn, x[first])[0]
    assign = torch.zeros(n, dtype=torch.int64, device=x.device)
    count = 1
    per_round = max(1, -(-(k - 1) // max(rounds, 1)))
    trials = trials or (2 + int(math.log(k)) if per_round == 1 else 1)
    # known[i]: the usable list of point i holds a seed, so a later seed missing from that list is at least
    # bound[i] > (that seed's distance) >= D^2(i) away and can never lower D^2(i): only listed seeds can.
    known = None
    # the rows the round products multiply (None: every point) and their x (or x_aug) and |x|^2
    rows, xr, xnr = None, (x if x_aug is None else x_aug), xn
    if lists is not None and per_round > 1:
        known = torch.zeros(n, dtype=torch.bool, device=x.device)
        known[lists.pairs(first)[0]] = True  # their D^2 is exact already: the product above covered every point
    while count < k:
        m = min(per_round, k - count)
        if m == 1:
            cand = _draw(d2, trials, gen)
            dc = _sq_dist_to(x, xn, x[cand])
            best = int(torch.minimum(d2[None, :], dc).sum(1).argmin())
            pick = cand[best : best + 1]
            closer = dc[best] < d2  # every point, known ones too: a single seed costs one pass over x
            assign[closer] = count
            d2 = torch.where(closer, dc[best], d2)
        else:
            cand = _draw(d2, m, gen)
            xc = x[cand].double()
            sq = (xc * xc).sum(1)
            cc = (sq[:, None] + sq[None, :] - 2.0 * (xc @ xc.T)).clamp_min_(0.0)  # (m, m), m ~ k / SEED_ROUNDS
            keep = _sequential_acceptance(cc.cpu().numpy(), d2[cand].cpu().double().numpy(),
                                          torch.rand(cand.numel(), generator=gen, dtype=torch.float64).numpy())
            pick = cand[torch.as_tensor(keep, device=x.device)]
            if known is not None:
                # Why skipping known rows keeps D^2 exact: a row becomes known in the round whose seeds its list
                # holds; until then it was unknown, so the products gave it the exact D^2 over all earlier seeds.
                # Of this round's seeds the listed ones are applied here from the lists, and the unlisted ones
                # are farther than a listed seed; in later rounds only listed seeds can come closer (see known).
                d2, assign = _apply_listed(lists, pick, count, d2, assign, known)
                left = int((~(known if rows is None else known[rows])).sum())
                if left == 0:
                    chosen.append(pick)
                    count += pick.numel()
                    continue
                if left <= GATHER_BELOW * (n if rows is None else rows.numel()):
                    rows = (~known).nonzero()[:, 0]  # gather the rows not known yet (known only grows)
                    xr = x[rows] if x_aug is None else x_aug[rows]
                    xnr = xn[rows]
            xp = x[pick]
            if x_aug is None:
                nearest, which = torch.addmm((xp * xp).sum(1)[:, None] + xnr[None, :], xp, xr.T, alpha=-2.0).min(0)
            else:  # one product in the assignment's precision and a block argmax, as a Lloyd assignment
                which, best = _assign(xr, xp, x_aug.dtype, chunk, with_score=True)
                nearest = torch.add(xnr, best.float(), alpha=-2.0)
            nearest.clamp_min_(0.0)
            if rows is None:
                closer = nearest < d2
                if known is not None:
                    closer &= ~known  # the known rows keep the seeds their lists gave them
                assign[closer] = count + which[closer]
                d2 = torch.where(closer, nearest, d2)
            else:
                closer = (nearest < d2[rows]) & ~known[rows]
                hit = rows[closer]
                assign[hit] = count + which[closer]
                d2[hit] = nearest[closer]
        chosen.append(pick)
        count += pick.numel()
    return torch.cat(chosen), assign


def _apply_listed(lists: _ReverseLists, pick: torch.Tensor, count: int, d2: torch.Tensor, assign: torch.Tensor,
                  known: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One round's seeds ``pick`` (positions count, count + 1, ...) through the lists: every row listing one of
    them takes the nearest listed one when closer (lowest position among ties) and becomes known; a seed whose own
    row is known gets D^2 = 0 (the lists never name the point itself). Updates ``known`` in place."""
    rows, pos, val = lists.pairs(pick)
    known[rows] = True
    own = known[pick].nonzero()[:, 0]
    rows = torch.cat([rows, pick[own]])
    pos = torch.cat([pos, own])
    val = torch.cat([val, torch.zeros(own.numel(), dtype=val.dtype, device=val.device)])
    if rows.numel() == 0:
        return d2, assign
    low = torch.full_like(d2, math.inf).scatter_reduce_(0, rows, val.to(d2.dtype), "amin")
    win = val.to(d2.dtype) == low[rows]
    first = torch.full_like(assign, pick.numel()).scatter_reduce_(0, rows[win], pos[win], "amin")
    closer = low < d2
    assign = torch.where(closer, count + first, assign)
    return torch.where(closer, low, d2), assign


def _sequential_acceptance(cc: np.ndarray, d2: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Which of m candidates drawn at once (proportional to D^2) to keep, in draw order, so that each kept one is
    distributed as a sequential k-means++ draw given the ones kept before it (rejection sampling): candidate j is
    kept with probability min(1, min over kept a of |c_j - c_a|^2 / D_j^2). A candidate drawn twice, or lying in
    the cell of a kept one, is thus mostly dropped (drawn again in a later round). cc: (m, m) squared distances
    between the candidates, d2: their D^2, u: m uniforms."""
    m = d2.size
    kept = np.zeros(m, dtype=bool)
    kept[0] = True  # the first draw of a round is an exact D^2 draw (and the round always makes progress)
    for j in range(1, m):
        if d2[j] > 0 and bool((cc[kept, j] > u[j] * d2[j]).all()):
            kept[j] = True
    return kept


def _lloyd(xt, x_aug, k, gen, niter, tol, dtype, chunk, init, init_assign=None, lists=None):
    """Lloyd iterations from the seed points ``init``; ``init_assign``: the first assignment, when the seeding
    already found each point's nearest seed; ``lists``: neighbour lists for :func:`_assign_listed`."""
    n = xt.shape[0]
    dev = xt.device
    centroids = xt[init].clone()
    ones = torch.ones(n, device=dev)
    assign = torch.full((n,), -1, dtype=torch.int64, device=dev)
    it = 0
    for it in range(1, int(niter) + 1):
        if it == 1 and init_assign is not None:
            new = init_assign
        elif lists is not None and it > 1:  # the centroids are the means of ``assign``'s clusters (or re-seeded)
            new = _assign_listed(xt, x_aug, centroids, assign, lists, dtype, chunk)
        else:
            new = _assign(x_aug, centroids, dtype, chunk)
        changed = int((new != assign).sum())
        assign = new
        if changed <= tol * n:
            # converged: these assignments are (up to the tolerance) those of the final centroids, so the extra
            # assignment pass against updated centroids (a full n x k product) is skipped
            return centroids, assign, it
        sums = torch.zeros_like(centroids).index_add_(0, assign, xt)
        counts = torch.zeros(k, device=dev).index_add_(0, assign, ones)
        nonempty = counts > 0
        centroids[nonempty] = sums[nonempty] / counts[nonempty, None]
        empty = (~nonempty).nonzero().ravel()
        if empty.numel():
            # re-seed each empty cluster on one of the points farthest from their centroids (as scikit-learn)
            far = ((xt - centroids[assign]) ** 2).sum(1)
            far[counts[assign] < 2] = -1.0  # never empty another cluster
            centroids[empty] = xt[torch.topk(far, min(empty.numel(), n)).indices[: empty.numel()]]
    if lists is not None and it > 1:
        return centroids, _assign_listed(xt, x_aug, centroids, assign, lists, dtype, chunk), it
    return centroids, _assign(x_aug, centroids, dtype, chunk), it


def _assign_listed(xc: torch.Tensor, x_aug: torch.Tensor, centroids: torch.Tensor, prev: torch.Tensor,
                   lists: _ReverseLists, dtype: torch.dtype, chunk: int) -> torch.Tensor:
    """:func:`_assign` (nearest centroid, lowest index among exact ties) where the neighbour lists settle most
    points without the full (n x k) product.

    ``centroids`` are the means of the clusters of ``prev`` (a cluster without members: any point). For a cluster
    C_j with spread V_j = mean over y in C_j of |y - c_j|^2, |x - c_j|^2 = mean over y in C_j of |x - y|^2 - V_j. If
    x's list holds no usable member of C_j, every member lies at least bound_x away (squared), so
    |x - c_j|^2 >= bound_x - V_j. The candidates of x are the clusters of its usable list entries and its own;
    the LOOSE_CLUSTERS clusters of largest spread (memberless ones first) are computed for every point by one
    product; tau is the largest spread left. Where the nearest of those is below bound_x - tau (less a rounding
    margin), no other cluster can be nearer; the remaining points get the full product.
    """
    n, k = xc.shape[0], centroids.shape[0]
    dev = xc.device
    if k <= 2 * LOOSE_CLUSTERS:
        return _assign(x_aug, centroids, dtype, chunk)
    counts = torch.bincount(prev, minlength=k)
    spread = torch.zeros(k, dtype=torch.float64, device=dev)
    for s in range(0, n, chunk):
        p = prev[s : s + chunk]
        spread.index_add_(0, p, ((xc[s : s + chunk] - centroids[p]) ** 2).sum(1, dtype=torch.float64))
    spread = spread / counts.clamp_min(1)
    spread[counts == 0] = math.inf  # no members: the identity does not hold, always computed
    loose = torch.topk(spread, LOOSE_CLUSTERS).indices
    rest = torch.ones(k, dtype=torch.bool, device=dev)
    rest[loose] = False
    tau = float(spread[rest].max())
    lbest, lscore = _assign(x_aug, centroids[loose], dtype, chunk, with_score=True)
    xn = (xc * xc).sum(1)
    d_loose = xn - 2.0 * lscore.float()
    a_loose = loose[lbest]
    # candidates: the clusters of the usable list entries and the point's own, each once (padding repeats the
    # own cluster); a point with more than CANDIDATES distinct ones goes to the full product
    cand = torch.where(lists.fwd_idx >= 0, prev[lists.fwd_idx.clamp_min(0)], prev[:, None])
    cand = torch.sort(torch.cat([cand, prev[:, None]], dim=1), dim=1).values
    dup = torch.zeros_like(cand, dtype=torch.bool)
    dup[:, 1:] = cand[:, 1:] == cand[:, :-1]
    too_many = (~dup).sum(1) > CANDIDATES
    cand = torch.sort(torch.where(dup, k, cand), dim=1).values[:, :CANDIDATES]
    cand = torch.where(cand == k, prev[:, None], cand)
    cn = (centroids * centroids).sum(1)
    best = torch.empty(n, dtype=torch.int64, device=dev)
    d_best = torch.empty(n, device=dev)
    big = torch.iinfo(torch.int64).max
    for s in range(0, n, CANDIDATE_ROWS):
        c = cand[s : s + CANDIDATE_ROWS]
        gathered = centroids.index_select(0, c.reshape(-1)).view(c.shape[0], c.shape[1], -1)
        dots = torch.bmm(gathered, xc[s : s + CANDIDATE_ROWS, :, None]).squeeze(2)
        dist = cn[c] - 2.0 * dots + xn[s : s + CANDIDATE_ROWS, None]
        d_min = dist.min(dim=1).values
        j = torch.where(dist == d_min[:, None], c, torch.full_like(c, big)).min(dim=1).values
        dl, al = d_loose[s : s + CANDIDATE_ROWS], a_loose[s : s + CANDIDATE_ROWS]
        from_loose = (dl < d_min) | ((dl == d_min) & (al < j))
        best[s : s + CANDIDATE_ROWS] = torch.where(from_loose, al, j)
        d_best[s : s + CANDIDATE_ROWS] = torch.minimum(dl, d_min)
    bound = lists.bound
    margin = 1e-3 * (bound.abs().nan_to_num(posinf=0.0, neginf=0.0) + abs(tau) + xn) + 1e-30
    unsure = (~(d_best < bound - tau - margin) | too_many).nonzero().ravel()
    if unsure.numel():
        best[unsure] = _assign(x_aug[unsure], centroids, dtype, chunk)
    return best


def _inertia(xt: torch.Tensor, centroids: torch.Tensor, assign: torch.Tensor) -> float:
    return float(((xt - centroids[assign]) ** 2).sum(dtype=torch.float64))


@exact_float32_matmul()  # the float32 assignment never in TF32 on CUDA
def kmeans(
    x: np.ndarray | torch.Tensor, k: int, *, niter: int = 50, seed: int = 0, backend: str = "auto",
    device: torch.device | str | None = None, tol: float = 1e-3, precision: str = "auto", nredo: int = 1,
    chunk: int = 8192, return_iters: bool = False, neighbours: Neighbours | None = None,
):
    """k-means of the rows of ``x`` (n, d) into ``k`` clusters: ``(centroids (k, d) float32, assignments (n,)
    int64)`` as numpy arrays (plus the iterations of the kept run when ``return_iters``).

    ``backend``: ``auto`` (= ``torch``), ``torch`` (this module) or ``faiss`` (faiss.Kmeans, on the GPU ``device``
    alone when it is cuda and faiss sees a GPU). ``device``: where the torch backend runs (default: the tensor's
    device, else cpu).
    ``precision``: the assignment product, ``auto`` | ``bf16`` | ``fp32`` (``cpu.kmeans_dtype``). ``nredo``: runs
    from seeds ``seed``, ``seed + 1``, ...; the one with the lowest sum of squared distances is kept. ``tol``: stop
    when at most this fraction of points changes cluster (0: only at a fixed point). k is clipped to n.
    ``neighbours``: ``(idx, d2, bound)`` neighbour lists of the rows of ``x`` (:func:`kmeanspp`): the seeding
    multiplies only the points whose list holds no seed yet (same seeds and first assignment up to rounding), and
    Lloyd's assignments come from :func:`_assign_listed` (the full product's assignment, from a fraction of it).
    """
    if backend not in KMEANS_BACKENDS:
        raise ValueError(f"unknown k-means backend {backend!r}; use one of {', '.join(KMEANS_BACKENDS)}")
    if int(niter) <= 0 or int(nredo) <= 0:
        raise ValueError(f"k-means niter and nredo must be positive; got niter={niter}, nredo={nredo}")
    if device is None:
        device = x.device if isinstance(x, torch.Tensor) else "cpu"
    dev = torch.device(device)
    held = torch.device("cpu") if backend == "faiss" else dev  # faiss reads host memory, whatever its index's device
    if isinstance(x, torch.Tensor):
        xt = x.detach().to(device=held, dtype=torch.float32)
    else:
        xt = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32), device=held)
    if xt.ndim != 2 or xt.shape[0] < 1:
        raise ValueError(f"k-means needs a non-empty (n, d) array; got shape {tuple(xt.shape)}")
    n = xt.shape[0]
    k = max(1, min(int(k), n))
    if backend == "faiss":
        return _faiss_kmeans(xt.cpu().numpy(), k, niter=niter, seed=seed, nredo=nredo,
                             gpu=dev if dev.type == "cuda" else None, return_iters=return_iters)
    dtype = kmeans_dtype(dev, precision)
    mean = xt.mean(0, keepdim=True)
    xc = xt - mean  # k-means is translation invariant; centring keeps the bf16 products small
    x_aug = augment(xc, dtype)
    lists = _ReverseLists(neighbours, n, dev) if neighbours is not None else None
    best = None
    for r in range(int(nredo)):
        gen = torch.Generator(device="cpu").manual_seed(int(seed) + r)
        init, init_assign = kmeanspp(xc, k, gen, x_aug=x_aug, return_assign=True, neighbours=lists)
        c, a, it = _lloyd(xc, x_aug, k, gen, niter, tol, dtype, chunk, init, init_assign, lists)
        cost = _inertia(xc, c, a) if nredo > 1 else 0.0
        if best is None or cost < best[0]:
            best = (cost, c, a, it)
    _, c, a, it = best
    out = ((c + mean).cpu().numpy(), a.cpu().numpy())
    return (*out, it) if return_iters else out


def _faiss_kmeans(x: np.ndarray, k: int, *, niter: int, seed: int, nredo: int, gpu: torch.device | None,
                  return_iters: bool):
    import faiss

    from dml_runner.evaluation.retrieval import faiss_gpu

    n, d = x.shape
    km = faiss.Kmeans(d, k, niter=int(niter), nredo=int(nredo), seed=int(seed) % 2**31, gpu=False,
                      max_points_per_centroid=max(256, n), min_points_per_centroid=1, verbose=False)
    on_gpu = faiss_gpu(km.index, gpu) if gpu is not None else None
    if on_gpu is not None:  # the one GPU asked for (faiss.Kmeans(gpu=True) takes every GPU, other ranks' too)
        km.index, km.gpu_resources = on_gpu
    threads = faiss.omp_get_max_threads()
    if x.size < 1_000_000:  # tiny problems: OpenMP start-up and spinning cost more than they save on a busy CPU
        faiss.omp_set_num_threads(1)
    try:
        km.train(x)
        _, assign = km.index.search(x, 1)
    finally:
        faiss.omp_set_num_threads(threads)
    out = (np.ascontiguousarray(km.centroids, dtype=np.float32), assign.ravel().astype(np.int64))
    return (*out, int(niter)) if return_iters else out


def torch_kmeans(
    x: np.ndarray | torch.Tensor, k: int, *, seed: int = 0, iters: int = 50, tol: float = 1e-3,
    device: torch.device | str = "cpu", dtype: torch.dtype | None = None, chunk: int = 8192,
) -> tuple[np.ndarray, int]:
    """Cluster ids (n,) and the number of iterations run (the torch backend of :func:`kmeans`)."""
    precision = {None: "auto", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    _, assign, it = kmeans(x, k, niter=iters, seed=seed, backend="torch", device=device, tol=tol,
                           precision=precision, chunk=chunk, return_iters=True)
    return assign, it
