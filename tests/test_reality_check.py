"""The reality check end to end on digits (what `make reality-check SMOKE=1` runs), its readings recomputed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dml_runner.datasets.folds import class_folds
from dml_runner.evaluation import evaluate

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_smoke_reality_check_writes_its_table(tmp_path):
    out, table = tmp_path / "runs", tmp_path / "table"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "reality_check.py"), "--smoke", "--out", str(out),
                           "--table", str(table)], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((table / "reality_check.json").read_text())
    md = (table / "reality_check.md").read_text()
    assert set(result["losses"]) == {"contrastive", "triplet"} and result["folds"] == 2 and result["trials"] == 2
    for loss, r in result["losses"].items():
        assert len(r["trials"]) == 2 and f"| {loss} |" in md
        # the search's value is the mean over the folds of each fold model's best validation MAP@R
        assert r["best_val_map@r"] == pytest.approx(max(t["val_map@r"] for t in r["trials"]))
        final = sorted((out / "final" / loss).glob("*/results.json"))
        assert len(final) == 2
        runs = [json.loads(p.read_text()) for p in final]
        # every fold model held out one fold of digits 0-4 (the training classes) and never a test class
        held = sorted(int(c) for res in runs for c in res["dataset"]["info"]["val_classes"])
        assert held == list(range(5))
        assert sorted(runs[0]["dataset"]["info"]["val_classes"]) == [str(c) for c in class_folds(np.arange(5), 2, 0)[
            runs[0]["dataset"]["info"]["fold"]]]
        # the two readings recomputed with the evaluation engine from the runs' test embeddings
        data = [dict(np.load(p.parent / "embeddings.npz")) for p in final]
        separate = np.mean([evaluate(d["embeddings"], d["labels"], metrics=("map_at_r",))["map@r"] for d in data])
        unit = [d["embeddings"] / np.linalg.norm(d["embeddings"], axis=1, keepdims=True) for d in data]
        concatenated = evaluate(np.concatenate(unit, axis=1).astype(np.float32), data[0]["labels"],
                                metrics=("map_at_r",))["map@r"]
        test = r["test"]
        assert test["separate"]["map@r"]["value"] == pytest.approx(separate, abs=1e-9)
        assert test["concatenated"]["map@r"]["value"] == pytest.approx(concatenated, abs=1e-9)
        for reading in ("separate", "concatenated"):
            for metric in ("map@r", "recall@1"):
                c = test[reading][metric]
                assert c["ci_low"] <= c["value"] <= c["ci_high"]


def test_unknown_loss_is_refused_before_anything_trains(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "reality_check.py"), "--losses", "contrastiv",
                           "--out", str(tmp_path / "runs")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no search space" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_make_target_runs_the_script_with_the_users_settings():
    proc = subprocess.run(["make", "-n", "reality-check", "SMOKE=1", "LOSSES=triplet,margin", "FOLDS=3",
                           "TRIALS=5", "FINAL_SEEDS=2", "ARGS=dataset=cub200"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    line = " ".join(proc.stdout.replace("\\\n", " ").split())
    assert "scripts/reality_check.py --smoke --losses triplet,margin --folds 3 --trials 5 --seeds 2 -- dataset=cub200" \
        in line, line
