#!/usr/bin/env python
"""Input-pipeline throughput (images/s) on generated JPEGs next to the model's training step time.

    python scripts/bench_dataloader.py                       # 512 JPEGs of 500x375, rrc_224, workers 0/1/2
    python scripts/bench_dataloader.py --workers 0 4 8 --device cuda --arch resnet50

Each loader setting reads the whole set for ``--epochs`` epochs (JPEG decode + the paper transform + collation,
and the host->device copy when ``--device cuda``); the first epoch includes worker start-up, later epochs show
what ``persistent_workers`` saves. The model step is forward + backward + SGD on one batch. The loader keeps the
accelerator fed when its images/s exceed the model's. Prints a Markdown table (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from dml_runner.backbones import torchvision_backbone
from dml_runner.datasets.fixtures import make_folder  # the fixture trees of the smoke mode and the tests
from dml_runner.datasets.folder import build


def loader_rate(dataset, batch_size: int, workers: int, pin: bool, persistent: bool, epochs: int,
                device: torch.device) -> list[float]:
    """images/s of each epoch."""
    pin = pin and device.type == "cuda"  # pinned memory only matters for (and only works with) an accelerator
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, pin_memory=pin,
                        persistent_workers=persistent and workers > 0, drop_last=True,
                        prefetch_factor=4 if workers > 0 else None)
    rates = []
    for _ in range(epochs):
        start, seen = time.perf_counter(), 0
        for images, _labels in loader:
            images = images.to(device, non_blocking=pin)
            seen += images.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(seen / (time.perf_counter() - start))
    return rates


def model_rate(arch: str, batch_size: int, side: int, steps: int, device: torch.device) -> float:
    model = torchvision_backbone(arch, embedding_dim=128).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    x = torch.randn(batch_size, 3, side, side, device=device)
    times = []
    for _ in range(steps + 1):  # the first step warms up kernels
        start = time.perf_counter()
        loss = model(x).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return batch_size / (sum(times[1:]) / steps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, nargs=2, default=(500, 375), help="JPEG width height (CUB-like)")
    parser.add_argument("--transform", choices=("rrc_224", "caffe_227"), default="rrc_224")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--model-steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        classes = 16
        root = make_folder(Path(tmp), n_classes=classes, per_class=-(-args.images // classes), size=tuple(args.size))
        splits = build(str(root), transform=args.transform)
        dataset = torch.utils.data.ConcatDataset([splits.train, splits.test])
        print(f"# {len(dataset)} JPEGs {args.size[0]}x{args.size[1]}, transform={args.transform} (train), "
              f"batch {args.batch_size}, device {device}, {os.cpu_count()} CPU cores, torch {torch.__version__}\n")
        print("| workers | pin_memory | persistent | epoch 1 img/s | later epochs img/s |")
        print("|---|---|---|---|---|")
        for workers in args.workers:
            settings = [(False, False), (True, workers > 0)]
            if workers == 0 and device.type != "cuda":
                settings = settings[:1]  # nothing to pin for and no workers to keep
            for pin, persistent in settings:
                rates = loader_rate(dataset, args.batch_size, workers, pin, persistent, args.epochs, device)
                later = sum(rates[1:]) / max(1, len(rates) - 1) if len(rates) > 1 else rates[0]
                pinned = pin if device.type == "cuda" else "n/a (cpu)"
                print(f"| {workers} | {pinned} | {persistent} | {rates[0]:.0f} | {later:.0f} |")
    side = 227 if args.transform == "caffe_227" else 224
    rate = model_rate(args.arch, args.batch_size, side, args.model_steps, device)
    print(f"\nmodel step ({args.arch}, batch {args.batch_size}, {side}x{side}, forward+backward+SGD on {device}): "
          f"{rate:.1f} img/s ({args.batch_size / rate:.2f} s/step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
