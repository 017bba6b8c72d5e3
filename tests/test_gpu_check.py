"""scripts/gpu_check.py: its CPU dry run goes through the same checks (training through the project's own run,
every evaluation backend against the CPU, torchrun) and a difference between devices fails a row."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow  # trains resnet18 for 2 x 2 steps, evaluates, and starts two torchrun jobs (30-120 s)
def test_dry_run_passes_every_check(gpu_check, tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert gpu_check.main(["--dry-run", "--archs", "resnet18", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    sections = [r["section"] for r in rows]
    assert sections.count("train") == 1 and sections.count("eval") == 4 and sections.count("torchrun") == 2
    assert sections.count("kmeans") == 3
    assert all(r["ok"] for r in rows)
    train = rows[0]
    assert "img/s" in train["result"] and train["what"].startswith("resnet18")
    printed = capsys.readouterr().out
    assert "random-init" in printed and "torchrun" in printed and "| ok" in printed


def test_a_device_difference_fails_its_row(gpu_check, tmp_path, monkeypatch, capsys):
    """The 'GPU' side (the CPU in a dry run) returning other numbers must fail the row and the exit code."""
    import dml_runner.evaluation as ev

    real = ev.evaluate
    calls = {"n": 0}

    def skewed(*a, **k):
        calls["n"] += 1
        r = real(*a, **k)
        if calls["n"] % 2 == 0 and k.get("backend") == "torch_fp32":  # the second ("cuda") call of each pair
            r["recall@1"] += 0.01
        return r

    monkeypatch.setattr(ev, "evaluate", skewed)
    out = tmp_path / "rows.json"
    code = gpu_check.main(["--dry-run", "--skip", "train", "torchrun", "--n-eval", "300", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    by = {r["what"].split(" ")[0]: r for r in rows if r["section"] == "eval"}
    assert code == 1 and not by["torch_fp32"]["ok"] and by["torch_screened"]["ok"] and by["faiss"]["ok"]
    assert by["torch_symmetric"]["ok"]
    assert "FAIL" in capsys.readouterr().out


def test_no_gpu_without_dry_run_is_a_clear_error(gpu_check, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert gpu_check.main([]) == 2
    assert "--dry-run" in capsys.readouterr().err
