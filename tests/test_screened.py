"""The bf16-screened exact search (dml_runner/evaluation/screened.py): its helpers against naive versions, its
error bound against float64, its rarely taken paths forced, and a check that the recheck is what makes it exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dml_runner.evaluation.screened as scr
from dml_runner.evaluation import evaluate
from test_metrics import KS, RETRIEVAL, _check, brute_retrieval


def _clustered(n=600, d=24, classes=120, noise=1.5, seed=0):
    """Normalised, class-structured, with many near-equal distances (what bf16 cannot separate)."""
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.arange(classes), rng.integers(0, classes, n - classes)])
    x = rng.normal(size=(classes, d))[y] + noise * rng.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), y


def _screened(x, y, **kw):
    return evaluate(x, y, recall_at=KS, metrics=RETRIEVAL, device="cpu", backend="torch_screened", **kw)


@pytest.fixture(params=["bf16", "fp32"])
def precision(request, monkeypatch):
    """Both screen precisions on every CPU (bf16 is emulated by torch where the CPU lacks it)."""
    monkeypatch.setenv("DML_SCREEN_PRECISION", request.param)
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[request.param]


def test_row_count_and_mask_nonzero_match_naive():
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(37, 3 * scr.COL_ALIGN, generator=gen) < 0.01
    mask[5] = True  # a full row: 3072 per row, so the byte lanes of the packed sum must not overflow
    mask[6] = False
    assert torch.equal(scr.row_count(mask), mask.sum(dim=1))
    r, c = scr.mask_nonzero(mask)
    r0, c0 = mask.nonzero(as_tuple=True)
    assert torch.equal(r, r0) and torch.equal(c, c0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_block_max_handles_signs_and_infinities(dtype):
    gen = torch.Generator().manual_seed(1)
    z = (torch.randn(9, 4 * scr.MAX_BLOCK, generator=gen) * 3).to(dtype)
    z[0, : scr.MAX_BLOCK] = -float("inf")  # a block of -inf only
    z[1, scr.MAX_BLOCK : 2 * scr.MAX_BLOCK] = -torch.rand(scr.MAX_BLOCK, generator=gen).to(dtype)  # all negative
    z[2, 0] = -0.0
    want = z.float().view(9, 4, scr.MAX_BLOCK).amax(dim=2)
    assert torch.equal(scr.block_max(z).float(), want)


def test_split3_recovers_float64_values():
    v = torch.tensor([0.0, 1.0, -1234.56789, 3.3e-7, 1e30], dtype=torch.float64)
    parts = scr.split3(v)
    assert parts.dtype == torch.bfloat16
    assert torch.allclose(parts.double().sum(dim=1), v, rtol=2.0**-22, atol=0)


@pytest.mark.parametrize("scale", [1.0, 1e-3, 250.0])
def test_error_bound_covers_every_pair(scale, precision):
    """The shifted product stays within the bound of s - shift (+ the output rounding) for all pairs."""
    rng = np.random.default_rng(2)
    q = torch.as_tensor((rng.normal(size=(64, 40)) * scale).astype(np.float32))
    g = torch.as_tensor((rng.normal(size=(700, 40)) * scale * rng.uniform(0.5, 2, size=(700, 1))).astype(np.float32))
    sc = scr.Screen(q, g, dtype=precision)
    rows = torch.arange(64)
    shift = torch.as_tensor(rng.normal(size=64) * scale * scale)
    e, sparts = sc.error_bound(rows, shift)
    z = sc.product(rows, sparts, torch.empty(64, sc.n_pad, dtype=precision))[:, : sc.n].double()
    exact = q.double() @ g.double().T - sc.half_sq_g[None, :] - shift[:, None]
    err = (z - exact).abs()
    allowed = e[:, None] + scr.U_OUT[precision] * z.abs()
    assert bool((err <= allowed).all())
    assert float((err / allowed).max()) > 1e-3  # the comparison is not vacuous


def test_screen_is_exact_where_bf16_alone_is_not(precision):
    """On data with near-ties the plain bf16 ranking differs from float64, the screened result does not."""
    x, y = _clustered()
    want = brute_retrieval(x, y)
    _check(_screened(x, y, chunk_size=64), want)
    xb = torch.as_tensor(x).to(torch.bfloat16).double().numpy()
    rough = brute_retrieval(xb, y)
    assert any(rough[k] != pytest.approx(want[k], abs=1e-12) for k in want)


def test_forcing_the_band_path_and_the_float64_fallback_keeps_the_results(monkeypatch, precision):
    x, y = _clustered(seed=3)
    want = brute_retrieval(x, y)
    calls = {"full": 0}
    full = scr._full_topk

    def counting_full(*a, **k):
        calls["full"] += 1
        return full(*a, **k)

    monkeypatch.setattr(scr, "BAND_SWITCH", 0)  # count the sure items, list only the band
    monkeypatch.setattr(scr, "SLACK_LEVELS", (0,))  # no slack: certification fails, rows go to float64
    monkeypatch.setattr(scr, "_full_topk", counting_full)
    _check(_screened(x, y, chunk_size=100), want)
    assert calls["full"] > 0


def test_without_the_recheck_the_counts_go_wrong(monkeypatch):
    """Mutation check: a zero error bound (trusting bf16) must break exactness on near-tied data."""
    monkeypatch.setenv("DML_SCREEN_PRECISION", "bf16")  # the float32 screen's error may be too small to show
    x, y = _clustered(seed=4)
    want = brute_retrieval(x, y)

    def no_bound(self, rows, shift):
        parts = scr.split3(-shift)
        return torch.full((rows.numel(),), 1e-30, dtype=torch.float64), parts

    monkeypatch.setattr(scr.Screen, "error_bound", no_bound)
    got = _screened(x, y, chunk_size=64)
    assert any(got[k] != pytest.approx(want[k], abs=1e-12) for k in want)


@pytest.mark.parametrize("n", [2, 3, 65, 1025])
def test_small_and_unaligned_galleries(n, precision):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, 5)).astype(np.float32)
    y = rng.integers(0, max(1, n // 3), n)
    _check(_screened(x, y), brute_retrieval(x, y))


def test_screened_equals_float32_search_on_continuous_data(precision):
    x, y = _clustered(n=900, seed=5)
    kw = dict(recall_at=(1, 4, 16, 100), metrics=RETRIEVAL, device="cpu", chunk_size=128)
    a = evaluate(x, y, backend="torch_screened", **kw)
    b = evaluate(x, y, backend="torch_fp32", **kw)
    assert a == b


def test_auto_backend_falls_back_to_float32_when_the_band_is_too_wide(monkeypatch, caplog):
    import dml_runner.evaluation as ev

    # the auto backend takes the screen only where bf16 is native: forced so that every CPU runs this path
    monkeypatch.setenv("DML_EVAL_SEARCH", "screened")
    x, y = _clustered(seed=6)
    want = brute_retrieval(x, y)
    calls = []
    real = ev.exact_retrieval
    monkeypatch.setattr(ev, "exact_retrieval", lambda *a, **k: calls.append(1) or real(*a, **k))
    _check(evaluate(x, y, recall_at=KS, metrics=RETRIEVAL, device="cpu"), want)
    assert calls  # 600 items: below the size where the screen pays, float32 from the start
    calls.clear()
    monkeypatch.setattr(ev, "SCREEN_MIN_QUERIES", 1)
    monkeypatch.setattr(ev, "SCREEN_MIN_GALLERY", 1)
    monkeypatch.setattr(ev, "SCREEN_FP32_MIN", 1)
    _check(evaluate(x, y, recall_at=KS, metrics=RETRIEVAL, device="cpu"), want)
    assert not calls  # normal data: the screen decides
    monkeypatch.setattr(scr, "band_limit", lambda n: 0.0)  # any band is "too wide"
    with caplog.at_level("INFO", logger="dml_runner.evaluation"):
        _check(evaluate(x, y, recall_at=KS, metrics=RETRIEVAL, device="cpu"), want)
    assert calls and "float32 search" in caplog.text
    calls.clear()
    _check(_screened(x, y), want)  # asked for explicitly: no fallback
    assert not calls


def test_band_limit_grows_with_the_gallery():
    assert scr.band_limit(1000) == 64
    assert scr.band_limit(60_000) > 200


def test_embeddings_beyond_the_bf16_range_are_refused():
    rng = np.random.default_rng(7)
    x = (rng.normal(size=(40, 4)) * 1e20).astype(np.float32)  # |x|^2 / 2 ~ 1e40: beyond bf16 and float32
    y = np.arange(40) % 5
    with pytest.raises(ValueError, match="rescale"):  # evaluate's input check comes first
        _screened(x, y)
    with pytest.raises(ValueError, match="torch_fp32"):  # the screen's own guard
        scr.screened_retrieval(x, y, x, y, np.arange(40))
    assert scr.screened_retrieval(x, y, x, y, np.arange(40), give_up_if_weak=True) is None
