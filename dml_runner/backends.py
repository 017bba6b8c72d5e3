"""Process-wide settings of torch's CUDA backends (determinism, cuDNN autotuning, float32 matmul precision) and the
default number of DataLoader workers.

On the CPU none of these changes a number. On CUDA:

- ``trainer.deterministic=true`` (:func:`configure_backends`) sets ``CUBLAS_WORKSPACE_CONFIG`` (cuBLAS reads it when
  it creates its first handle, so before the first CUDA matrix product), ``torch.use_deterministic_algorithms``
  (warn-only: an operation without a deterministic CUDA kernel warns instead of stopping the run) and cuDNN's
  deterministic mode with autotuning off;
- otherwise cuDNN autotuning (``cudnn.benchmark``) is on: each convolution shape is timed once and its fastest
  algorithm kept (the training batches have fixed shapes);
- the evaluation's search and k-means run inside :func:`exact_float32_matmul`: float32 products in IEEE float32,
  never TF32, whatever the process-wide setting is.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

# the cuBLAS workspace setting NVIDIA documents for reproducible results (CUDA 10.2 and later)
CUBLAS_DETERMINISTIC = ":4096:8"


def configure_backends(deterministic: bool, cuda: bool) -> None:
    """Determinism (``trainer.deterministic``) or cuDNN autotuning on CUDA; call before the first CUDA operation."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)
    # set both ways: an earlier run in the same process (a multirun) must not leave its choice behind
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = cuda and not deterministic


@contextlib.contextmanager
def exact_float32_matmul() -> Iterator[None]:
    """float32 matrix products in full float32 (no TF32 on CUDA) inside the block; the setting is restored after."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def loader_workers(setting: int | None, dataset: object, cuda: bool, local_processes: int | None = None) -> int:
    """DataLoader worker processes: ``setting`` (``trainer.num_workers``), or when null: on CUDA, a dataset that decodes
    image files gets min(8, cores per local process - 1); otherwise 0 (in-memory data need no workers, and on the CPU
    the workers would take the cores the training step computes on)."""
    if setting is not None:
        return int(setting)
    from dml_runner.datasets.images import ImageListDataset

    base = dataset
    while hasattr(base, "base"):  # a subset or validation split of a file dataset reads the same files
        base = base.base
    if not (cuda and isinstance(base, ImageListDataset)):
        return 0
    if local_processes is None:  # torchrun's processes on this machine share its cores
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores // max(1, local_processes) - 1))
