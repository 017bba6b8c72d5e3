"""Pooled trunk features computed once per image and augmentation view, for training with a frozen trunk.

With a frozen CNN (``backbone.freeze=all``; an option for HDML, whose official code fine-tunes the CNN) every epoch
pushes the same images through the same network: only the layers after the pooled features learn.
:class:`FeatureCache` runs the trunk once over ``views`` augmented copies of the training set (view ``v`` of image
``i`` drawn under a fixed seed, so a cache is reproducible) and then serves batches of features: each epoch picks one
cached view per image, at random from ``(seed, epoch)``. The augmentation is thereby limited to ``views`` fixed draws
per image, where an uncached run draws a new crop and flip at every step. Used by ``trainer.cache_features=true``
(``trainer.cache_views`` = number of views).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from dml_runner import DMLRunnerError

_EPOCH_STREAM = 2**32 - 1  # the "view" number of the per-epoch view choice (never a real view)
_RANDOM_MODULES = (nn.modules.batchnorm._BatchNorm, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)


def view_seed(seed: int, view: int, index: int) -> int:
    """The torch seed under which view ``view`` of image ``index`` is drawn (deterministic, distinct per pair)."""
    return int(np.random.SeedSequence([int(seed) % 2**32, int(view), int(index)]).generate_state(1)[0])


class SeededView(Dataset):
    """``dataset`` with item ``i`` loaded under :func:`view_seed` ``(seed, view, i)``: one fixed augmentation view."""

    def __init__(self, dataset: Any, view: int, seed: int) -> None:
        self.dataset, self.view, self.seed = dataset, view, seed
        self.labels = dataset.labels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        torch.manual_seed(view_seed(self.seed, self.view, index))
        return self.dataset[index]


def trunk_is_frozen(model: nn.Module) -> bool:
    """True when ``model.trunk`` has no trainable parameter and, in training mode, no BatchNorm / dropout in train
    mode: its features are then the same function of the image at every step, so they can be cached."""
    trunk = model.trunk
    if any(p.requires_grad for p in trunk.parameters()):
        return False
    was_training = model.training
    model.train()
    frozen = not any(m.training for m in trunk.modules() if isinstance(m, _RANDOM_MODULES))
    model.train(was_training)
    return frozen


def require_frozen_trunk(model: nn.Module) -> None:
    if not trunk_is_frozen(model):
        raise DMLRunnerError(
            "trainer.cache_features=true needs a frozen trunk: its features must not change during training. "
            "Use backbone.freeze=all (torchvision backbones), or set trainer.cache_features=false to fine-tune "
            "the CNN.")


class CachedBatches:
    """Iterable of ``(features (B, D), labels (B,))`` CPU batches for one epoch, in the batch sampler's order."""

    def __init__(self, cache: FeatureCache, batch_sampler: Any, epoch: int) -> None:
        self.cache, self.batch_sampler = cache, batch_sampler
        gen = torch.Generator().manual_seed(view_seed(cache.seed, _EPOCH_STREAM, epoch) if cache.views > 1 else 0)
        self.view_of = torch.randint(cache.views, (cache.features.shape[1],), generator=gen)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        features = self.cache.features
        flat = features.reshape(-1, features.shape[-1])
        for indices in self.batch_sampler:
            idx = torch.as_tensor(indices, dtype=torch.long)
            rows = self.view_of[idx] * features.shape[1] + idx  # features[view_of[idx], idx] of the (V*N, D) view
            # into page-locked memory when training on CUDA: the trainer's non_blocking copy is then asynchronous
            out = _batch_buffer((idx.numel(), features.shape[-1]), features.dtype, self.cache.pin_memory)
            yield torch.index_select(flat, 0, rows, out=out), self.cache.labels[idx]


def _batch_buffer(shape: tuple[int, int], dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """An uninitialised batch, page-locked when ``pin`` (torch's host allocator reuses such blocks once their copies
    to the device have finished)."""
    return torch.empty(shape, dtype=dtype, pin_memory=pin)


class FeatureCache:
    """``features[v, i]``: pooled trunk features of view ``v`` of training image ``i`` (float32, CPU)."""

    def __init__(self, features: torch.Tensor, labels: np.ndarray, seed: int = 0,
                 pin_memory: bool | None = None) -> None:
        if features.ndim != 3 or features.shape[1] != len(labels):
            raise ValueError(f"features must be (views, N, D) with N = len(labels), got {tuple(features.shape)}")
        self.features = features
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.seed = seed
        # batches in pinned memory (None: when torch sees a CUDA GPU, the device the cached features train on)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)

    @property
    def views(self) -> int:
        return int(self.features.shape[0])

    @classmethod
    def build(cls, embed: Callable[..., torch.Tensor], dataset: Any, views: int = 1, seed: int = 0) -> FeatureCache:
        """Run ``embed(SeededView(dataset, v, seed), features=True)`` for each view (``TrainContext.embed``).

        The global torch RNG is restored afterwards, so building a cache does not shift later random draws.
        """
        if views < 1:
            raise DMLRunnerError(f"trainer.cache_views={views}: need at least one view")
        with torch.random.fork_rng(devices=[]):
            features = torch.stack([embed(SeededView(dataset, v, seed), features=True) for v in range(views)])
        return cls(features.float(), dataset.labels, seed)

    def batches(self, batch_sampler: Any, epoch: int) -> CachedBatches:
        return CachedBatches(self, batch_sampler, epoch)

    def nbytes(self) -> int:
        return self.features.numel() * self.features.element_size()
