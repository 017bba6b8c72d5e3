"""Step time of data-parallel training: DistributedDataParallel vs explicit gradient averaging, side by side.

Two CPU processes (gloo) train the same thing in both modes, alternating blocks of steps so that a change in the
machine's load hits both: a random-init ResNet-18 embedding model (dml-runner's torchvision backbone), each rank
embedding its shard of the global batch, the embeddings all-gathered with gradients (``gather_global_batch``), the
contrastive loss on the global batch, SGD.

- ``ddp``: the task module in DistributedDataParallel (what the trainer runs): each gradient bucket is all-reduced
  as soon as the backward pass has filled it, overlapping communication with the rest of the backward pass;
- ``explicit``: the averaging dml-runner used before, kept here as the baseline: after the whole backward pass,
  every gradient is flattened into one buffer, all-reduced, divided by the world size and copied back, then the
  optimiser steps.

Reports the median and interquartile range of the step time (forward, backward, communication, optimiser step) per
mode, measured on rank 0 after both ranks synchronised, and the share of the explicit mode's step spent in its
all-reduce. Example (about a minute on 2 CPU cores)::

    .venv/bin/python scripts/bench_ddp.py --images-per-rank 8 --size 112 --steps 10 --blocks 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dml_runner.backbones import torchvision_backbone
from dml_runner.distributed import gather_global_batch
from dml_runner.losses.contrastive import ContrastiveLoss
from dml_runner.methods.base import TaskModule

MODES = ("ddp", "explicit")


def explicit_average(params: list[torch.nn.Parameter], world: int) -> float:
    """The baseline: one flat all-reduce of every gradient after the backward pass; returns its seconds."""
    t0 = time.perf_counter()
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
    return time.perf_counter() - t0


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torchvision_backbone("resnet18", pretrained=False, embedding_dim=128)
    loss = ContrastiveLoss()

    def forward(batch: tuple) -> dict[str, torch.Tensor]:
        images, labels = batch
        return {"loss": loss(gather_global_batch(model(images)), gather_global_batch(labels))}

    task = TaskModule(forward, model=model, loss=loss)
    ddp = torch.nn.parallel.DistributedDataParallel(task)  # broadcasts rank 0's parameters: same start
    optimizer = torch.optim.SGD(task.parameters(), lr=1e-3)
    params = [p for p in task.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(rank)
    b = args.images_per_rank
    images = torch.rand(b, 3, args.size, args.size, generator=gen)
    labels = torch.arange(b) // 2 + rank * b  # pairs of one class per rank, classes differ across ranks

    def step(mode: str) -> tuple[float, float]:
        dist.barrier()
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        comm = 0.0
        if mode == "ddp":
            ddp((images, labels))["loss"].backward()
        else:
            task((images, labels))["loss"].backward()
            comm = explicit_average(params, world)
        optimizer.step()
        return time.perf_counter() - t0, comm

    for mode in MODES:  # warm-up: allocator, DDP's bucket rebuild after its first step
        for _ in range(args.warmup):
            step(mode)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    comms: list[float] = []
    for block in range(args.blocks):
        for mode in (MODES if block % 2 == 0 else MODES[::-1]):
            for _ in range(args.steps):
                seconds, comm = step(mode)
                times[mode].append(seconds)
                if mode == "explicit":
                    comms.append(comm)
    if rank == 0:
        Path(out).write_text(json.dumps({"times": times, "explicit_allreduce_s": comms,
                                         "params": sum(p.numel() for p in params)}))
    dist.destroy_process_group()


def cpu_description() -> dict[str, str]:
    info = {"machine": platform.machine(), "logical_cpus": str(os.cpu_count())}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        if line.startswith("model name"):
            info["model"] = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            info["flags"] = " ".join(sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c"))))
            break
    return info


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--images-per-rank", type=int, default=8)
    parser.add_argument("--size", type=int, default=112, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode and block")
    parser.add_argument("--blocks", type=int, default=3, help="alternating blocks of steps per mode")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rank0.json")
        mp.spawn(_worker, args=(args.processes, _free_port(), args, out), nprocs=args.processes, join=True)
        raw = json.loads(Path(out).read_text())
    rows = {}
    for mode in MODES:
        t = np.array(raw["times"][mode])
        rows[mode] = {"median_s": float(np.median(t)), "q25_s": float(np.percentile(t, 25)),
                      "q75_s": float(np.percentile(t, 75)), "steps": int(t.size)}
    comm = float(np.median(raw["explicit_allreduce_s"]))
    report = {"setup": {"model": "resnet18 (random init) + 128-d head", "parameters": raw["params"],
                        "processes": args.processes, "backend": "gloo", "images_per_rank": args.images_per_rank,
                        "size": args.size, "threads_per_process": args.threads, "torch": torch.__version__,
                        "cpu": cpu_description()},
              "modes": rows, "explicit_allreduce_median_s": comm,
              "ddp_speedup": rows["explicit"]["median_s"] / rows["ddp"]["median_s"]}
    print(f"{args.processes} processes x {args.images_per_rank} images {args.size} px, ResNet-18 "
          f"({raw['params'] / 1e6:.1f} M parameters), gloo, {args.threads} thread(s) per process, torch "
          f"{torch.__version__}; CPU: {report['setup']['cpu'].get('model', '?')}")
    print(f"{'mode':<10} {'median step (s)':>16} {'IQR (s)':>18} {'steps':>6}")
    for mode, r in rows.items():
        print(f"{mode:<10} {r['median_s']:>16.3f} {r['q25_s']:>8.3f}-{r['q75_s']:<9.3f} {r['steps']:>6}")
    print(f"explicit all-reduce after backward: median {comm:.3f} s per step "
          f"({100 * comm / rows['explicit']['median_s']:.0f}% of its step); DDP speed-up "
          f"x{report['ddp_speedup']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
