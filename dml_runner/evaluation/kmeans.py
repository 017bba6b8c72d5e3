"""Lloyd k-means in torch with low-precision (bf16) assignment and early stopping.

Assignment: argmin_k |x - c_k|^2 = argmax_k (x . c_k - |c_k|^2 / 2); the |c_k|^2 / 2 term rides in the matmul as an
extra input column, so one (chunk x k) product and one argmax per chunk are the whole assignment step. On CPUs with
AMX/AVX512-BF16 (and on GPUs) the bf16 product runs several times faster than float32; its rounding (about 2^-8
relative) can only flip points that are near-equidistant from two centroids. Stops when fewer than ``tol`` of the
points change cluster (or after ``iters`` iterations). Init: ``k`` distinct random points (seeded), as in faiss;
an empty cluster is re-seeded on a random point of a cluster with >= 2 points.
"""

from __future__ import annotations

import numpy as np
import torch


def low_precision_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the hardware multiplies it natively (CUDA, or CPU with AVX512-BF16/AMX), else float32."""
    if device.type == "cuda":
        return torch.bfloat16
    try:
        cap = torch.backends.cpu.get_cpu_capability()
        if "AVX512" in cap and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return torch.bfloat16
    except Exception:  # pragma: no cover
        pass
    return torch.float32


BLOCK = 64


def block_argmax(s: torch.Tensor) -> torch.Tensor:
    """First index of the row maximum; columns a multiple of BLOCK.

    torch's argmax is ~15x slower than amax on CPU, so: max per block of 64 columns (amax), argmax over the few
    block maxima, then argmax inside the winning block only.
    """
    r, k = s.shape
    blocks = s.view(r, k // BLOCK, BLOCK)
    best_block = blocks.amax(dim=2).argmax(dim=1)
    inside = blocks[torch.arange(r, device=s.device), best_block].argmax(dim=1)
    return best_block * BLOCK + inside


def _assign(x_aug: torch.Tensor, centroids: torch.Tensor, dtype: torch.dtype, chunk: int) -> torch.Tensor:
    k, d = centroids.shape
    kp = -(-k // BLOCK) * BLOCK
    c_aug = torch.zeros(kp, d + 1, device=centroids.device)
    c_aug[:k, :d] = centroids
    c_aug[:k, d] = -0.5 * (centroids * centroids).sum(1)
    c_aug[k:, d] = -1e30  # padding centroids never win
    c_aug = c_aug.to(dtype)
    out = torch.empty(x_aug.shape[0], dtype=torch.int64, device=x_aug.device)
    scores = torch.empty(min(chunk, x_aug.shape[0]), kp, dtype=dtype, device=x_aug.device)  # reused
    for s in range(0, x_aug.shape[0], chunk):
        xs = x_aug[s : s + chunk]
        out[s : s + chunk] = block_argmax(torch.mm(xs, c_aug.T, out=scores[: xs.shape[0]]))
    return out


def torch_kmeans(
    x: np.ndarray | torch.Tensor, k: int, *, seed: int = 0, iters: int = 50, tol: float = 1e-3,
    device: torch.device | str = "cpu", dtype: torch.dtype | None = None, chunk: int = 8192,
) -> tuple[np.ndarray, int]:
    """Cluster ids (n,) and the number of iterations run."""
    dev = torch.device(device)
    xt = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32), device=dev)
    n, _ = xt.shape
    k = max(1, min(int(k), n))
    dtype = dtype or low_precision_dtype(dev)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    centroids = xt[torch.randperm(n, generator=gen)[:k].to(dev)].clone()
    x_aug = torch.cat([xt, torch.ones(n, 1, device=dev)], dim=1).to(dtype)
    ones = torch.ones(n, device=dev)
    assign = torch.full((n,), -1, dtype=torch.int64, device=dev)
    it = 0
    for it in range(1, int(iters) + 1):
        new = _assign(x_aug, centroids, dtype, chunk)
        changed = int((new != assign).sum())
        assign = new
        if changed <= tol * n:
            # converged: these assignments are (up to the tolerance) those of the final centroids, so the extra
            # assignment pass against updated centroids (a full n x k product) is skipped
            return assign.cpu().numpy(), it
        sums = torch.zeros_like(centroids).index_add_(0, assign, xt)
        counts = torch.zeros(k, device=dev).index_add_(0, assign, ones)
        nonempty = counts > 0
        centroids[nonempty] = sums[nonempty] / counts[nonempty, None]
        empty = (~nonempty).nonzero().ravel()
        if empty.numel():
            # Re-seed empty clusters on random points of clusters with >= 2 points (faiss splits big clusters).
            donors = (counts[assign] >= 2).nonzero().ravel()
            if donors.numel():
                pick = torch.randint(donors.numel(), (empty.numel(),), generator=gen).to(dev)
                centroids[empty] = xt[donors[pick]]
    return _assign(x_aug, centroids, dtype, chunk).cpu().numpy(), it
