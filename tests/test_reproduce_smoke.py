"""scripts/reproduce.py: a SMOKE reproduction end to end (fixtures -> multirun -> dml-report), and the pre-flight
data check that stops before any training."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "reproduce.py"


def reproduce(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=1200)


def test_missing_dataset_stops_before_training_with_the_prepare_command(tmp_path):
    proc = reproduce("table1", "--rows", "npair", "--data", str(tmp_path / "nothing"), "--out",
                     str(tmp_path / "sweep"), "--tables", str(tmp_path / "tables"), cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "nothing was trained" in proc.stderr
    assert f"python scripts/prepare_data.py cub200 {tmp_path / 'nothing' / 'CUB_200_2011'}" in proc.stderr
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "tables").exists()


def test_dry_run_prints_one_multirun_over_rows_and_seeds(tmp_path):
    sys.path.insert(0, str(REPO / "tests"))
    from datasets_fixtures import make_sop

    make_sop(tmp_path / "data")
    proc = reproduce("lifted", "--rows", "*_sop", "--seeds", "3", "--data", str(tmp_path / "data"), "--dry-run",
                     "--out", str(tmp_path / "sweep"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (cmd,) = [line for line in proc.stdout.splitlines() if line.startswith("$ ")]
    assert "-m +experiment=lifted/contrastive_sop,lifted/lifted_sop,lifted/triplet_sop" in cmd
    assert "trainer.seed=0,1,2" in cmd and "small_cnn" not in cmd
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_smoke_reproduction_end_to_end(tmp_path):
    tables = tmp_path / "tables"
    proc = reproduce("lifted", "--smoke", "--seeds", "2", "--rows", "lifted_cub200", "--out", str(tmp_path / "sweep"),
                     "--tables", str(tables), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    frame = pd.read_csv(tables / "lifted_structure_cub200_embedding_dim512.csv")
    ours = frame[frame["kind"] == "ours"].set_index("row")
    assert ours.loc["lifted_cub200", "n_seeds"] == 2 and ours.loc["lifted_cub200", "backbone"] == "small_cnn"
    assert ours.loc["lifted_cub200", "recall@1_paper"] == pytest.approx(47.2)
    md = (tables / "report.md").read_text()
    assert "SMOKE" in md and "Lifted Struct" in md
    assert (tables / "lifted_structure_cub200_embedding_dim512.tex").is_file()
    pngs = {p.name for p in tables.glob("*.png")}
    assert any(n.endswith("_curves.png") for n in pngs) and any(n.endswith("_tsne.png") for n in pngs)
    assert any(n.endswith("_retrieval.png") for n in pngs)
