"""Multi-process data parallelism (torchrun) without Hydra or method knowledge.

Every rank embeds its shard of the global batch; :class:`GlobalBatchLoss` all-gathers the embeddings *with
gradients* so the loss sees the whole global batch (pairs across ranks count), and :func:`average_gradients_on_step`
makes every optimiser average gradients over ranks before it steps (the gradient averaging of
DistributedDataParallel, done explicitly so that methods may call any submodule of the model).

Why the result equals single-process training on the global batch: every rank computes the same loss L; the
backward of the differentiable all-gather sums the incoming gradients over ranks, so rank r receives
W * dL/dz_r for its embeddings; averaging parameter gradients over the W ranks gives sum_r J_r^T dL/dz_r = dL/dtheta.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info_from_env() -> DistInfo:
    """Rank information set by torchrun (RANK, WORLD_SIZE, LOCAL_RANK); a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistInfo(rank=int(os.environ.get("RANK", "0")), world_size=world,
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(info: DistInfo, device: torch.device) -> None:
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)


def broadcast_module(module: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (identical starting point)."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=0)


class GlobalBatchLoss(nn.Module):
    """Wraps a loss so it is computed on the embeddings of all ranks (gathered with gradients)."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.inner = loss

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        from torch.distributed.nn.functional import all_gather

        all_emb = torch.cat(all_gather(embeddings.contiguous()))
        gathered = [torch.empty_like(labels) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, labels.contiguous())
        return self.inner(all_emb, torch.cat(gathered), *args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


def average_gradients_on_step(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Make ``optimizer.step()`` first average the gradients of its parameters over all ranks."""
    step = optimizer.step
    world = dist.get_world_size()

    def synced_step(*args, **kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= world
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        return step(*args, **kwargs)

    optimizer.step = synced_step  # type: ignore[method-assign]
    return optimizer


class ShardedBatchSampler:
    """Rank r takes items r, r+W, r+2W, ... of every global batch of ``sampler``."""

    def __init__(self, sampler, info: DistInfo) -> None:
        self.sampler = sampler
        self.info = info
        batch_size = getattr(sampler, "batch_size", None)
        if batch_size is not None and batch_size % info.world_size:
            raise ValueError(f"trainer.batch_size={batch_size} must be divisible by the number of processes "
                             f"({info.world_size})")

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.sampler:
            yield list(batch)[self.info.rank::self.info.world_size]

    def __getattr__(self, name: str):
        if name in ("sampler", "info"):
            raise AttributeError(name)
        return getattr(self.sampler, name)
