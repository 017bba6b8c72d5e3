"""Data parallelism on the CPU with the gloo backend and 2 processes: DistributedDataParallel over each method's task
module must train exactly as one process on the global batch (standard, HDML N-pair and triplet, Divide & Conquer).

The two-process runs are one torchrun launch of this file (see ``__main__``) and go through the real Trainer (its
sharded samplers, the method's task module in DDP, the all-gather of the embeddings); the reference is the same
Trainer in one process with the same global batch size. ``dml-run`` itself runs under torchrun end to end too. The small CNN's BatchNorm layers are replaced by identities there: without
``trainer.sync_bn`` (CUDA only) BatchNorm before the gather normalises each rank's shard, by design. HDML's own
BatchNorm layers (after the gather) stay and must match.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from dml_runner import DMLRunnerError
from dml_runner.distributed import DistInfo, ShardedBatchSampler, dist_info_from_env

STEPS = 3


# ------------------------------------------------------------------------------------------------ scenarios
@functools.lru_cache(maxsize=1)
def _digits():
    from dml_runner.datasets.base import DatasetSplits, SubsetLabelledDataset
    from dml_runner.datasets.digits import build

    full = build(protocol="images", max_shift=0)  # no augmentation: a rank draws no random numbers per image
    keep = np.concatenate([np.flatnonzero(full.train.labels == c)[:30] for c in np.unique(full.train.labels)])
    return DatasetSplits(name="digits", train=SubsetLabelledDataset(full.train, keep), test=full.test)


def _model():
    from dml_runner.backbones.small_cnn import small_cnn

    model = small_cnn(in_channels=1, width=8, embedding_dim=16)
    for block in model.trunk.body:
        block[1] = torch.nn.Identity()  # no per-shard BatchNorm statistics (see the module docstring)
    return model


def _scenario(name: str, info: DistInfo, out_dir: Path, **settings: object):
    """A Trainer (method set up) of one scenario; the same parameters and global batches for every ``info``."""
    from dml_runner.config import TrainerConfig
    from dml_runner.losses.contrastive import ContrastiveLoss
    from dml_runner.losses.hdml import HDMLLoss
    from dml_runner.losses.margin import MarginLoss
    from dml_runner.methods.divide_conquer import DivideConquerMethod
    from dml_runner.methods.hdml import HDMLMethod
    from dml_runner.methods.standard import StandardMethod
    from dml_runner.samplers.class_balanced import ClassBalancedBatchSampler
    from dml_runner.samplers.hdml_triplets import HDMLTripletBatchSampler
    from dml_runner.samplers.npair import NPairBatchSampler
    from dml_runner.training.trainer import Trainer

    torch.manual_seed(0)
    model = _model()
    sgd = functools.partial(torch.optim.SGD, lr=0.05)  # SGD: a gradient off by the world size would show
    epochs = 1
    if name == "standard":
        loss, method, sampler, batch, optim = ContrastiveLoss(), StandardMethod(), ClassBalancedBatchSampler, 16, sgd
    elif name == "hdml_npair":
        loss, method, sampler, batch = HDMLLoss(metric="npair"), HDMLMethod(), NPairBatchSampler, 10
        optim = functools.partial(torch.optim.Adam, lr=1e-3)
    elif name == "hdml_triplet":  # fixed [anchors; positives; negatives] thirds: the gather must keep the layout
        loss, method, sampler, batch = HDMLLoss(metric="triplet"), HDMLMethod(), HDMLTripletBatchSampler, 12
        optim = functools.partial(torch.optim.Adam, lr=1e-3)
    elif name == "divide_conquer":  # learnable beta: one learner's loss per batch, DDP finds the unused ones
        loss = MarginLoss(learn_beta=True)
        method = DivideConquerMethod(num_clusters=2, recluster_every=1, finetune_epochs=1)
        sampler, batch, optim, epochs = ClassBalancedBatchSampler, 16, sgd, 3
    else:
        raise ValueError(name)

    def make_sampler(labels, batch_size=None, seed=None):
        kwargs = {"samples_per_class": 4} if sampler is ClassBalancedBatchSampler else {}
        return sampler(labels, batch_size=batch if batch_size is None else batch_size,
                       seed=0 if seed is None else seed, **kwargs)

    settings = TrainerConfig(epochs=epochs, batch_size=batch, device="cpu", seed=0, progress=False,
                             max_steps_per_epoch=STEPS, save_checkpoints=False, save_embeddings=False,
                             eval_before_training=False, **settings)
    return Trainer(settings, _digits(), model, loss, method, optim, None, make_sampler,
                   evaluate=lambda *a, **k: {"recall@1": 0.0}, out_dir=out_dir, dist_info=info)


def _train(trainer) -> dict:
    """One epoch of STEPS steps through the trainer's own loop; the task's parameters and last gradients."""
    from dml_runner.devices import epoch_seed, seed_everything

    seed_everything(epoch_seed(trainer.s.seed, 1))
    trainer.model.train()
    train_loss, _ = trainer._train_epoch(1)
    task = getattr(trainer.method.task, "module", trainer.method.task)  # DDP keeps the TaskModule as .module
    named = list(task.named_parameters())
    assignments = getattr(trainer.method, "assignments", None)
    return {"train_loss": train_loss, "ddp": type(trainer.method.task).__name__,
            "params": {k: p.detach().clone() for k, p in named},
            "grads": {k: p.grad.clone() for k, p in named if p.grad is not None},
            "assignments": None if assignments is None else torch.as_tensor(assignments)}


SCENARIOS = ("standard", "hdml_npair", "hdml_triplet", "divide_conquer")


def _rank_main(out_dir: Path) -> None:
    """One rank under torchrun (``python -m torch.distributed.run ... tests/test_distributed.py OUT``): every scenario
    through the real Trainer, whose DistInfo comes from torchrun's environment; results to OUT/rank<r>.pt."""
    import dml_runner.methods.divide_conquer as dc

    torch.set_num_threads(1)
    info = dist_info_from_env()
    if info.rank != 0:  # k-means runs on rank 0 only; the other ranks receive its assignments
        def no_kmeans(*args, **kwargs):
            raise AssertionError(f"rank {info.rank} ran k-means")

        dc.kmeans = no_kmeans
    out = {name: _train(_scenario(name, info, out_dir / name)) for name in SCENARIOS}
    try:  # torch's SyncBatchNorm has no CPU path: refused with the option's name
        _scenario("standard", info, out_dir / "sync_bn", sync_bn=True)
        out["sync_bn_error"] = None
    except DMLRunnerError as err:
        out["sync_bn_error"] = str(err)
    torch.save(out, out_dir / f"rank{info.rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Both ranks' results of every scenario, from one torchrun launch of 2 gloo processes."""
    out = tmp_path_factory.mktemp("ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    err = float((got - want).abs().max())
    assert err <= 1e-5 + 1e-4 * float(want.abs().max()), f"{what}: max |difference| {err:.3g}"


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.slow
@pytest.mark.parametrize("name", SCENARIOS)
def test_two_processes_train_as_one_process_on_the_global_batch(two_ranks, name, tmp_path):
    single = _train(_scenario(name, DistInfo(), tmp_path))
    assert single["ddp"] == "TaskModule" and two_ranks[0][name]["ddp"] == "DistributedDataParallel"
    # gradients: DDP's average over ranks of the gathered-batch loss is the one-process gradient (no factor W)
    for rank in two_ranks:
        got = rank[name]
        assert got["grads"].keys() == single["grads"].keys() and got["grads"]
        for key, grad in single["grads"].items():  # float32 sums in another order: relative to each tensor's scale
            _assert_close_to_scale(got["grads"][key], grad, f"gradient of {key}")
        for key, value in single["params"].items():
            _assert_close_to_scale(got["params"][key], value, f"{key} after {STEPS} steps")
        assert got["train_loss"] == pytest.approx(single["train_loss"], rel=1e-4)
    # the parameters moved: the comparison is not between two untrained copies
    torch.manual_seed(0)
    start = dict(_model().named_parameters())
    moved = [k for k, v in single["params"].items() if k.startswith("model.trunk.") and
             not torch.allclose(v, start[k.removeprefix("model.")])]
    assert moved


@pytest.mark.slow
def test_divide_conquer_clusters_on_rank_0_and_every_rank_gets_them(two_ranks, tmp_path):
    a0, a1 = (r["divide_conquer"]["assignments"] for r in two_ranks)  # rank 1 would have failed had it clustered
    assert a0 is not None and torch.equal(a0, a1)
    assert set(a0.tolist()) == {0, 1}


@pytest.mark.slow
def test_sync_batchnorm_is_refused_on_the_cpu(two_ranks):
    assert all("trainer.sync_bn" in r["sync_bn_error"] for r in two_ranks)


def test_one_process_has_no_ddp_and_no_sync_batchnorm(tmp_path):
    from dml_runner.backbones.small_cnn import small_cnn
    from dml_runner.distributed import convert_sync_batchnorm, gather_global_batch

    trainer = _scenario("standard", DistInfo(), tmp_path, sync_bn=True)  # nothing to synchronise
    assert type(trainer.method.task).__name__ == "TaskModule"
    model = small_cnn(in_channels=1, width=8)
    assert convert_sync_batchnorm(model, DistInfo(), torch.device("cpu")) is model
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    x = torch.randn(4, 3)
    assert gather_global_batch(x) is x


def test_sharded_sampler_splits_every_global_batch():
    class Fixed:
        batch_size = 6

        def __iter__(self):
            yield from ([0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11])

        def __len__(self):
            return 2

    shards = [list(ShardedBatchSampler(Fixed(), DistInfo(rank=r, world_size=3))) for r in range(3)]
    assert shards[0] == [[0, 3], [6, 9]] and shards[2] == [[2, 5], [8, 11]]
    assert sorted(i for s in shards for b in s for i in b) == list(range(12))
    with pytest.raises(ValueError, match="divisible"):
        ShardedBatchSampler(Fixed(), DistInfo(rank=0, world_size=4))


@pytest.mark.slow
def test_torchrun_two_cpu_processes_end_to_end(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dml_runner",
           "trainer=smoke", "trainer.device=cpu", f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "completed" and res["world_size"] == 2
    # evaluation ran once, on all of test (not on a rank's shard)
    assert np.load(out / "embeddings.npz")["embeddings"].shape[0] == res["dataset"]["test_images"] > 500


def test_a_non_zero_rank_reports_nothing_even_when_rank_0_has_finished(tmp_path, monkeypatch, capsys):
    """Regression: rank 1 used to decide it was rank 0 when rank 0's results.json already existed (a race), then
    crashed printing metrics it does not have (evaluation runs on rank 0 only)."""
    import dml_runner.cli.run as cli
    import dml_runner.run as run_mod

    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text("{}")  # rank 0 was faster
    monkeypatch.setattr(run_mod, "run", lambda cfg, out_dir, meta: {
        "rank": 1, "world_size": 2, "metrics": None, "output_dir": str(out_dir)})
    monkeypatch.setattr(sys, "argv", ["dml-run", f"hydra.run.dir={out}", "trainer=smoke"])
    cli.main()
    assert "outputs:" not in capsys.readouterr().out


if __name__ == "__main__":
    _rank_main(Path(sys.argv[1]))
