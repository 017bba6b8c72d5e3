"""Multi-process data parallelism (torchrun) on torch's DistributedDataParallel; no Hydra, no method knowledge.

A method's trainable modules form one task module (:class:`dml_runner.methods.base.TaskModule`) whose forward takes
this rank's shard of a batch and returns the losses; :func:`data_parallel` wraps it in
:class:`~torch.nn.parallel.DistributedDataParallel`, which all-reduces (averages) the gradients bucket by bucket
while the backward pass is still running. Inside the forward, :func:`gather_global_batch` all-gathers the
embeddings *with gradients*, in the sampler's order, so the loss sees exactly the global batch one process would
see (pairs across ranks count, order-dependent losses such as fixed triplet layouts keep their layout).

Why the result equals single-process training on the global batch: every rank computes the same loss L on the
same gathered batch. Parameters used after the gather (the loss's own, HDML's head, generator and classifier) get
the full dL/dphi on every rank, and their average is dL/dphi. Parameters used before it (the trunk) get
W * J_r^T dL/dz_r on rank r, because the backward of the differentiable all-gather sums the W ranks' identical
gradients; DDP's average over the W ranks gives sum_r J_r^T dL/dz_r = dL/dtheta. So the loss's own normalisation
(mean or sum over the global batch) is untouched: no rescaling by the world size anywhere.
What still differs without ``trainer.sync_bn``: BatchNorm layers before the gather normalise each rank's shard.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dml_runner import DMLRunnerError


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


# trainer.dist_timeout_s's default: rank 0 evaluates, checkpoints and (Divide & Conquer) re-clusters alone while the
# other ranks wait; NCCL's own 10-minute default kills such a job at SOP's size
DEFAULT_TIMEOUT_S = 4 * 3600
_WAIT_GROUP: Any = None  # gloo group the waiting ranks block on (None: the default group is gloo already)


def rank_device(info: DistInfo, device: torch.device) -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` under torchrun on CUDA (checked against the GPUs torch sees), else
    ``device``."""
    if not (info.enabled and device.type == "cuda"):
        return device
    gpus = torch.cuda.device_count()
    if info.local_rank >= gpus:
        raise DMLRunnerError(f"torchrun started local rank {info.local_rank} but this machine has {gpus} GPU(s): "
                             f"use --nproc_per_node={gpus} or fewer")
    return torch.device("cuda", info.local_rank)


def init_distributed(info: DistInfo, device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """The process group (NCCL on CUDA, gloo on the CPU) with ``timeout_s`` (``trainer.dist_timeout_s``) for every
    collective; on NCCL also a gloo group for :func:`wait_for_main`, so waiting ranks block on the host, not in a
    GPU kernel under NCCL's watchdog."""
    global _WAIT_GROUP
    if info.enabled and not dist.is_initialized():
        from datetime import timedelta

        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=float(timeout_s))
        dist.init_process_group(backend=backend, timeout=timeout)
        _WAIT_GROUP = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None


def wait_for_main() -> None:
    """Every rank waits here until all have arrived (rank 0 after its evaluation or checkpoint); no-op alone."""
    if _active():
        dist.barrier(group=_WAIT_GROUP)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast_module(module: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (identical starting point)."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=0)


class _AllGather(torch.autograd.Function):
    """``torch.cat`` of every rank's shard (equal shapes); the backward returns to each rank the sum over the ranks
    of the gradients of its rows (an all-reduce of the gathered gradient, then this rank's slice: gloo has no
    reduce-scatter)."""

    @staticmethod
    def forward(ctx: Any, shard: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(shard) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, shard)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def gather_global_batch(shard: torch.Tensor) -> torch.Tensor:
    """The global batch from every rank's shard, in the order of the batch sampler; differentiable.

    :class:`ShardedBatchSampler` gives rank r the items r, r+W, r+2W, ... of each global batch, so item i of the
    global batch is row i // W of rank i % W's shard. The rows are gathered with gradients (the backward returns
    to each rank the sum over ranks of the gradients of its rows). A single process gets its input back.
    """
    if not _active():
        return shard
    world = dist.get_world_size()
    gathered = _AllGather.apply(shard.contiguous())  # rank-major: [shard of rank 0; shard of rank 1; ...]
    return gathered.reshape(world, *shard.shape).transpose(0, 1).reshape(-1, *shard.shape[1:])


def data_parallel(module: nn.Module, info: DistInfo, device: torch.device,
                  find_unused_parameters: bool = False) -> nn.Module:
    """``module`` in DistributedDataParallel when there are several processes, else ``module`` itself.

    DDP broadcasts rank 0's parameters and buffers at construction and, before each forward, its buffers (the
    running statistics of BatchNorm layers that saw only a shard are rank 0's on every rank, the ones evaluation
    uses). ``find_unused_parameters``: a method whose steps leave some trainable parameters out of the graph (only
    one of several learners' losses per batch) must say so, else DDP waits for their gradients.
    """
    if not info.enabled:
        return module
    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids,
                                               find_unused_parameters=find_unused_parameters)


def convert_sync_batchnorm(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """Every BatchNorm of ``model`` as a SyncBatchNorm: statistics over the global batch (``trainer.sync_bn``).

    The parameters and running-statistics buffers stay the same tensors, so optimisers and checkpoints see no
    difference. torch's SyncBatchNorm has no CPU implementation, hence the refusal there.
    """
    if not info.enabled:
        return model
    if device.type == "cpu":
        raise DMLRunnerError("trainer.sync_bn=true needs CUDA devices (torch's SyncBatchNorm has no CPU path); "
                             "set trainer.sync_bn=false on the CPU")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's ``value`` (any picklable object, e.g. k-means assignments) on every rank; a single process gets
    ``value`` back. The other ranks pass a placeholder (None) and wait until rank 0 has computed its value."""
    if not _active():
        return value
    box = [value if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0, group=_WAIT_GROUP)  # host-side: the waiting ranks hold no GPU kernel
    return box[0]


def any_rank(flags: torch.Tensor) -> torch.Tensor:
    """Element-wise OR of boolean ``flags`` over the ranks (the same decision on every rank)."""
    if not _active():
        return flags
    as_int = flags.to(torch.int32)
    if dist.get_backend() == "nccl" and as_int.device.type != "cuda":
        as_int = as_int.cuda()
    dist.all_reduce(as_int, op=dist.ReduceOp.MAX)
    return as_int.to(flags.device).bool()


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

