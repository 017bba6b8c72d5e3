"""dml-eval end to end: good input, JSON output, and every bad-input case (exit 2, message, no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from dml_runner.cli.eval import main
from dml_runner.evaluation import evaluate


def _write(tmp_path, name="emb.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def _data(n=80):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 8, n)
    x = (rng.normal(size=(8, 5))[y] + 0.5 * rng.normal(size=(n, 5))).astype(np.float32)
    return x, y


def test_cli_json_matches_evaluate(tmp_path, capsys):
    x, y = _data()
    path = _write(tmp_path, embeddings=x, labels=y)
    out = tmp_path / "m.json"
    assert main([str(path), "--recall-at", "1", "4", "--json", str(out), "--device", "cpu", "--seed", "1"]) == 0
    got = json.loads(out.read_text())
    want = evaluate(x, y, recall_at=(1, 4), device="cpu", seed=1)
    assert set(got) == set(want)
    for k in want:
        assert got[k] == pytest.approx(want[k])
    printed = capsys.readouterr().out
    assert "recall@1" in printed and "map@r" in printed


def test_cli_query_gallery_masks(tmp_path):
    x, y = _data()
    q = np.arange(80) < 30
    path = _write(tmp_path, embeddings=x, labels=y, query_mask=q, gallery_mask=~q)
    out = tmp_path / "m.json"
    assert main([str(path), "--metrics", "recall", "--json", str(out), "--device", "cpu"]) == 0
    want = evaluate(x, y, metrics=("recall",), query_mask=q, gallery_mask=~q, device="cpu")
    assert json.loads(out.read_text())["recall@1"] == pytest.approx(want["recall@1"])


def test_cli_subprocess(tmp_path):
    x, y = _data()
    path = _write(tmp_path, embeddings=x, labels=y)
    res = subprocess.run([sys.executable, "-m", "dml_runner.cli.eval", str(path), "--metrics", "recall",
                          "--device", "cpu"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "recall@8" in res.stdout and "estimated memory" in res.stderr


def _bad_cases(tmp_path):
    x, y = _data()
    not_npz = tmp_path / "text.npz"
    not_npz.write_text("hello")
    return {
        "missing file": (tmp_path / "nope.npz", "not found"),
        "not an npz": (not_npz, "not an .npz archive (it is a text file)"),
        "no labels": (_write(tmp_path, "a.npz", embeddings=x), "labels"),
        "no embeddings": (_write(tmp_path, "b.npz", labels=y), "embeddings"),
        "length mismatch": (_write(tmp_path, "c.npz", embeddings=x, labels=y[:-1]), "mismatch"),
        "nan": (_write(tmp_path, "d.npz", embeddings=np.full_like(x, np.nan), labels=y), "NaN"),
    }


@pytest.mark.parametrize("case", ["missing file", "not an npz", "no labels", "no embeddings", "length mismatch", "nan"])
def test_cli_bad_input(tmp_path, capsys, case):
    path, needle = _bad_cases(tmp_path)[case]
    assert main([str(path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and needle in err and "must be" in err
    assert "Traceback" not in err


def test_cli_refuses_when_memory_too_small(tmp_path, capsys):
    x, y = _data()
    path = _write(tmp_path, embeddings=x, labels=y)
    assert main([str(path), "--max-memory-gb", "0.001"]) == 2
    err = capsys.readouterr().err
    assert "estimated memory" in err and "exceeds" in err


def test_cli_backends_give_the_same_retrieval_metrics(tmp_path, capsys):
    x, y = _data(200)
    path = _write(tmp_path, embeddings=x, labels=y)
    got = {}
    for backend in ("torch_screened", "torch_fp32", "auto"):
        out = tmp_path / f"{backend}.json"
        assert main([str(path), "--metrics", "recall", "map_at_r", "r_precision", "--json", str(out),
                     "--device", "cpu", "--backend", backend]) == 0
        got[backend] = json.loads(out.read_text())
    assert got["torch_screened"] == got["torch_fp32"] == got["auto"]
    for name in ("annoy", "torch"):  # "torch" is no backend name (it once meant auto)
        with pytest.raises(SystemExit) as exc:
            main([str(path), "--backend", name])
        assert exc.value.code == 2 and "torch_screened" in capsys.readouterr().err


def test_cli_defaults_are_the_eval_config_defaults():
    from dml_runner.config import EvalConfig
    from dml_runner.cli.eval import build_parser

    args, default = build_parser().parse_args(["x.npz"]), EvalConfig()
    assert args.backend == default.backend.value == "auto"
    assert (args.recall_at, args.metrics, args.device, args.kmeans_iters) == \
        (default.recall_at, default.metrics, default.device, default.kmeans_iters)


def test_cli_names_what_is_wrong_with_the_file(tmp_path, capsys):
    x, y = _data()
    npy = tmp_path / "emb.npy"
    np.save(npy, x)
    text = tmp_path / "emb.npz"
    text.write_text("embeddings,labels\n0.1,1\n")
    pickled = tmp_path / "obj.npz"
    np.savez(pickled, embeddings=x, labels=np.array([object()] * len(y), dtype=object))
    for path, words in ((npy, "single .npy array"), (text, "text file"), (pickled, "pickled")):
        assert main([str(path), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_cli_option_errors_name_the_option_not_the_file(tmp_path, capsys, monkeypatch):
    import torch

    x, y = _data()
    path = _write(tmp_path, embeddings=x, labels=y)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cases = [(["--device", "cuda"], "--device=cuda: PyTorch sees no CUDA device"),
             (["--device", "gpu"], "--device=gpu: not a device"),
             (["--recall-at", "0", "4"], "--recall-at 0: every K must be >= 1"),
             (["--kmeans-iters", "0"], "--kmeans-iters 0"),
             (["--json", str(tmp_path / "no_dir" / "m.json")], "does not exist")]
    for extra, words in cases:
        assert main([str(path), *extra]) == 2
        err = capsys.readouterr().err
        assert words in err and "must be a .npz" not in err and str(path) not in err, err


def test_cli_refuses_a_json_path_before_computing(tmp_path, capsys, monkeypatch):
    from dml_runner.cli import eval as eval_cli

    x, y = _data()
    path = _write(tmp_path, embeddings=x, labels=y)
    monkeypatch.setattr(eval_cli, "evaluate", lambda *a, **k: pytest.fail("metrics computed before the check"))
    assert main([str(path), "--json", str(tmp_path / "missing" / "out.json")]) == 2


@pytest.mark.parametrize("labels,words", [
    (np.arange(80), "singleton"),
    (np.zeros(80, dtype=int), "share one label"),
])
def test_cli_refuses_labels_without_meaningful_metrics(tmp_path, capsys, labels, words):
    x, _ = _data()
    path = _write(tmp_path, embeddings=x, labels=labels)
    assert main([str(path), "--device", "cpu"]) == 2
    assert words in capsys.readouterr().err


def test_cli_warns_about_queries_without_a_positive(tmp_path, capsys):
    x, y = _data()
    y = y.copy()
    y[:3] = [100, 101, 102]  # three singleton classes
    path = _write(tmp_path, embeddings=x, labels=y)
    assert main([str(path), "--device", "cpu", "--metrics", "recall"]) == 0
    captured = capsys.readouterr()
    assert "warning: 3 queries have no other item of their class" in captured.err
    assert "recall@1" in captured.out


def test_the_backend_names_are_the_evaluation_engines():
    """config.EvalBackend (eval.backend, --backend) names exactly the engine's backends."""
    from dml_runner.config import EvalBackend
    from dml_runner.evaluation import BACKENDS

    assert sorted(b.value for b in EvalBackend) == sorted(BACKENDS)
