"""Devices and seeds: the one rule that turns a device setting (``trainer.device``, ``eval.device``, ``--device``)
into a torch device, and the seeding of every random generator (Python, numpy, torch and the loader workers).

torch is imported inside the functions, so the config checks can use :data:`DEVICE_PATTERN` cheaply.
"""

from __future__ import annotations

import re
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
