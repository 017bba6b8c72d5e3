"""Per-query retrieval values against a brute-force ranking, and their means against evaluate()."""

from __future__ import annotations

import numpy as np
import pytest

from dml_runner.evaluation import evaluate
from dml_runner.evaluation.per_query import per_query_values


def brute_force(emb: np.ndarray, labels: np.ndarray, qmask=None, gmask=None, ks=(1, 2, 4)):
    """Full float64 distance matrix, ranking by (distance, gallery index), one query at a time."""
    n = len(labels)
    queries = np.arange(n) if qmask is None else np.flatnonzero(qmask)
    gallery = np.arange(n) if gmask is None else np.flatnonzero(gmask)
    out = {f"recall@{k}": [] for k in ks} | {"map@r": [], "r_precision": [], "reciprocal_rank": []}
    scored = []
    for q in queries:
        cand = gallery[gallery != q]
        d = ((emb[cand].astype(np.float64) - emb[q]) ** 2).sum(axis=1)
        order = cand[np.lexsort((cand, d))]
        rel = labels[order] == labels[q]
        r = int(rel.sum())
        if r == 0:
            continue
        scored.append(q)
        first = int(np.argmax(rel))
        for k in ks:
            out[f"recall@{k}"].append(float(first < k))
        top = rel[:r]
        precision = np.cumsum(top) / np.arange(1, r + 1)
        out["map@r"].append(float((precision * top).sum() / r))
        out["r_precision"].append(float(top.sum() / r))
        out["reciprocal_rank"].append(1.0 / (first + 1))
    return np.array(scored), {k: np.array(v) for k, v in out.items()}


def data(seed: int, n: int = 90, classes: int = 7, dim: int = 6, ties: bool = False):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    emb = rng.normal(size=(n, dim)).astype(np.float32)
    if ties:  # integer coordinates: many exactly equal distances, where the tie order decides
        emb = rng.integers(-1, 2, size=(n, dim)).astype(np.float32)
    labels[0] = 99  # a class of one: no positive, not scored
    return emb, labels


@pytest.mark.parametrize("ties", [False, True])
def test_leave_one_out_matches_brute_force(ties):
    emb, labels = data(0, ties=ties)
    got = per_query_values(emb, labels, recall_at=(1, 2, 4))
    scored, want = brute_force(emb, labels)
    np.testing.assert_array_equal(got.queries, scored)
    assert got.num_without_positive == 1
    for key, values in want.items():
        np.testing.assert_allclose(got.values[key], values, rtol=0, atol=1e-12, err_msg=key)


def test_query_gallery_matches_brute_force():
    emb, labels = data(1, n=120)
    rng = np.random.default_rng(2)
    qmask = rng.random(120) < 0.4
    gmask = ~qmask | (rng.random(120) < 0.2)  # some items are both query and gallery
    got = per_query_values(emb, labels, recall_at=(1, 4), query_mask=qmask, gallery_mask=gmask)
    scored, want = brute_force(emb, labels, qmask, gmask, ks=(1, 4))
    np.testing.assert_array_equal(got.queries, scored)
    for key, values in want.items():
        np.testing.assert_allclose(got.values[key], values, rtol=0, atol=1e-12, err_msg=key)


def test_means_are_the_reported_metrics():
    emb, labels = data(3, n=200, classes=10)
    got = per_query_values(emb, labels, recall_at=(1, 2)).means()
    reported = evaluate(emb, labels, recall_at=(1, 2), metrics=("recall", "map_at_r", "r_precision"))
    for key in ("recall@1", "recall@2", "map@r", "r_precision"):
        assert got[key] == pytest.approx(reported[key], abs=1e-12), key


def test_top_k_values_follow_open_metric_learnings_definitions():
    """precision@K = hits in the top K / min(K, n); MAP@K = (1/n_K) sum_{i<=K} (n_i / i) g_i (0 when n_K = 0)."""
    from dml_runner.evaluation.per_query import top_k_values

    emb, labels = data(4, n=100, classes=9, ties=True)
    ks = (1, 3, 5, 20)
    got = top_k_values(emb, labels, ks, chunk_size=7)  # chunks smaller than the data: every chunk boundary counts
    n = len(labels)
    scored = []
    want = {f"{m}@{k}": [] for m in ("precision", "map") for k in ks}
    for q in range(n):
        cand = np.array([j for j in range(n) if j != q])
        d = ((emb[cand].astype(np.float64) - emb[q]) ** 2).sum(axis=1)
        g = (labels[cand[np.lexsort((cand, d))]] == labels[q]).astype(float)
        positives = int(g.sum())
        if positives == 0:
            continue
        scored.append(q)
        for k in ks:
            want[f"precision@{k}"].append(g[:k].sum() / min(k, positives))
            n_i = np.cumsum(g[:k])
            want[f"map@{k}"].append(0.0 if n_i[-1] == 0 else float((n_i / np.arange(1, k + 1) * g[:k]).sum() / n_i[-1]))
    np.testing.assert_array_equal(got.queries, scored)
    for key, values in want.items():
        np.testing.assert_allclose(got.values[key], values, rtol=0, atol=1e-12, err_msg=key)


def test_per_class_breakdown_is_the_mean_over_each_class_worst_first():
    from dml_runner.evaluation.per_query import per_class

    emb, labels = data(5, n=150, classes=6)
    pq = per_query_values(emb, labels, recall_at=(1,))
    names = np.array([f"c{v}" for v in labels])
    rows = per_class(pq, labels, names)
    lab = labels[pq.queries]
    assert [r["recall@1"] for r in rows] == sorted(r["recall@1"] for r in rows)
    assert sum(r["queries"] for r in rows) == pq.queries.size
    for r in rows:
        members = lab == r["label"]
        assert r["class"] == f"c{r['label']}" and r["queries"] == int(members.sum())
        assert r["map@r"] == pytest.approx(pq.values["map@r"][members].mean(), abs=1e-12)
        assert r["recall@1"] == pytest.approx(pq.values["recall@1"][members].mean(), abs=1e-12)


@pytest.mark.slow
def test_a_run_reports_the_metrics_asked_for_and_only_those(tmp_path):
    """eval.precision_at / map_at / mrr through dml-run: results.json holds them, equal to the library's values on
    the run's saved test embeddings; a run that does not ask has none of them."""
    import json

    from conftest import run_dml
    from dml_runner.evaluation.per_query import requested_metrics

    run_dml(["trainer=smoke", "eval.precision_at=[1,5]", "eval.map_at=[5]", "eval.mrr=true",
             f"hydra.run.dir={tmp_path / 'asked'}"], cwd=tmp_path)
    metrics = json.loads((tmp_path / "asked" / "results.json").read_text())["metrics"]
    saved = np.load(tmp_path / "asked" / "embeddings.npz")
    want = requested_metrics(saved["embeddings"], saved["labels"], precision_at=(1, 5), map_at=(5,), mrr=True)
    for key, value in want.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key
    run_dml(["trainer=smoke", f"hydra.run.dir={tmp_path / 'default'}"], cwd=tmp_path)
    plain = json.loads((tmp_path / "default" / "results.json").read_text())["metrics"]
    assert not {"precision@1", "precision@5", "map@5", "mrr"} & set(plain)


def test_bad_requested_metric_settings_are_refused_in_one_line(compose_cfg):
    from dml_runner import DMLRunnerError
    from dml_runner.config import validate_config

    with pytest.raises(DMLRunnerError, match=r"eval.precision_at") as err:
        validate_config(compose_cfg("eval.precision_at=[0,5]"))
    assert "\n" not in str(err.value)
