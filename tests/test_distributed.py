"""Data parallelism on the CPU with the gloo backend and 2 processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dml_runner.distributed import (DistInfo, GlobalBatchLoss, ShardedBatchSampler, average_gradients_on_step,
                                    broadcast_module)
from dml_runner.losses.contrastive import ContrastiveLoss


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4))


def _global_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 6, generator=g), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = _model()
    if rank == 1:  # a different init on rank 1 must be overwritten by rank 0's
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    broadcast_module(model)
    x, y = _global_batch()
    loss_fn = GlobalBatchLoss(ContrastiveLoss(margin=1.0))
    opt = average_gradients_on_step(torch.optim.SGD(model.parameters(), lr=0.5))
    for _ in range(2):
        opt.zero_grad()
        loss = loss_fn(model(x[rank::world]), y[rank::world])  # rank r holds items r, r+W, ...
        loss.backward()
        opt.step()
    if rank == 0:
        torch.save({"loss": loss.detach(), "params": [p.detach() for p in model.parameters()]}, out)
    dist.destroy_process_group()


def test_two_process_step_equals_single_process_global_batch(tmp_path):
    out = str(tmp_path / "rank0.pt")
    port = 29500 + os.getpid() % 1000
    mp.spawn(_worker, args=(2, port, out), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)

    model = _model()
    x, y = _global_batch()
    loss_fn = ContrastiveLoss(margin=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
    # the loss sees the same pairs, in a permuted order
    assert torch.allclose(got["loss"], loss.detach(), atol=1e-6)
    for a, b in zip(got["params"], model.parameters()):
        assert torch.allclose(a, b.detach(), atol=1e-5)


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
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "run"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "dml_runner", "trainer=smoke",
           "trainer.device=cpu", f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "completed" and res["world_size"] == 2
    # evaluation ran once, on all of test (not on a rank's shard)
    assert np.load(out / "embeddings.npz")["embeddings"].shape[0] == res["dataset"]["test_images"] > 500


def test_a_non_zero_rank_reports_nothing_even_when_rank_0_has_finished(tmp_path, monkeypatch, capsys):
    """Regression: rank 1 used to decide it was rank 0 when rank 0's results.json already existed (a race), then
    crashed printing metrics it does not have (evaluation runs on rank 0 only)."""
    import dml_runner.cli as cli
    import dml_runner.run as run_mod

    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text("{}")  # rank 0 was faster
    monkeypatch.setattr(run_mod, "run", lambda cfg, out_dir, meta: {
        "rank": 1, "world_size": 2, "metrics": None, "output_dir": str(out_dir)})
    monkeypatch.setattr(sys, "argv", ["dml-run", f"hydra.run.dir={out}", "trainer=smoke"])
    cli.main()
    assert "outputs:" not in capsys.readouterr().out
