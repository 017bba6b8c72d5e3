"""Devices and seeds: the one rule that turns a device setting (``trainer.device``, ``eval.device``, ``--device``)
into a torch device, the seeding of every random generator (Python, numpy, torch and the loader workers), and the
process-wide settings of torch's CUDA backends (determinism, cuDNN autotuning, float32 matmul precision).

On the CPU the backend settings change no number. On CUDA:

- ``trainer.deterministic=true`` (:func:`configure_backends`) sets ``CUBLAS_WORKSPACE_CONFIG`` (cuBLAS reads it when
  it creates its first handle, so before the first CUDA matrix product), ``torch.use_deterministic_algorithms``
  (warn-only: an operation without a deterministic CUDA kernel warns instead of stopping the run) and cuDNN's
  deterministic mode with autotuning off;
- otherwise cuDNN autotuning (``cudnn.benchmark``) is on: each convolution shape is timed once and its fastest
  algorithm kept (the training batches have fixed shapes);
- the evaluation's search and k-means run inside :func:`exact_float32_matmul`: float32 products in IEEE float32,
  never TF32, whatever the process-wide setting is.

torch is imported inside the functions, so the config checks can use :data:`DEVICE_PATTERN` cheaply.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

from dml_runner import DMLRunnerError

if TYPE_CHECKING:
    import torch

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


class DeviceError(DMLRunnerError, ValueError):
    """A device that is not a device name or not present (a ValueError for callers of the evaluation API)."""


def resolve_device(name: str, option: str = "trainer.device") -> torch.device:
    """``auto`` -> CUDA when torch sees a GPU, else the CPU; an explicit accelerator that is absent is an error.

    ``option`` is the setting the name came from; error messages name it.
    """
    import torch

    name = str(name)
    if not DEVICE_PATTERN.match(name):
        raise DeviceError(f"{option}={name}: not a device; use {DEVICE_CHOICES}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"{option}={name}: PyTorch sees no CUDA device; use auto or cpu")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise DeviceError(f"{option}={name}: PyTorch sees {torch.cuda.device_count()} CUDA device(s) "
                              f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    if name == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"{option}={name}: PyTorch sees no MPS device; use auto or cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """All random generators are reseeded from (seed, epoch) at every epoch start, so a run resumed at an epoch
    boundary draws exactly the numbers the uninterrupted run drew (augmentation, dropout, sampling)."""
    return (seed * 1_000_003 + epoch * 7_919) % 2**63


def seed_worker(worker_id: int) -> None:
    """A DataLoader's ``worker_init_fn``: numpy and Python in a worker follow the seed torch gave it."""
    import random

    import numpy as np
    import torch

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


# ------------------------------------------------------------------------------------------- CUDA backend settings
# the cuBLAS workspace setting NVIDIA documents for reproducible results (CUDA 10.2 and later)
CUBLAS_DETERMINISTIC = ":4096:8"


def configure_backends(deterministic: bool, cuda: bool) -> None:
    """Determinism (``trainer.deterministic``) or cuDNN autotuning on CUDA; call before the first CUDA operation."""
    import torch

    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)
    # set both ways: an earlier run in the same process (a multirun) must not leave its choice behind
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = cuda and not deterministic


@contextlib.contextmanager
def exact_float32_matmul() -> Iterator[None]:
    """float32 matrix products in full float32 (no TF32 on CUDA) inside the block; the setting is restored after."""
    import torch

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)
