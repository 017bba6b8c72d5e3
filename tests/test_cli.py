"""End-to-end: the installed `dml-run` command, run from a directory outside the repository."""

import json
import re
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import dml_eval_cmd
from conftest import run_dml as run_cli


@pytest.mark.slow
def test_dml_run_writes_the_run_directory(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(["trainer=smoke", f"hydra.run.dir={out}"], cwd=tmp_path)
    assert "untrained (epoch 0)" in proc.stdout and "recall@1" in proc.stdout
    for name in ("results.json", "history.csv", "embeddings.npz", "last.pt"):
        assert (out / name).is_file(), name
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "completed"
    # digits has no validation split: the final epoch is the selected checkpoint, never the test set's best
    assert res["checkpoint_selected_on"] == "final" and not (out / "best.pt").exists()
    assert "best on" not in proc.stdout and "selected checkpoint: the final epoch" in proc.stdout
    assert set(res["metrics"]) >= {"recall@1", "recall@2", "recall@4", "recall@8", "nmi", "f1", "map@r",
                                    "r_precision"}
    ds = res["dataset"]
    assert ds["train_images"] + ds["test_images"] == 1797  # protocol=images: a held-out share of every digit
    assert ds["train_classes"] == 10 and ds["test_classes"] == 10
    assert res["device"] == "cpu" or res["device"].startswith("cuda")
    assert res["wall_time_s"] > 0 and "commit" in res["git"]
    assert res["config"]["trainer"]["epochs"] == 1 and res["choices"]["loss"] == "triplet"
    history = pd.read_csv(out / "history.csv")
    assert history["epoch"].tolist() == [0, 1]
    assert history.loc[1, "test/recall@1"] == pytest.approx(res["metrics"]["recall@1"])
    assert history.loc[1, "data_time_s"] >= 0 and history.loc[1, "step_time_s"] > 0  # where epoch 1's time went
    assert res["timing"]["per_epoch"] == [{"epoch": 1, "data_time_s": history.loc[1, "data_time_s"],
                                           "step_time_s": history.loc[1, "step_time_s"]}]
    emb = np.load(out / "embeddings.npz")
    assert emb["embeddings"].shape == (ds["test_images"], 64) and emb["labels"].shape == (ds["test_images"],)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and "model" in ckpt and "optimizer" in ckpt["method"]
    # dml-eval on the saved embeddings reproduces the run's retrieval numbers
    evaluated = subprocess.run(dml_eval_cmd() + [str(out / "embeddings.npz"), "--json", str(tmp_path / "e.json")],
                               capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr
    again = json.loads((tmp_path / "e.json").read_text())
    for key in ("recall@1", "recall@8", "map@r", "r_precision"):
        assert again[key] == pytest.approx(res["metrics"][key], abs=1e-6)


@pytest.mark.slow
def test_multirun_writes_a_summary_and_survives_a_failed_job(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "trainer=smoke", "trainer.eval_before_training=false", "trainer.save_checkpoints=false",
                    "trainer.select_metric=recall@1,no_such_metric", f"hydra.sweep.dir={sweep}"], cwd=tmp_path,
                   check=False)
    assert proc.returncode == 1  # a sweep with a failed job is not a success ...
    assert "1 of 2 sweep jobs did not complete" in proc.stderr  # ... and the failed job is listed
    assert "job 1 (trainer=smoke" in proc.stderr and "no_such_metric" in proc.stderr
    assert (sweep / "sweep_trainer.select_metric.png").is_file()  # a categorical sweep gets a chart too
    summary = pd.read_csv(sweep / "summary.csv")
    assert summary["status"].tolist() == ["completed", "failed"], proc.stdout
    assert "no_such_metric" in summary.loc[1, "error"]
    assert 0.0 <= summary.loc[0, "recall@1"] <= 1.0
    assert json.loads((sweep / "0" / "results.json").read_text())["status"] == "completed"


def test_unknown_option_gives_hydras_message(tmp_path):
    proc = run_cli(["trainer.no_such_field=1"], cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "no_such_field" in proc.stderr


def test_unknown_group_option_lists_the_available_ones(tmp_path):
    proc = run_cli(["loss=no_such_loss"], cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "no_such_loss" in proc.stderr and "contrastive" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_gpu_is_a_clear_error(tmp_path):
    proc = run_cli(["trainer=smoke", "trainer.device=cuda", f"hydra.run.dir={tmp_path / 'r'}"], cwd=tmp_path,
                   check=False)
    assert proc.returncode == 1
    assert "trainer.device=cuda" in proc.stderr and "Traceback" not in proc.stderr
    assert json.loads((tmp_path / "r" / "results.json").read_text())["status"] == "failed"


@pytest.mark.slow
def test_the_default_job_learns(tmp_path):
    """`make run`: training beats the untrained network on the held-out digits (R@1, MAP@R, NMI); epoch 0 is shown
    and the final epoch is the selected checkpoint."""
    out = tmp_path / "run"
    proc = run_cli([f"hydra.run.dir={out}"], cwd=tmp_path)
    res = json.loads((out / "results.json").read_text())
    for key in ("recall@1", "map@r", "nmi"):
        assert res["metrics"][key] >= res["untrained_metrics"][key], key
    assert res["metrics"]["recall@1"] >= 0.85
    assert res["final_epoch"] == 10 and "untrained (epoch 0)" in proc.stdout
    assert res["checkpoint_selected_on"] == "final"


def test_missing_dataset_root_names_the_path_and_the_source(tmp_path):
    missing = tmp_path / "no_such_dir" / "CUB_200_2011"
    proc = run_cli(["dataset=cub200", f"dataset.root={missing}", "trainer=smoke", f"hydra.run.dir={tmp_path / 'r'}"],
                   cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert str(missing) in proc.stderr and f"dml-prepare cub200 {missing}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_eval_backend_option_composes_and_a_bad_one_is_refused_before_training(tmp_path):
    out = tmp_path / "r"
    run_cli(["trainer=smoke", "eval.backend=torch_screened", f"hydra.run.dir={out}"], cwd=tmp_path)
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["eval"]["backend"] == "torch_screened" and "recall@1" in res["metrics"]
    proc = run_cli(["trainer=smoke", "eval.backend=annoy", f"hydra.run.dir={tmp_path / 'bad'}"], cwd=tmp_path,
                   check=False)
    assert proc.returncode == 1
    assert "eval.backend=annoy" in proc.stderr and "torch_screened" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "bad" / "last.pt").exists()


def test_checkpoint_selection_never_uses_the_test_set_unless_asked(tmp_path):
    """auto: a class-disjoint validation split when the dataset has one; test selection is explicit and labelled."""
    val = tmp_path / "val"
    proc = run_cli(["trainer=smoke", "trainer.epochs=2", "dataset.protocol=classes", "dataset.val_fraction=0.4",
                    "trainer.batch_size=12", "trainer.save_embeddings=false", "trainer.progress=true",
                    f"hydra.run.dir={val}"], cwd=tmp_path)
    # not a terminal: no progress bar redraws, one log line per epoch instead
    assert "\r" not in proc.stderr + proc.stdout and "it/s" not in proc.stderr + proc.stdout
    assert "epoch 1/2: train loss" in proc.stdout and "epoch 2/2: train loss" in proc.stdout
    res = json.loads((val / "results.json").read_text())
    assert res["checkpoint_selected_on"] == "val" and res["best"]["split"] == "val" and (val / "best.pt").is_file()
    test = tmp_path / "test"
    proc = run_cli(["trainer=smoke", "trainer.select_on=test", "trainer.save_embeddings=false",
                    f"hydra.run.dir={test}"], cwd=tmp_path)
    assert json.loads((test / "results.json").read_text())["checkpoint_selected_on"] == "test"
    assert re.search(r"best on TEST \(epoch \d+, optimistic\)", proc.stdout) and "optimistic" in (test / "cli.log").read_text()


def test_help_describes_every_group_and_option_in_one_line(tmp_path):
    from dml_runner.cli.run import AUTOMATIC_GROUPS, GROUP_HELP
    from dml_runner.config import TrainerConfig, conf_dir
    from dml_runner.config import fields as schema_fields

    proc = run_cli(["--help"], cwd=tmp_path)
    text = proc.stdout
    assert "schema" not in text and "powered by Hydra" not in text
    groups = [p.name for p in conf_dir().iterdir() if p.is_dir() and p.name not in (*AUTOMATIC_GROUPS, "hydra")]
    for group in groups:
        assert group in GROUP_HELP, f"conf/{group} has no line in dml_runner.cli.run.GROUP_HELP"
        line = next(line for line in text.splitlines() if line.strip().startswith(group + " "))
        assert GROUP_HELP[group] in line
    loss_line = next(line for line in text.splitlines() if line.strip().startswith("loss "))
    assert "triplet*" in loss_line and "contrastive" in loss_line
    for f in schema_fields(TrainerConfig):
        assert any(line.strip().startswith(f.name + " ") for line in text.splitlines()), f.name
        assert f.metadata.get("help"), f"TrainerConfig.{f.name} has no help text"


@pytest.mark.slow
def test_eval_normalize_evaluates_unit_embeddings_of_a_raw_trained_head(tmp_path):
    """eval.normalize=true: training sees the raw head output, evaluation and embeddings.npz the L2-normalised one."""
    norms = {}
    for flag in ("true", "false"):
        out = tmp_path / flag
        run_cli(["trainer=smoke", "backbone.normalize=false", f"eval.normalize={flag}", f"hydra.run.dir={out}"],
                cwd=tmp_path)
        norms[flag] = np.linalg.norm(np.load(out / "embeddings.npz")["embeddings"], axis=1)
    assert np.allclose(norms["true"], 1.0, atol=1e-5)
    assert not np.allclose(norms["false"], 1.0, atol=1e-2)  # the head itself does not normalise


def test_choices_made_by_configs_are_logged(caplog):
    """loss=hdml_npair selects method=hdml and sampler=npair: the log says so; command-line choices are not repeated."""
    import logging

    from dml_runner.run import log_config_choices

    meta = {"overrides": ["loss=hdml_npair", "trainer.epochs=3"],
            "choices": {"loss": "hdml_npair", "method": "hdml", "sampler": "npair", "dataset": "digits",
                        "preset": "digits"}}
    with caplog.at_level(logging.INFO, logger="dml_runner.run"):
        assert log_config_choices(meta) == ["method=hdml", "sampler=npair"]
    assert "method=hdml sampler=npair" in caplog.text
    assert log_config_choices({"overrides": ["method=hdml"], "choices": {"method": "hdml"}}) == []
