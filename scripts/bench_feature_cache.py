"""Per-epoch HDML training time with a frozen CNN: from images (uncached) vs from the feature cache.

A random-init torchvision trunk (``backbone.freeze=all``, the official HDML setting) on synthetic image tensors
(smooth noise, random crop + flip as a training transform would give), HDML over the N-pair loss, N classes x 2
per batch. Reports the uncached epoch time, the one-off cache build time (one trunk pass per view) and the cached
epoch time. Example (a few minutes on 2 CPU cores)::

    .venv/bin/python scripts/bench_feature_cache.py --arch resnet18 --images 256 --size 128 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from dml_runner.backbones import torchvision_backbone
from dml_runner.datasets.base import DatasetSplits, TensorLabelledDataset
from dml_runner.losses.hdml import HDMLLoss
from dml_runner.methods.hdml import HDMLMethod
from dml_runner.samplers.npair import NPairBatchSampler
from dml_runner.config import TrainerConfig
from dml_runner.training.trainer import Trainer


class RandomCropFlip:
    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[1:]
        top, left = torch.randint(0, h - self.size + 1, (1,)).item(), torch.randint(0, w - self.size + 1, (1,)).item()
        crop = image[:, top:top + self.size, left:left + self.size]
        return crop.flip(2) if torch.rand(()) < 0.5 else crop


def synthetic_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth random images (upsampled noise), roughly the statistics of decoded, normalised photos."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, size // 8, size // 8, generator=gen)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def epoch_time(trainer: Trainer, epoch: int) -> float:
    trainer.model.train()
    start = time.perf_counter()
    for batch in trainer.method.batches(epoch):
        losses = trainer.method.compute_loss(trainer.to_device(batch))
        trainer.method.backward_and_step(losses)
    return time.perf_counter() - start


def build(args: argparse.Namespace, cache: bool, images: torch.Tensor, labels: np.ndarray) -> tuple[Trainer, float]:
    torch.manual_seed(0)
    train = TensorLabelledDataset(images, labels, transform=RandomCropFlip(args.size), name="synthetic")
    data = DatasetSplits(name="synthetic", train=train, test=train)
    model = torchvision_backbone(args.arch, freeze="all", embedding_dim=128)
    settings = TrainerConfig(batch_size=args.batch_size, device="cpu", progress=False, cache_features=cache,
                           cache_views=args.views, eval_batch_size=args.batch_size)
    start = time.perf_counter()
    trainer = Trainer(settings, data, model, HDMLLoss("npair"), HDMLMethod(),
                      torch.optim.Adam, None, lambda lab, batch_size=None, seed=None: NPairBatchSampler(
                          lab, batch_size or args.batch_size, 0), lambda *a, **k: {}, args.out)
    return trainer, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet18", choices=["resnet18", "resnet50", "googlenet"])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=128, help="crop size (images are stored 1/8 larger)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--views", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="/tmp/bench_feature_cache")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images = synthetic_images(args.images, args.size + args.size // 8)
    labels = np.repeat(np.arange(args.images // 4), 4)[: args.images]

    uncached, _ = build(args, False, images, labels)
    times_uncached = [epoch_time(uncached, e) for e in range(1, args.epochs + 1)]
    cached, setup_cached = build(args, True, images, labels)
    times_cached = [epoch_time(cached, e) for e in range(1, args.epochs + 1)]
    per_epoch_uncached, per_epoch_cached = float(np.median(times_uncached)), float(np.median(times_cached))
    result = {
        "arch": args.arch, "images": args.images, "size": args.size, "batch_size": args.batch_size,
        "views": args.views, "threads": args.threads, "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "epoch_s_uncached": round(per_epoch_uncached, 3),
        "epoch_s_cached": round(per_epoch_cached, 4), "cache_build_s": round(setup_cached, 2),
        "speedup_per_epoch": round(per_epoch_uncached / per_epoch_cached, 1),
        "epochs_to_amortise_cache": round(setup_cached / max(per_epoch_uncached - per_epoch_cached, 1e-9), 2),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
