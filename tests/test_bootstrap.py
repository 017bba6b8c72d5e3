"""The paired (and two-level) bootstrap of dml_runner.evaluation.bootstrap against a plain index-resampling one."""

from __future__ import annotations

import numpy as np
import pytest

from dml_runner.evaluation.bootstrap import paired_difference, sampled_differences


def plain_bootstrap(a: np.ndarray, b: np.ndarray, samples: int, seed: int) -> np.ndarray:
    """Independent reference: draw query indices (shared by both sides) and run indices, one sample at a time."""
    rng = np.random.default_rng(seed)
    q = a.shape[1]
    out = np.empty(samples)
    for i in range(samples):
        queries = rng.integers(0, q, size=q)
        runs_a = rng.integers(0, a.shape[0], size=a.shape[0])
        runs_b = rng.integers(0, b.shape[0], size=b.shape[0])
        out[i] = b[np.ix_(runs_b, queries)].mean() - a[np.ix_(runs_a, queries)].mean()
    return out


def hits(rng: np.random.Generator, runs: int, queries: int, p: np.ndarray) -> np.ndarray:
    """Per-query 0/1 hits: query j of every run hits with probability p[j] (paired difficulty across sides)."""
    return (rng.random((runs, queries)) < p[None, :]).astype(np.float64)


@pytest.mark.parametrize("runs_a,runs_b", [(1, 1), (3, 3), (2, 4)])
def test_interval_matches_an_independent_bootstrap_within_monte_carlo_error(runs_a, runs_b):
    rng = np.random.default_rng(7)
    q = 300
    difficulty = rng.uniform(0.2, 0.95, size=q)
    a = hits(rng, runs_a, q, difficulty)
    b = hits(rng, runs_b, q, np.clip(difficulty + 0.04, 0, 1))
    samples = 4000
    ours = sampled_differences(a, b, samples=samples, seed=1)
    # the reference's own Monte-Carlo spread of each statistic, from five independent seeds
    refs = np.array([np.quantile(plain_bootstrap(a, b, samples, seed=s), [0.025, 0.5, 0.975]) for s in range(5)])
    ref_mean, ref_sd = refs.mean(axis=0), refs.std(axis=0, ddof=1)
    got = np.quantile(ours, [0.025, 0.5, 0.975])
    # Measured: |got - ref_mean| / ref_sd at most 1.8 over these cases; 5 standard deviations leave a margin of more
    # than 2.5x. The 1e-3 covers the 1/Q granularity of hit means, where the five references can coincide (sd 0).
    assert np.all(np.abs(got - ref_mean) <= 5 * ref_sd + 1e-3), (got, ref_mean, ref_sd)
    # the sampled spread itself (not only its centre) agrees: measured within 2%, allowed 8%
    plain_sd = np.std(plain_bootstrap(a, b, samples, seed=11))
    assert abs(np.std(ours) / plain_sd - 1) < 0.08


def test_point_values_and_json_fields():
    a = np.array([[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 1.0]])
    b = np.array([[1.0, 1.0, 1.0, 1.0]])
    d = paired_difference(a, b, samples=500, seed=0)
    assert d.a == pytest.approx(0.75) and d.b == pytest.approx(1.0) and d.difference == pytest.approx(0.25)
    assert d.ci_low <= d.difference <= d.ci_high
    assert (d.runs_a, d.runs_b, d.queries, d.samples) == (2, 1, 4, 500)
    assert set(d.as_dict()) >= {"a", "b", "difference", "ci_low", "ci_high", "p_b_better", "contains_zero"}


def test_noise_is_marked_and_a_real_gain_is_not():
    rng = np.random.default_rng(3)
    q = 400
    difficulty = rng.uniform(0.3, 0.9, size=q)
    a = hits(rng, 3, q, difficulty)
    same = hits(rng, 3, q, difficulty)  # the same model up to seed noise
    better = hits(rng, 3, q, np.clip(difficulty + 0.15, 0, 1))
    noise = paired_difference(a, same, seed=0)
    gain = paired_difference(a, better, seed=0)
    assert noise.contains_zero and 0.05 < noise.p_b_better < 0.95, noise
    assert not gain.contains_zero and gain.ci_low > 0 and gain.p_b_better > 0.99, gain


def test_seed_variance_widens_the_interval():
    """Two runs per side that disagree with each other: resampling the runs (two levels) gives a wider interval than
    treating their mean as one run."""
    rng = np.random.default_rng(5)
    q = 500
    difficulty = rng.uniform(0.3, 0.9, size=q)
    a = np.stack([hits(rng, 1, q, np.clip(difficulty + shift, 0, 1))[0] for shift in (-0.1, 0.1)])
    b = np.stack([hits(rng, 1, q, np.clip(difficulty + shift, 0, 1))[0] for shift in (-0.1, 0.1)])
    two_level = paired_difference(a, b, seed=0)
    one_level = paired_difference(a.mean(axis=0), b.mean(axis=0), seed=0)
    # measured 5.5x wider
    assert (two_level.ci_high - two_level.ci_low) > 1.3 * (one_level.ci_high - one_level.ci_low)


@pytest.mark.parametrize("a,b,match", [
    (np.ones((1, 3)), np.ones((1, 4)), "different numbers of queries"),
    (np.ones((1, 3)), np.array([[1.0, np.nan, 0.0]]), "NaN"),
    (np.ones((0, 3)), np.ones((1, 3)), "shape"),
])
def test_bad_inputs_are_named(a, b, match):
    with pytest.raises(ValueError, match=match):
        paired_difference(a, b)


def test_one_sides_interval_matches_plain_resampling():
    from dml_runner.evaluation.bootstrap import mean_interval

    rng = np.random.default_rng(9)
    x = hits(rng, 3, 250, rng.uniform(0.3, 0.9, size=250))
    value, low, high = mean_interval(x, samples=4000, seed=2)
    assert value == pytest.approx(x.mean()) and low < value < high
    # plain resampling: a zero side A gives draws of B's mean
    plain = plain_bootstrap(np.zeros((1, 250)), x, 4000, seed=3)
    ref_low, ref_high = np.quantile(plain, [0.025, 0.975])
    width = ref_high - ref_low  # measured: both ends within 3.3% of the width; allowed 10%
    assert abs(low - ref_low) < 0.1 * width and abs(high - ref_high) < 0.1 * width
