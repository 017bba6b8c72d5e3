"""Sweeps beyond a plain multirun: local parallel jobs (joblib), Slurm settings (submitit), Optuna search."""

import pandas as pd
import pytest
import yaml

from conftest import run_dml


def test_slurm_launcher_config_composes(compose_cfg):
    from hydra import compose, initialize_config_dir

    from dml_runner.config import conf_dir

    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert "submitit" in launcher._target_ and launcher.partition == "gpu" and launcher.gpus_per_node == 1


def test_optuna_search_optimises_validation_map_at_r(compose_cfg):
    from hydra import compose, initialize_config_dir

    from dml_runner.config import conf_dir

    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("config", overrides=["hparams_search=optuna"], return_hydra_config=True)
    assert cfg.trainer.select_on == "val" and cfg.trainer.select_metric == "map@r"
    assert cfg.dataset.val_fraction > 0 and cfg.hydra.sweeper.direction == "maximize"


@pytest.mark.slow
def test_local_parallel_launcher_runs_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    run_dml(["-m", "hydra/launcher=local_parallel", "trainer=smoke", "trainer.save_checkpoints=false",
             "loss=contrastive,triplet", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    summary = pd.read_csv(sweep / "summary.csv")
    assert summary["status"].tolist() == ["completed", "completed"]
    assert set(summary["loss"]) == {"contrastive", "triplet"}


@pytest.mark.slow
def test_optuna_sweep_end_to_end(tmp_path):
    sweep = tmp_path / "sweep"
    run_dml(["hparams_search=optuna", "hydra.sweeper.n_trials=2", "trainer=smoke", "trainer.batch_size=12",
             "trainer.save_checkpoints=false", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    summary = pd.read_csv(sweep / "summary.csv")
    assert (summary["best_selected_on"] == "val").all()
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(summary["best_val/map@r"].max())
