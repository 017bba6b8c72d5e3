"""scripts/reproduce.py: a SMOKE reproduction end to end (fixtures -> multirun -> dml-report), and the pre-flight
data check that stops before any training."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from dml_runner.reference import load_reference

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
    from dml_runner.datasets.fixtures import make_sop

    make_sop(tmp_path / "data")
    proc = reproduce("lifted", "--rows", "*_sop", "--seeds", "3", "--data", str(tmp_path / "data"), "--dry-run",
                     "--out", str(tmp_path / "sweep"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (cmd,) = [line for line in proc.stdout.splitlines() if line.startswith("$ ")]
    assert "-m +experiment=lifted/contrastive_sop,lifted/lifted_sop,lifted/triplet_sop" in cmd
    assert "trainer.seed=0,1,2" in cmd and "small_cnn" not in cmd
    assert not (tmp_path / "sweep").exists()


def test_smoke_dry_run_keeps_the_rows_components_and_says_what_it_shrinks(tmp_path):
    """Without weights in the hub cache: random init, announced; the backbone, transform and method stay the row's."""
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "empty_torch_home")}
    proc = subprocess.run([sys.executable, str(SCRIPT), "dc", "--smoke", "--rows", "cub200", "--dry-run", "--out",
                           str(tmp_path / "sweep")], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "NOTICE" in proc.stdout and "RANDOM weights" in proc.stdout
    assert "batch: 80 = 20 classes x 4 -> 8 = 2 x 4 (within one cluster)" in proc.stdout
    assert "crop 224 -> 64" in proc.stdout and "conquer 3" in proc.stdout
    (cmd,) = [line for line in proc.stdout.splitlines() if line.startswith("$ ")]
    assert "+experiment=dc/cub200" in cmd and "backbone.pretrained=false" in cmd and "small_cnn" not in cmd
    assert "backbone=resnet50" in cmd and "transform=rrc_224" in cmd and "method=divide_conquer" in cmd


def test_smoke_dry_run_loads_weights_from_the_hub_cache(tmp_path, hub_cache):
    proc = reproduce("table2", "--smoke", "--rows", "npair,hdml_triplet", "--dry-run", "--out",
                     str(tmp_path / "sweep"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "NOTICE" not in proc.stdout and "weights: googlenet ImageNet weights from the torchvision hub cache" \
        in proc.stdout
    commands = [line for line in proc.stdout.splitlines() if line.startswith("$ ")]
    assert len(commands) == 2  # N-pair and triplet batches shrink differently: one multirun each
    assert not any("pretrained=false" in c for c in commands)
    assert "batch: 120 = 40 triplets [a; p; n] -> 12 = 4 triplets [a; p; n]" in proc.stdout
    assert "batch: 128 = 64 classes x 2 -> 8 = 4 x 2" in proc.stdout


TARGETS = ["table1", "table2", "table3", "lifted", "dc", "mdl"]


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_every_reproduce_target_ends_with_its_table(target, hub_cache, smoke_base, compose_cfg):
    """`make reproduce-<target> SMOKE=1` end to end: every row trains (its own components, tests/test_real_path.py
    checks each run), then dml-report writes the tables with the paper's numbers next to ours."""
    from smoke_runs import TARGET_DIRS, run_target

    run = run_target(target, smoke_base)
    assert run.returncode == 0, run.output()
    rows = sorted(str(p.relative_to(REPO / "conf" / "experiment").with_suffix("")) for p in
                  (REPO / "conf" / "experiment" / TARGET_DIRS[target]).glob("*.yaml"))
    assert set(run.jobs) == set(rows), f"run directories: {sorted(run.jobs)}"
    tables = [p for p in run.tables.glob("*.csv") if p.name not in ("runs.csv", "failed.csv")]
    assert tables, sorted(p.name for p in run.tables.iterdir())
    frame = pd.concat([pd.read_csv(p) for p in tables])
    ours = frame[frame["kind"] == "ours"]
    assert set(ours["experiment"]) == set(rows)
    assert (ours["n_seeds"] == 1).all()
    for row in rows:
        arch = compose_cfg(f"+experiment={row}").backbone.arch
        assert set(ours.loc[ours["experiment"] == row, "backbone"]) == {arch}, row
    assert ours["recall@1"].notna().all()
    for _, line in ours.iterrows():  # the paper's number next to ours wherever the reference has one
        ref = load_reference(compose_cfg(f"+experiment={line['experiment']}").reference.table)
        ref = ref[(ref["row"] == line["paper_row"]) & (ref["metric"] == "recall@1")]
        if "embedding_dim" in ref:
            ref = ref[ref["embedding_dim"].isna() | (ref["embedding_dim"] == line["embedding_dim"])]
        if len(ref):
            assert line["recall@1_paper"] == pytest.approx(float(ref["value"].iloc[0])), line["experiment"]
        else:
            assert pd.isna(line["recall@1_paper"]), line["experiment"]
    if target != "mdl":  # MDL published no numbers
        assert ours["recall@1_paper"].notna().any()
    for csv in tables:
        assert csv.with_suffix(".tex").is_file(), csv
    md = (run.tables / "report.md").read_text()
    assert "SMOKE" in md and md.count("| ") > len(rows)
