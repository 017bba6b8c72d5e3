"""Input checks for :func:`dml_runner.evaluation.evaluate` (clear ``ValueError`` messages)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

KNOWN_METRICS = ("recall", "nmi", "f1", "map_at_r", "r_precision")
# The retrieval backends :func:`dml_runner.evaluation.evaluate` runs (auto chooses among the others: see its
# docstring); the names are config.EvalBackend's values (a test keeps the two equal).
BACKENDS = ("auto", "torch_screened", "torch_fp32", "torch_symmetric", "faiss")


def check_backend(backend: str) -> str:
    """The one check of a retrieval backend name (evaluate, and any caller that validates before it runs)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown retrieval backend {backend!r}; use one of {', '.join(BACKENDS)}")
    return backend
MAX_SQUARED_NORM = 1e36  # squared distances (<= 4x this) stay well inside float32's 3.4e38


def check_embeddings_labels(embeddings: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return float32 (N, D) embeddings and int64 (N,) labels, or raise ``ValueError``."""
    emb = np.asarray(embeddings)
    lab = np.asarray(labels)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array (N, D); got shape {emb.shape}")
    if emb.shape[0] < 2:
        raise ValueError(f"need at least 2 embeddings; got {emb.shape[0]}")
    if emb.shape[1] < 1:
        raise ValueError("embeddings have zero dimensions")
    if not (np.issubdtype(emb.dtype, np.floating) or np.issubdtype(emb.dtype, np.integer)):
        raise ValueError(f"embeddings must be numeric; got dtype {emb.dtype}")
    if lab.ndim != 1:
        raise ValueError(f"labels must be a 1-D array (N,); got shape {lab.shape}")
    if lab.shape[0] != emb.shape[0]:
        raise ValueError(f"shape mismatch: {emb.shape[0]} embeddings but {lab.shape[0]} labels")
    if not (np.issubdtype(lab.dtype, np.integer) or np.issubdtype(lab.dtype, np.bool_)):
        if np.issubdtype(lab.dtype, np.floating) and np.all(np.isfinite(lab)) and np.all(lab == np.round(lab)):
            lab = lab.astype(np.int64)
        else:
            raise ValueError(f"labels must be integers; got dtype {lab.dtype}")
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    if not np.isfinite(emb).all():
        bad = int((~np.isfinite(emb)).any(axis=1).sum())
        raise ValueError(f"embeddings contain NaN or inf values ({bad} rows affected)")
    peak = float(np.abs(emb).max())
    if emb.shape[1] * peak * peak > MAX_SQUARED_NORM:  # cheap test first, exact norms only when it may overflow
        sq = float(np.einsum("ij,ij->i", emb.astype(np.float64), emb.astype(np.float64)).max())
        if sq > MAX_SQUARED_NORM:
            raise ValueError(f"embedding norms reach {sq ** 0.5:.3g}: squared distances would overflow float32 "
                             "(limit ~1e18); rescale the embeddings (e.g. L2-normalise them)")
    return emb, lab.astype(np.int64)


def check_mask(mask: np.ndarray | None, n: int, name: str) -> np.ndarray | None:
    """A mask must be a boolean (N,) array selecting at least one item."""
    if mask is None:
        return None
    m = np.asarray(mask)
    if m.dtype != np.bool_:
        raise ValueError(f"{name} must be a boolean array; got dtype {m.dtype}")
    if m.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) like labels; got {m.shape}")
    if not m.any():
        raise ValueError(f"{name} selects no items")
    return m


def check_recall_at(recall_at: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in recall_at)
    if not ks:
        raise ValueError("recall_at is empty")
    for k, raw in zip(ks, recall_at):
        if k != raw or k <= 0:
            raise ValueError(f"recall_at values must be positive integers; got {raw!r}")
    return tuple(sorted(set(ks)))


def check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    if isinstance(metrics, str):
        metrics = (metrics,)
    unknown = [m for m in metrics if m not in KNOWN_METRICS]
    if unknown:
        raise ValueError(f"unknown metric name(s) {unknown}; known: {list(KNOWN_METRICS)}")
    return tuple(metrics)
