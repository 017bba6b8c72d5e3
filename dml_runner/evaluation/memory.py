"""Memory model of :func:`dml_runner.evaluation.evaluate` (bytes), used to size chunks and to refuse jobs."""

from __future__ import annotations

import torch

BYTES_F32 = 4
# A distance block costs its float32 values, a boolean comparison and its float32 copy for the counting sum.
BLOCK_BYTES_PER_ELEMENT = 10
# The screened search: a bf16 (2 bytes) or float32 (4 bytes) block and, on its near-random path only, a boolean mask.
SCREENED_BYTES_PER_ELEMENT = {torch.bfloat16: 3, torch.float32: 5}


def rows_per_chunk(gallery_size: int, chunk_size: int, max_memory_gb: float | None, budget_gb: float = 0.5,
                   bytes_per_element: int = BLOCK_BYTES_PER_ELEMENT) -> int:
    """Query rows per chunk so that one (rows x gallery) distance block stays within budget."""
    budget = (max_memory_gb * 0.25 if max_memory_gb else budget_gb) * 2**30
    per_row = max(gallery_size, 1) * bytes_per_element
    return int(max(1, min(chunk_size, budget // per_row)))


def estimate_memory_bytes(
    n: int, dim: int, *, num_classes: int | None = None, chunk_size: int = 4096,
    max_memory_gb: float | None = None, gallery_size: int | None = None,
) -> int:
    """Estimated peak extra memory (bytes) of ``evaluate`` on n items of ``dim`` dims: linear in n.

    embeddings (several float32 copies) + one distance block (capped by the chunk budget) + k-means (centroids,
    sums, bf16 copy of the data, one bf16 score chunk) + ~300 MiB for the interpreter and libraries.
    """
    g = gallery_size if gallery_size is not None else n
    k = num_classes if num_classes is not None else n
    rows = rows_per_chunk(g, chunk_size, max_memory_gb)
    data = 4 * n * dim * BYTES_F32
    block = rows * g * BLOCK_BYTES_PER_ELEMENT
    kmeans = 3 * k * dim * BYTES_F32 + 8192 * (k + 64) * 2 + n * (dim + 1) * 2 + n * 64
    return int(data + block + kmeans + 300 * 2**20)
