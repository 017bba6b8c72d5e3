"""Paired bootstrap intervals for the difference of two sets of runs evaluated on the same test queries.

Each side is a matrix of per-query values, one row per run (seed) and one column per query (the same queries, in
the same order, on both sides): e.g. 1.0/0.0 hits for Recall@K, or each query's MAP@R. A side's metric is the mean
over its runs of the mean over the queries.

One bootstrap sample draws the queries with replacement (the same draw for both sides: the comparison is paired),
and, when a side has several runs, that side's runs with replacement too (two levels, so that the interval covers
the variation between seeds as well as the sampling of the test queries). The interval is the percentile interval
of the sampled differences B - A; ``p_b_better`` is the share of samples in which B's value is above A's.

A query draw is represented by its multiplicities (a multinomial count per query), so a sample costs one weighted
sum per run rather than a gather of Q indices.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_SAMPLES = 2000
DEFAULT_LEVEL = 0.95


@dataclass(frozen=True)
class Difference:
    """B - A for one metric: the point values, the interval and the share of samples in which B is better."""

    a: float
    b: float
    difference: float
    ci_low: float
    ci_high: float
    p_b_better: float
    level: float
    samples: int
    runs_a: int
    runs_b: int
    queries: int

    @property
    def contains_zero(self) -> bool:
        """The interval does not exclude "no difference"."""
        return self.ci_low <= 0.0 <= self.ci_high

    def as_dict(self) -> dict[str, float | int | bool]:
        return {**asdict(self), "contains_zero": self.contains_zero}


def _as_runs(values: np.ndarray, side: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"side {side}: expected per-query values as (runs, queries); got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"side {side}: per-query values contain NaN/inf")
    return x


def _resampled_means(sides: list[np.ndarray], samples: int, seed: int, batch: int = 256) -> list[np.ndarray]:
    """``samples`` bootstrap draws of each side's mean: one query draw shared by all sides (paired), and each
    side's runs drawn with replacement on their own."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1; got {samples}")
    rng = np.random.default_rng(seed)
    q = sides[0].shape[1]
    uniform = np.full(q, 1.0 / q)
    out = [np.empty(samples, dtype=np.float64) for _ in sides]
    for start in range(0, samples, batch):
        n = min(batch, samples - start)
        weights = rng.multinomial(q, uniform, size=n).astype(np.float64) / q  # (n, Q): each row sums to 1
        rows = np.arange(n)[:, None]
        for x, dest in zip(sides, out):
            per_run = weights @ x.T  # (n, runs): each run's mean over the drawn queries
            pick = rng.integers(0, x.shape[0], size=(n, x.shape[0]))
            dest[start:start + n] = per_run[rows, pick].mean(axis=1)
    return out


def sampled_differences(a: np.ndarray, b: np.ndarray, *, samples: int = DEFAULT_SAMPLES, seed: int = 0) -> np.ndarray:
    """``samples`` bootstrap draws of mean(B) - mean(A) (see the module docstring); a: (runs_a, Q), b: (runs_b, Q)."""
    a, b = _as_runs(a, "A"), _as_runs(b, "B")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"the two sides have different numbers of queries ({a.shape[1]} vs {b.shape[1]})")
    mean_a, mean_b = _resampled_means([a, b], samples, seed)
    return mean_b - mean_a


def _percentiles(draws: np.ndarray, level: float) -> tuple[float, float]:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1); got {level}")
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(draws, [tail, 1.0 - tail])
    return float(low), float(high)


def mean_interval(values: np.ndarray, *, samples: int = DEFAULT_SAMPLES, level: float = DEFAULT_LEVEL,
                  seed: int = 0) -> tuple[float, float, float]:
    """One side's value (mean over runs of the mean over queries) and its bootstrap interval, runs and queries
    resampled as for a difference."""
    x = _as_runs(values, "values")
    low, high = _percentiles(_resampled_means([x], samples, seed)[0], level)
    return float(x.mean(axis=1).mean()), low, high


def paired_difference(a: np.ndarray, b: np.ndarray, *, samples: int = DEFAULT_SAMPLES, level: float = DEFAULT_LEVEL,
                      seed: int = 0) -> Difference:
    """Point values of A and B, B - A, its percentile bootstrap interval at ``level`` and P(B better)."""
    a, b = _as_runs(a, "A"), _as_runs(b, "B")
    diffs = sampled_differences(a, b, samples=samples, seed=seed)
    low, high = _percentiles(diffs, level)
    va, vb = float(a.mean(axis=1).mean()), float(b.mean(axis=1).mean())
    return Difference(a=va, b=vb, difference=vb - va, ci_low=low, ci_high=high,
                      p_b_better=float(np.mean(diffs > 0.0)), level=level, samples=samples, runs_a=a.shape[0],
                      runs_b=b.shape[0], queries=a.shape[1])
