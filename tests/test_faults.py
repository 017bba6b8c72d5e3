"""Faults mid-run: NaN loss, out of memory, a full disk, a typo in a sweep. Each gives a clear message and keeps
what was already written."""

import json
import subprocess
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import dml_run_cmd
from dml_runner import DMLRunnerError
from dml_runner.backbones import small_cnn
from dml_runner.datasets.base import DatasetSplits, TensorLabelledDataset
from dml_runner.evaluation import evaluate
from dml_runner.methods import StandardMethod
from dml_runner.samplers import ClassBalancedBatchSampler
from dml_runner.config import TrainerConfig
from dml_runner.training.trainer import OutOfMemoryError, Trainer, TrainingDivergedError


class FailingLoss(torch.nn.Module):
    """Plain mean-distance loss that fails (NaN or OOM) at a given global step."""

    def __init__(self, fail_at_step: int, how: str) -> None:
        super().__init__()
        self.fail_at_step, self.how, self.calls = fail_at_step, how, 0

    def forward(self, emb, labels):
        self.calls += 1
        if self.calls == self.fail_at_step:
            if self.how == "nan":
                return emb.sum() * float("nan")
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return (emb[:, None] - emb[None]).pow(2).sum(-1).mean()


def tiny_data():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(60, 1, 8, 8, generator=g)
    labels = np.repeat(np.arange(6), 10)
    train = TensorLabelledDataset(images[:40], labels[:40])
    test = TensorLabelledDataset(images[40:], labels[40:])
    return DatasetSplits(name="tiny", train=train, test=test)


def make_trainer(tmp_path, loss, epochs=3):
    settings = TrainerConfig(epochs=epochs, batch_size=8, eval_every=1, progress=False, eval_before_training=False)
    return Trainer(settings, tiny_data(), small_cnn(in_channels=1, width=4, embedding_dim=8), loss,
                   StandardMethod(), partial(torch.optim.SGD, lr=0.01), None,
                   lambda labels, batch_size=None, seed=None: ClassBalancedBatchSampler(
                       labels, batch_size or 8, seed or 0, samples_per_class=2),
                   partial(evaluate, recall_at=(1,), metrics=("recall",)), tmp_path)


@pytest.mark.parametrize("how,error,words", [
    ("nan", TrainingDivergedError, ["nan", "epoch 2, step 2"]),
    ("oom", OutOfMemoryError, ["out of memory at epoch 2", "trainer.batch_size"]),
])
def test_failure_mid_run_keeps_the_last_checkpoint(tmp_path, how, error, words):
    steps_per_epoch = 40 // 8
    trainer = make_trainer(tmp_path, FailingLoss(steps_per_epoch + 2, how))
    with pytest.raises(error) as err:
        trainer.fit()
    for word in words:
        assert word in str(err.value)
    assert isinstance(err.value, DMLRunnerError)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1  # epoch 1's checkpoint survives the failure in epoch 2
    assert (tmp_path / "history.csv").read_text().count("\n") == 2  # header + epoch 1


def test_nan_guard_read_every_n_steps_still_names_the_step_and_keeps_the_checkpoint(tmp_path):
    """On CUDA the guard reads the device every N steps (no host sync per step); the step it names is still the
    first non-finite one, and epoch 1's checkpoint survives. Here N=100 > steps per epoch: read at the epoch end."""
    steps_per_epoch = 40 // 8
    trainer = make_trainer(tmp_path, FailingLoss(steps_per_epoch + 2, "nan"))
    trainer.finite_check_every = 100
    with pytest.raises(TrainingDivergedError, match="epoch 2, step 2;"):
        trainer.fit()
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1
    assert (tmp_path / "history.csv").read_text().count("\n") == 2


def test_full_disk_leaves_no_half_written_results(tmp_path, monkeypatch):
    from dml_runner import rundir as run_module

    target = tmp_path / "results.json"
    run_module.write_json_atomic({"status": "completed", "metrics": {"recall@1": 0.5}}, target)
    real_dump = json.dump

    def dump_then_fail(obj, fh, **kw):
        fh.write('{"status": "compl')
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", dump_then_fail)
    with pytest.raises(OSError, match="No space"):
        run_module.write_json_atomic({"status": "completed", "metrics": {"recall@1": 0.9}}, target)
    monkeypatch.setattr(json, "dump", real_dump)
    assert json.loads(target.read_text())["metrics"]["recall@1"] == 0.5  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_failure_record_never_overwrites_a_completed_result(tmp_path):
    from dml_runner.run import write_failure
    from dml_runner.rundir import write_json_atomic

    write_failure(tmp_path / "a", None, DMLRunnerError("boom"))
    assert json.loads((tmp_path / "a" / "results.json").read_text())["status"] == "failed"
    (tmp_path / "b").mkdir()
    write_json_atomic({"status": "completed"}, tmp_path / "b" / "results.json")
    write_failure(tmp_path / "b", None, DMLRunnerError("later"))
    assert json.loads((tmp_path / "b" / "results.json").read_text())["status"] == "completed"


def test_config_typo_in_a_sweep_stops_before_any_job(tmp_path):
    proc = subprocess.run(dml_run_cmd() + ["-m", "trainer.epoch=1,2", f"hydra.sweep.dir={tmp_path / 's'}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "epoch" in proc.stderr
    assert not list(Path(tmp_path).glob("s/*/results.json"))


def test_metrics_are_averaged_over_protocol_draws():
    from dml_runner.training.trainer import average_over_draws

    seen = []

    def fake_evaluate(emb, labels, query_mask, gallery_mask):
        seen.append(int(gallery_mask.sum()))
        return {"recall@1": float(query_mask.sum()) / 10, "num_queries": float(query_mask.sum())}

    draws = [(np.arange(6) < k, np.arange(6) >= k) for k in (2, 4)]
    out = average_over_draws(fake_evaluate, np.zeros((6, 2)), np.zeros(6), draws)
    assert seen == [4, 2]
    assert out["recall@1"] == pytest.approx(0.3) and out["recall@1_std"] == pytest.approx(0.1)
    assert out["num_draws"] == 2 and "num_queries_std" not in out


def test_a_new_run_never_overwrites_an_earlier_run_in_the_same_directory(tmp_path, compose_cfg):
    from dml_runner.run import run

    (tmp_path / "results.json").write_text('{"status": "completed"}')
    with pytest.raises(DMLRunnerError, match="already holds a run"):
        run(compose_cfg("trainer=smoke"), tmp_path)
    assert json.loads((tmp_path / "results.json").read_text()) == {"status": "completed"}
