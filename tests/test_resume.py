"""Resume: a run killed with SIGKILL mid-run and resumed ends exactly where the uninterrupted run ends."""

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


def test_resume_refuses_a_checkpoint_from_another_config(tmp_path):
    from dml_runner import DMLRunnerError
    from dml_runner.run import load_checkpoint

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
    from dml_runner.run import find_resume_checkpoint, load_checkpoint

    bad = tmp_path / "last.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(DMLRunnerError, match="cannot read checkpoint"):
        load_checkpoint(bad, {})
    with pytest.raises(DMLRunnerError, match="no checkpoint there"):
        find_resume_checkpoint(str(tmp_path / "nope"), tmp_path, {})
    assert find_resume_checkpoint(None, tmp_path, {}) is None
    # auto with nothing to resume starts fresh
    assert find_resume_checkpoint("auto", tmp_path / "new", {}, search_root=tmp_path / "none") is None


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    from dml_runner.trainer import save_atomic

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
