"""Resume: a run killed (SIGKILL) or interrupted (SIGINT/SIGTERM) mid-run and resumed ends exactly where the
uninterrupted run ends; an interrupt records itself and the command that resumes the run."""

import json
import os
import signal
import subprocess
import time

import pytest
import torch

from conftest import dml_run_cmd

ARGS = ["trainer.epochs=3", "trainer.eval_every=3", "trainer.eval_before_training=false", "trainer.progress=false",
        "dataset.max_shift=1", "backbone.dropout=0.1"]


@pytest.mark.slow
def test_sigkill_then_resume_auto_matches_uninterrupted(tmp_path):
    full = tmp_path / "full"
    subprocess.run(dml_run_cmd() + ARGS + [f"hydra.run.dir={full}"], cwd=tmp_path, check=True,
                   capture_output=True, timeout=600)
    expected = json.loads((full / "results.json").read_text())

    killed = tmp_path / "outputs" / "runs" / "killed"
    proc = subprocess.Popen(dml_run_cmd() + ARGS + [f"hydra.run.dir={killed}"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # epoch 1 is checkpointed; epoch 2 is under way
    proc.wait()
    assert not (killed / "results.json").exists(), "the run finished before it could be killed"
    assert torch.load(killed / "last.pt", weights_only=True)["epoch"] < 3

    # A new invocation with resume=auto (new Hydra dir) finds the unfinished run with the same config
    resumed = subprocess.run(dml_run_cmd() + ARGS + ["trainer.resume=auto"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = json.loads((killed / "results.json").read_text())
    assert got["resumed_from"]["epoch"] >= 1
    assert got["metrics"] == pytest.approx(expected["metrics"], abs=1e-6)
    assert got["best"]["epoch"] == expected["best"]["epoch"]
    history = (killed / "history.csv").read_text().splitlines()
    assert len(history) == 1 + 3  # header + epochs 1..3, no duplicated epoch
    # the resumed invocation logged into the original run's log and left no run directory of its own
    assert "resumed after epoch" in (killed / "cli.log").read_text()
    assert [p.parent.name + "/" + p.name for p in (tmp_path / "outputs").glob("runs/*")] == ["runs/killed"]


def test_resume_refuses_a_checkpoint_from_another_config(tmp_path):
    from dml_runner import DMLRunnerError
    from dml_runner.training.checkpoint import load_checkpoint

    ckpt = tmp_path / "last.pt"
    saved = {"loss": {"margin": 1.0, "_target_": "x"}, "trainer": {"epochs": 3, "seed": 0}}
    torch.save({"epoch": 1, "model": {}, "config": saved}, ckpt)
    now = {"loss": {"margin": 0.5, "_target_": "x"}, "trainer": {"epochs": 10, "seed": 1}}
    with pytest.raises(DMLRunnerError) as err:
        load_checkpoint(ckpt, now)
    message = str(err.value)
    assert "loss.margin: 1.0 -> 0.5" in message and "trainer.seed: 0 -> 1" in message
    assert "trainer.epochs" not in message  # training longer is allowed
    assert load_checkpoint(ckpt, {**saved, "trainer": {"epochs": 10, "seed": 0}})["epoch"] == 1


def test_resume_rejects_garbage_and_missing_files(tmp_path):
    from dml_runner import DMLRunnerError
    from dml_runner.training.checkpoint import find_resume_checkpoint, load_checkpoint

    bad = tmp_path / "last.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(DMLRunnerError, match="cannot read checkpoint"):
        load_checkpoint(bad, {})
    with pytest.raises(DMLRunnerError, match="no checkpoint there"):
        find_resume_checkpoint(str(tmp_path / "nope"), tmp_path, {}, tmp_path)
    assert find_resume_checkpoint(None, tmp_path, {}, tmp_path) is None
    # auto with nothing to resume starts fresh
    assert find_resume_checkpoint("auto", tmp_path / "new", {}, search_root=tmp_path / "none") is None


def test_resume_auto_searches_the_configured_output_root_not_the_working_directory(tmp_path, monkeypatch):
    from dml_runner.training.checkpoint import find_resume_checkpoint

    config = {"trainer": {"seed": 0}}
    root = tmp_path / "elsewhere"
    for name, status in (("done", "completed"), ("cut", None), ("other", None)):
        run = root / "runs" / name
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps({"trainer": {"seed": 1 if name == "other" else 0}}))
        torch.save({"epoch": 1}, run / "last.pt")
        if status:
            (run / "results.json").write_text(json.dumps({"status": status}))
    monkeypatch.chdir(tmp_path)  # the working directory holds no outputs/
    assert find_resume_checkpoint("auto", tmp_path / "new", config, root) == root / "runs" / "cut" / "last.pt"
    assert find_resume_checkpoint("auto", tmp_path / "new", config, tmp_path / "outputs") is None


def test_the_keys_that_may_change_on_resume_come_from_the_schema(compose_cfg):
    from dml_runner.config import resume_free_keys
    from dml_runner.rundir import config_mismatches

    from omegaconf import OmegaConf

    free = resume_free_keys(compose_cfg("scheduler=cosine"))
    assert {"trainer.epochs", "trainer.resume", "eval.backend", "paths.data_dir", "tags"} <= free
    assert "scheduler.T_max" in free  # ${trainer.epochs}: changes only with a free key
    assert not {"trainer.seed", "trainer.batch_size", "optimizer.lr", "eval"} & free
    raw = OmegaConf.create({"paths": {"data_dir": "d"}, "trainer": {"seed": 0, "epochs": 3},
                            "dataset": {"root": "${paths.data_dir}/cub", "seeded": "${paths.data_dir}/${trainer.seed}",
                                        "env": "${oc.env:HOME}", "plain": 3, "deeper": "${dataset.root}/x"}})
    derived = resume_free_keys(raw) - resume_free_keys()
    assert derived == {"dataset.root", "dataset.deeper"}  # where the files are, not what they are; never a seed
    saved = {"trainer": {"epochs": 3, "seed": 0}, "scheduler": {"T_max": 3}, "eval": {"recall_at": [1]}}
    now = {"trainer": {"epochs": 9, "seed": 0}, "scheduler": {"T_max": 9}, "eval": {"recall_at": [1, 2]}}
    assert config_mismatches(saved, now, free) == []
    assert config_mismatches(saved, {**now, "trainer": {"epochs": 9, "seed": 2}}, free) == ["trainer.seed: 0 -> 2"]


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    from dml_runner.training.checkpoint import save_torch_atomic as save_atomic

    target = tmp_path / "last.pt"
    save_atomic({"epoch": 1}, target)

    def crash(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_atomic({"epoch": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"epoch": 1}
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


# --- interrupts (SIGINT / SIGTERM) --------------------------------------------------------------------------------

def _tiny_trainer(out_dir, loss=None, evaluate_fn=None, epochs=3):
    from functools import partial

    import numpy as np

    from dml_runner.backbones import small_cnn
    from dml_runner.datasets.base import DatasetSplits, TensorLabelledDataset
    from dml_runner.evaluation import evaluate
    from dml_runner.losses.triplet import TripletLoss
    from dml_runner.methods import StandardMethod
    from dml_runner.samplers import ClassBalancedBatchSampler
    from dml_runner.config import TrainerConfig
    from dml_runner.devices import seed_everything
    from dml_runner.training.trainer import Trainer

    seed_everything(0)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(60, 1, 8, 8, generator=g)
    labels = np.repeat(np.arange(6), 10)
    data = DatasetSplits(name="tiny", train=TensorLabelledDataset(images[:40], labels[:40]),
                         test=TensorLabelledDataset(images[40:], labels[40:]))
    settings = TrainerConfig(epochs=epochs, batch_size=8, eval_every=2, progress=False, eval_before_training=True)
    return Trainer(settings, data, small_cnn(in_channels=1, width=4, embedding_dim=8, dropout=0.2),
                   loss or TripletLoss(), StandardMethod(), partial(torch.optim.Adam, lr=0.01), None,
                   lambda labels, batch_size=None, seed=None: ClassBalancedBatchSampler(
                       labels, batch_size or 8, 0 if seed is None else seed, samples_per_class=2),
                   evaluate_fn or partial(evaluate, recall_at=(1,), metrics=("recall", "map_at_r"), device="cpu"),
                   out_dir)


def _interrupt_at(call: int, fn):
    """Wrap ``fn`` so that its ``call``-th call raises RunInterrupted(SIGINT), as the signal handler does."""
    from dml_runner.training.trainer import RunInterrupted

    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise RunInterrupted(signal.SIGINT)
        return fn(*args, **kwargs)

    return wrapped


def _resume_and_compare(tmp_path, expected):
    from dml_runner.training.checkpoint import load_checkpoint

    trainer = _tiny_trainer(tmp_path / "cut")
    state = load_checkpoint(tmp_path / "cut" / "last.pt", {})
    got = trainer.fit(resume=state)
    assert got["final"]["metrics"] == pytest.approx(expected["final"]["metrics"], abs=1e-6)
    assert got["untrained"] == pytest.approx(expected["untrained"])
    import pandas as pd

    timers = ["epoch_time_s", "data_time_s", "step_time_s"]
    full, cut = (pd.read_csv(tmp_path / d / "history.csv").drop(columns=timers) for d in ("full", "cut"))
    pd.testing.assert_frame_equal(cut, full, atol=1e-6)  # every epoch once, the same numbers


def test_interrupt_during_evaluation_keeps_the_trained_epoch(tmp_path):
    """last.pt is written before an evaluation: an interrupt there keeps the epoch and evaluates it on resume."""
    from functools import partial

    from dml_runner.evaluation import evaluate
    from dml_runner.training.trainer import RunInterrupted

    expected = _tiny_trainer(tmp_path / "full").fit()
    metric = partial(evaluate, recall_at=(1,), metrics=("recall", "map_at_r"), device="cpu")
    cut = _tiny_trainer(tmp_path / "cut", evaluate_fn=_interrupt_at(2, metric))  # call 1: epoch 0, call 2: epoch 2
    with pytest.raises(RunInterrupted) as stop:
        cut.fit()
    assert stop.value.checkpoint_epoch == 2
    ckpt = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["pending_eval"]["epoch"] == 2
    _resume_and_compare(tmp_path, expected)


def test_interrupt_mid_epoch_resumes_from_the_last_epoch_boundary(tmp_path):
    from dml_runner.losses.triplet import TripletLoss
    from dml_runner.training.trainer import RunInterrupted

    expected = _tiny_trainer(tmp_path / "full").fit()
    loss = TripletLoss()
    loss.forward = _interrupt_at(40 // 8 + 3, loss.forward)  # step 3 of epoch 2
    with pytest.raises(RunInterrupted) as stop:
        _tiny_trainer(tmp_path / "cut", loss=loss).fit()
    assert stop.value.checkpoint_epoch == 1
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["epoch"] == 1
    _resume_and_compare(tmp_path, expected)


def test_last_pt_is_written_once_per_epoch_evaluated_or_not(tmp_path, monkeypatch):
    from dml_runner.training.checkpoint import Checkpointer

    writes = []
    original = Checkpointer.save_last

    def counted(self, epoch, state):
        writes.append((epoch, state()["pending_eval"] is not None))
        return original(self, epoch, state)

    monkeypatch.setattr(Checkpointer, "save_last", counted)
    _tiny_trainer(tmp_path / "run", epochs=3).fit()  # eval_every=2: epochs 2 and 3 are evaluated
    assert writes == [(1, False), (2, True), (3, True)]


def test_interrupt_after_an_evaluated_epoch_resumes_with_the_same_history(tmp_path):
    """The evaluated epoch's last.pt holds its evaluation as pending: a resume evaluates it again, with the same
    numbers, and records every epoch once."""
    from dml_runner.losses.triplet import TripletLoss
    from dml_runner.training.trainer import RunInterrupted

    expected = _tiny_trainer(tmp_path / "full").fit()
    loss = TripletLoss()
    loss.forward = _interrupt_at(2 * (40 // 8) + 2, loss.forward)  # step 2 of epoch 3, after epoch 2's evaluation
    with pytest.raises(RunInterrupted) as stop:
        _tiny_trainer(tmp_path / "cut", loss=loss).fit()
    assert stop.value.checkpoint_epoch == 2
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["pending_eval"]["epoch"] == 2
    _resume_and_compare(tmp_path, expected)


@pytest.mark.slow
def test_sigterm_records_the_interrupt_and_its_command_resumes_in_the_same_directory(tmp_path):
    import shlex

    args = ARGS + ["trainer.eval_every=1"]
    full = tmp_path / "full"
    subprocess.run(dml_run_cmd() + args + [f"hydra.run.dir={full}"], cwd=tmp_path, check=True, capture_output=True,
                   timeout=600)
    expected = json.loads((full / "results.json").read_text())

    run_dir = tmp_path / "cut"
    proc = subprocess.Popen(dml_run_cmd() + args + [f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run_dir / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "interrupted" and res["signal"] == "SIGTERM" and res["checkpoint_epoch"] >= 1
    command = res["resume_command"]
    assert command in lines[0] and f"hydra.run.dir={run_dir}" in command
    log_before = (run_dir / "cli.log").read_text()

    resumed = subprocess.run(dml_run_cmd() + shlex.split(command)[1:], cwd=tmp_path, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = json.loads((run_dir / "results.json").read_text())
    assert got["status"] == "completed" and got["metrics"] == pytest.approx(expected["metrics"], abs=1e-6)
    log_after = (run_dir / "cli.log").read_text()
    assert log_after.startswith(log_before) and "resumed after epoch" in log_after
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut", "full"]  # no stray run directory
