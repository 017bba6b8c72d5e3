"""The symmetric leave-one-out search (dml_runner/evaluation/symmetric.py) against the float64 brute force: ties,
duplicates, several blocks, its rarely taken paths forced, and how ``backend=torch`` / DML_EVAL_SEARCH choose it."""

from __future__ import annotations

import numpy as np
import pytest

import dml_runner.evaluation as ev
import dml_runner.evaluation.symmetric as sym
from dml_runner.evaluation import evaluate
from test_metrics import KS, RETRIEVAL, _check, _data, brute_retrieval


def _count_calls(monkeypatch, owner, name: str) -> dict:
    """Replace ``owner.name`` by a wrapper that counts its calls (``["n"]``)."""
    calls = {"n": 0}
    real = getattr(owner, name)

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(owner, name, counting)
    return calls


def _sym(x, y, **kw):
    return evaluate(x, y, recall_at=KS, metrics=RETRIEVAL, device="cpu", backend="torch_symmetric", **kw)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("integer", [False, True])
def test_matches_brute_force(seed, integer):
    x, y = _data(seed, integer=integer)
    _check(_sym(x, y), brute_retrieval(x, y))


def test_exact_ties_duplicates_and_singletons():
    x = np.repeat(np.eye(4, dtype=np.float32), 6, axis=0)
    y = np.array([0, 1, 2, 0, 1, 2] * 4)
    x = np.vstack([x, np.zeros((3, 4), np.float32)])
    y = np.concatenate([y, [7, 8, 9]])
    want = brute_retrieval(x, y)
    assert want["num_queries_without_positive"] == 3
    _check(_sym(x, y), want)


@pytest.mark.parametrize("integer", [False, True])
def test_several_blocks_rows_and_columns(integer, monkeypatch):
    """1,500 items: two blocks of 1,024, so the off-diagonal block serves its rows and its columns."""
    rng = np.random.default_rng(7)
    n = 1500
    y = rng.integers(0, 300, n)
    if integer:  # small integers: exact float32 products, many exact ties across blocks
        x = rng.integers(0, 3, size=(n, 4)).astype(np.float32)
    else:
        x = (rng.normal(size=(300, 4))[y] + 0.8 * rng.normal(size=(n, 4))).astype(np.float32)
    merged = {"n": 0}
    merge = sym._TopK.merge

    def counting_merge(self, q, items, v, **kw):
        merged["n"] += int(q.numel())
        return merge(self, q, items, v, **kw)

    monkeypatch.setattr(sym._TopK, "merge", counting_merge)
    _check(_sym(x, y), brute_retrieval(x, y))
    assert merged["n"] > 0  # the off-diagonal block fed the running top-k


def test_without_slack_the_float64_fallback_keeps_the_results(monkeypatch):
    x, y = _data(3, n=200, integer=True)
    calls = _count_calls(monkeypatch, sym, "_full_topk")
    st = sym.symmetric_retrieval(x, y, slack=0)
    want = brute_retrieval(x, y)
    assert float(np.mean(st.map_at_r)) == pytest.approx(want["map@r"], abs=1e-12)
    assert calls["n"] > 0


def test_without_the_recheck_the_counts_go_wrong(monkeypatch):
    """Mutation check: trusting the float32 scores near the nearest positive (no band) breaks exactness on data
    whose float32 products round (sums of many non-representable terms with near-equal distances)."""
    rng = np.random.default_rng(0)
    n, d = 600, 256
    y = rng.integers(0, 120, n)
    x = rng.normal(size=(120, d))[y] * 0.05 + rng.normal(size=(n, d))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    x = np.vstack([x, x[:200] + np.float32(1e-7)])  # near-duplicates: differences below float32 product rounding
    y = np.concatenate([y, y[:200]])
    want = brute_retrieval(x, y)
    _check(_sym(x, y), want)
    monkeypatch.setattr(sym, "U_F32", 0.0)  # zero error bound: no band, float32 decides alone
    got = _sym(x, y)
    assert any(got[k] != pytest.approx(want[k], abs=1e-12) for k in want)


def test_equals_the_screened_search_on_clustered_data():
    rng = np.random.default_rng(1)
    n = 2000
    y = rng.integers(0, 400, n)
    x = rng.normal(size=(400, 32))[y] + 1.5 * rng.normal(size=(n, 32))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    kw = dict(recall_at=(1, 10, 100), metrics=RETRIEVAL, device="cpu")
    a = evaluate(x, y, backend="torch_symmetric", **kw)
    b = evaluate(x, y, backend="torch_screened", **kw)
    assert a == b


def test_masks_are_refused():
    x, y = _data(0)
    q = np.arange(len(y)) < 60
    with pytest.raises(ValueError, match="torch_symmetric.*leave-one-out"):
        evaluate(x, y, metrics=RETRIEVAL, query_mask=q, gallery_mask=~q, device="cpu", backend="torch_symmetric")


def test_auto_backend_and_the_environment_choose_it(monkeypatch):
    calls = _count_calls(monkeypatch, ev, "symmetric_retrieval")
    x, y = _data(1)
    monkeypatch.setenv("DML_EVAL_SEARCH", "symmetric")  # forced: any size, leave-one-out only
    got = evaluate(x, y, recall_at=KS, metrics=RETRIEVAL, device="cpu")
    _check(got, brute_retrieval(x, y))
    assert calls["n"] == 1
    q = np.arange(len(y)) < 60
    evaluate(x, y, recall_at=KS, metrics=RETRIEVAL, query_mask=q, gallery_mask=~q, device="cpu")
    assert calls["n"] == 1  # masked: the float32 search
    monkeypatch.setenv("DML_EVAL_SEARCH", "fp32")
    evaluate(x, y, recall_at=KS, metrics=RETRIEVAL, device="cpu")
    assert calls["n"] == 1
    monkeypatch.setenv("DML_EVAL_SEARCH", "auto")
    monkeypatch.setenv("DML_CPU_PATH", "fp32")  # a CPU without native bf16: symmetric from SYMMETRIC_MIN items
    monkeypatch.setattr(ev, "SYMMETRIC_MIN", 50)
    evaluate(x, y, recall_at=KS, metrics=RETRIEVAL, device="cpu")
    assert calls["n"] == 2
    monkeypatch.setattr(ev, "SYMMETRIC_MIN", 10_000)
    evaluate(x, y, recall_at=KS, metrics=RETRIEVAL, device="cpu")
    assert calls["n"] == 2


def test_bad_block_size_is_refused():
    x, y = _data(0)
    with pytest.raises(ValueError, match="block_rows"):
        sym.symmetric_retrieval(x, y, block_rows=1000)


def test_auto_backend_falls_back_to_float32_on_near_random_embeddings(monkeypatch, caplog):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1500, 8)).astype(np.float32)  # labels unrelated to the embedding
    y = rng.integers(0, 300, 1500)
    monkeypatch.setenv("DML_EVAL_SEARCH", "symmetric")
    sym_calls = _count_calls(monkeypatch, ev, "symmetric_retrieval")
    fp32_calls = _count_calls(monkeypatch, ev, "exact_retrieval")
    with caplog.at_level("INFO", logger="dml_runner.evaluation"):
        got = evaluate(x, y, recall_at=KS, metrics=RETRIEVAL, device="cpu")
    assert sym_calls["n"] == 1 and fp32_calls["n"] == 1 and "float32 search" in caplog.text
    forced = sym.symmetric_retrieval(x, y)  # asked for explicitly: it runs to the end, same numbers
    assert float(np.mean(forced.first_rank < 1)) == pytest.approx(got["recall@1"], abs=1e-12)
    assert float(np.mean(forced.map_at_r)) == pytest.approx(got["map@r"], abs=1e-12)


def _three_blocks(seed: int = 11):
    """2,500 items in 40 classes (R up to ~90): three blocks of 1,024, many listed items per query and block."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 40, 2500)
    x = (rng.normal(size=(40, 6))[y] + 1.5 * rng.normal(size=(2500, 6))).astype(np.float32)
    return x, y


def test_merges_of_many_items_per_query_take_the_bucketed_path(monkeypatch):
    """With a shared width of 1 nearly every query goes by its own power-of-two bucket, in small groups."""
    x, y = _three_blocks()
    monkeypatch.setattr(sym, "SHARED_WIDTH", 1)
    monkeypatch.setattr(sym, "MERGE_ELEMENTS", 256)
    groups = _count_calls(monkeypatch, sym._TopK, "_merge_group")
    _check(_sym(x, y), brute_retrieval(x, y))
    assert groups["n"] > 30


def test_a_too_high_floor_for_the_top_k_is_caught_by_the_certification(monkeypatch):
    """The top-k only takes items at or above the query's lowest positive score; give the best positive's score
    instead (too high: items the top-R needs are never merged) and the certification must send those rows to the
    float64 search, so the results stay exact."""
    x, y = _three_blocks()
    real = sym.exact_nearest_positive

    def too_high(*a, **k):
        t1, p1, _low = real(*a, **k)
        return t1, p1, t1

    monkeypatch.setattr(sym, "exact_nearest_positive", too_high)
    fallback = _count_calls(monkeypatch, sym, "_full_topk")
    _check(_sym(x, y), brute_retrieval(x, y))
    assert fallback["n"] > 0


@pytest.mark.parametrize("small_classes", [False, True])
def test_neighbour_lists_hold_every_item_above_their_bound(small_classes):
    """The per-item lists the search hands to k-means: an item missing from row i scores at most bound[i] (up to
    float32 rounding), the listed scores are the pairs' scores, and every row with R >= 2 lists its positives.
    Small tight classes: the lowest-positive floor, not the (R + slack)-th value, bounds most rows."""
    x, y = _three_blocks()
    if small_classes:
        rng = np.random.default_rng(5)
        y = rng.integers(0, 800, 2500)
        x = (rng.normal(size=(800, 6))[y] + 0.3 * rng.normal(size=(2500, 6))).astype(np.float32)
    st = sym.symmetric_retrieval(x, y)
    idx, score, bound = (t.numpy() for t in st.neighbours)
    xd = x.astype(np.float64)
    h = 0.5 * (xd * xd).sum(1)
    m = xd @ xd.T - h[:, None] - h[None, :]
    np.fill_diagonal(m, -np.inf)
    tol = 1e-4 * (1 + np.abs(m[np.isfinite(m)]).max())
    r = np.bincount(y)[y] - 1
    rows = np.flatnonzero(r >= 2)
    assert np.isfinite(bound[rows]).all() and np.isinf(bound[r < 2]).all()
    for i in rows:
        listed = idx[i][(idx[i] >= 0) & (idx[i] < len(y))]
        missing = np.ones(len(y), bool)
        missing[listed] = False
        missing[i] = False
        assert m[i, missing].max() <= bound[i] + tol
        usable = (score[i] > bound[i]) & (idx[i] >= 0)
        assert np.abs(score[i][usable] - m[i, idx[i][usable]]).max() <= tol
        assert usable.sum() >= r[i]  # all positives score at least the floor, so the list holds >= R items
