#!/usr/bin/env python
"""Training-input throughput on a generated CUB-shaped tree of photo-like JPEGs (500x375 and 800x533).

    python scripts/bench_train.py                         # 200 images, 1 worker, every paper transform
    python scripts/bench_train.py --images 2000 --workers 1 4 --json bench_train.json
    python scripts/bench_train.py --data /tmp/cubtree     # generate into (or reuse) that directory

(a) loader images/s per worker for each paper transform (train and test side): our dataset with the decoded cache
    on (``dataset.cache=auto``) and off (``dataset.cache=none``), against a plain torchvision pipeline (a Dataset
    that opens each file with PIL and applies the same torchvision transforms). The cache is built before timing
    (its build time is reported separately); every setting reads the whole set once as a warm-up (the page cache
    then holds the files and the cache), then ``--rounds`` rounds time one epoch of each setting in turn and the
    best round counts (contention from other processes only slows a round down).
(b) dml-run's time per training step against a minimal PyTorch loop with the same model (our resnet18 backbone,
    128-d head), loss (triplet), batches (class-balanced sampler, batch 32) and data (224 px images in memory, so that
    no decoding hides the loop's own cost). Ours is one epoch of ``--steps`` steps of the Trainer's loop (what
    dml-run runs each epoch), the minimal loop is ``for images, labels in islice(loader, steps): loss =
    criterion(model(images), labels); zero_grad; backward; step``. Both are timed in CPU-seconds of this process
    (robust to other processes on a shared machine; with one intra-op thread, wall time on an idle one) and in
    wall-clock seconds (ours: history.csv's data_time_s + step_time_s); interleaved rounds (which loop goes first
    alternates), the best of each counts. The overhead ratio is ours / minimal - 1 (CPU-seconds); each round's own
    ratio (the two loops back to back) is reported too, with its median, its worst round, and its mean with a 95%
    Student-t interval: on a machine whose speed drifts, many short rounds (``--steps 2 --step-rounds 30``) pair the
    two loops closely, and the interval's upper end is what the 3% target is read against.
(c) images/s of an evaluation embedding pass (torchvision resnet18, random init, eval mode, no grad, batch 32,
    rrc_224's test transform: 224 px centre crops) through the loader with the cache off and on, next to the model
    alone on random tensors; on CPU (``--threads`` intra-op threads) unless ``--device cuda``.
(d) dml-run itself: a caffe_227 run (1 epoch, in-process loading) on a generated tree with train and test classes,
    with the cache on and off at the same seed: results.json's data_time_s of each (best of ``--run-rounds``), their
    ratio, and whether the two runs' test embeddings are identical.

Loader rates come two ways: images per CPU-second of an in-process loader (``workers=0``, ``time.process_time``:
one core's worth, robust to other processes on a shared machine), and wall-clock images/s per DataLoader worker.
Prints the CPU model and flags, a Markdown table, and writes JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

SIZES = ((500, 375), (800, 533))  # CUB's typical 500-px photos and a larger camera-like size


# ------------------------------------------------------------------------------------------------ the data

def photo_like(width: int, height: int, rng: np.random.Generator, white_background: bool = False) -> Image.Image:
    """A photo-like RGB image: smooth colour regions (bicubic-upsampled coarse noise), finer texture and sensor
    noise; with ``white_background``, an object (ellipse) on a white page, as product photos (SOP) and some
    CUB images look, so that lifted_227's crop to content has something to crop."""
    coarse = rng.integers(0, 256, (max(2, height // 50), max(2, width // 50), 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
    fine = rng.integers(0, 256, (max(2, height // 5), max(2, width // 5), 3), dtype=np.uint8)
    texture = np.asarray(Image.fromarray(fine).resize((width, height), Image.BILINEAR), dtype=np.float32)
    pixels = 0.75 * base + 0.25 * texture + rng.normal(0.0, 4.0, (height, width, 3))
    if white_background:
        yy, xx = np.mgrid[0:height, 0:width]
        cy, cx = rng.uniform(0.35, 0.65) * height, rng.uniform(0.35, 0.65) * width
        ry, rx = rng.uniform(0.2, 0.35) * height, rng.uniform(0.2, 0.35) * width
        outside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 > 1.0
        pixels[outside] = 255.0
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_tree(parent: Path, images: int, seed: int = 0, classes: int = 10,
              test_classes: int = 0) -> tuple[list[str], np.ndarray]:
    """A CUB_200_2011 tree (the fixtures' layout) whose files are photo-like JPEGs, half 500x375, half 800x533
    (alternating), every third on a white background: ``classes`` training classes (1, 2, ...) and ``test_classes``
    test classes (101, 102, ...). Returns (paths, labels) in images.txt order; an existing tree with the same number
    of images is reused."""
    from dml_runner.datasets.fixtures import make_cub200

    root = Path(parent) / "CUB_200_2011"
    per_class = -(-images // (classes + test_classes))
    listed = root / "images.txt"
    if not (listed.is_file() and len(listed.read_text().split("\n")) - 1 == (classes + test_classes) * per_class):
        ids = [*range(1, classes + 1), *range(101, 101 + test_classes)]
        root = make_cub200(Path(parent), classes=ids, per_class=per_class, size=(8, 8))
        rng = np.random.default_rng(seed)
        for k, line in enumerate(listed.read_text().split("\n")[:-1]):
            w, h = SIZES[k % len(SIZES)]
            photo_like(w, h, rng, white_background=k % 3 == 2).save(root / "images" / line.split(" ", 1)[1],
                                                                      format="JPEG", quality=90)
    rows = [line.split(" ", 1) for line in listed.read_text().split("\n")[:-1]]
    labels = np.array([int(line.split()[1]) for line in (root / "image_class_labels.txt").read_text().split("\n")[:-1]])
    paths = [str(root / "images" / rel) for _, rel in rows]
    return paths[:images], labels[:images]


class PlainTorchvision(Dataset):
    """The reference pipeline: open each file with PIL, convert to RGB, apply the transform; nothing else."""

    def __init__(self, paths: list[str], labels: np.ndarray, transform) -> None:
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with Image.open(self.paths[i]) as image:
            return self.transform(image.convert("RGB")), int(self.labels[i])


def paper_transforms() -> dict[str, object]:
    """Every paper transform, train and test side (timm: its eval transform with a typical pretrained config; its
    training side is a RandomResizedCrop as rrc_224's)."""
    from timm.data import create_transform

    from dml_runner.datasets.transforms import caffe_227, rrc_224

    return {
        "caffe_227 train": caffe_227(True), "caffe_227 test": caffe_227(False),
        "lifted_227 train": caffe_227(True, resize_mode="content_pad"),
        "lifted_227 test": caffe_227(False, resize_mode="content_pad"),
        "rrc_224 train": rrc_224(True), "rrc_224 test": rrc_224(False),
        "timm test": create_transform(input_size=(3, 224, 224), crop_pct=0.875, interpolation="bicubic",
                                      mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), is_training=False),
    }


def interleaved_rates(datasets: dict[str, object], workers: int, batch_size: int, rounds: int,
                      clock: str) -> dict[str, float]:
    """images/s (``clock="wall"``) or images per CPU-second of this process (``clock="cpu"``, in-process loading
    only) of each dataset: one warm-up epoch each (worker start-up, page cache), then ``rounds`` rounds that time
    one epoch of every dataset in turn; the best round counts. Interleaving and best-of keep the comparison fair
    on a machine shared with other work: contention only ever slows a round down."""
    timer = time.process_time if clock == "cpu" else time.perf_counter
    loaders = {k: DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                             persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))
               for k, ds in datasets.items()}
    for loader in loaders.values():
        for _ in loader:
            pass
    best = dict.fromkeys(loaders, 0.0)
    for _ in range(rounds):
        for k, loader in loaders.items():
            seen, start = 0, timer()
            for images, _labels in loader:
                seen += images.shape[0]
            best[k] = max(best[k], seen / (timer() - start))
    return best


def first_batch_equal(a, b, batch_size: int) -> bool:
    out = []
    for ds in (a, b):
        torch.manual_seed(0)
        out.append(next(iter(DataLoader(ds, batch_size=batch_size, shuffle=False)))[0])
    return bool(torch.equal(out[0], out[1]))


def bench_loaders(paths, labels, cache_dir: Path, args) -> list[dict]:
    from dml_runner.datasets.decoded_cache import cached_dataset
    from dml_runner.datasets.images import ImageListDataset

    rows = []
    for name, tf in paper_transforms().items():
        if args.only and not any(o in name for o in args.only):
            continue
        plain = PlainTorchvision(paths, labels, tf)
        ours_off = ImageListDataset(paths, labels, transform=tf, name="cub200")
        t0 = time.perf_counter()
        ours_on = cached_dataset(ImageListDataset(paths, labels, transform=tf, name="cub200"), cache_dir,
                                 progress=False, tag=f"bench-{name.replace(' ', '-')}")
        build_s = time.perf_counter() - t0
        record = getattr(ours_on, "decoded_cache_record", {})
        sides = {"plain": plain, "ours_off": ours_off, **({"ours_on": ours_on} if record.get("cached") else {})}
        cpu = {f"{k}_per_cpu_s": v for k, v in
               interleaved_rates(sides, 0, args.batch_size, args.rounds, clock="cpu").items()}
        if record.get("cached"):
            cpu["cpu_speedup_vs_plain"] = cpu["ours_on_per_cpu_s"] / cpu["plain_per_cpu_s"]
        print(f"  {name:17s} in-process: plain {cpu['plain_per_cpu_s']:7.1f}  ours, cache off "
              f"{cpu['ours_off_per_cpu_s']:7.1f}  ours, cache on "
              + (f"{cpu['ours_on_per_cpu_s']:7.1f} ({cpu['cpu_speedup_vs_plain']:.2f}x)" if record.get("cached")
                 else "   (not cached)") + " images per CPU-second", flush=True)
        for workers in args.workers:
            per = max(1, workers)
            wall = interleaved_rates(sides, workers, args.batch_size, args.rounds, clock="wall")
            row = {"transform": name, "workers": workers, "images": len(paths), **cpu,
                   **{f"{k}_per_worker": v / per for k, v in wall.items()}, "cached": bool(record.get("cached"))}
            if row["cached"]:
                row.update(cache_build_s=build_s, cache_bytes=record["bytes"],
                           identical=first_batch_equal(ours_on, plain, args.batch_size))
                row["speedup_vs_plain"] = row["ours_on_per_worker"] / row["plain_per_worker"]
            else:
                row["reason"] = record.get("reason", "")
            rows.append(row)
            print(f"  {name:17s} workers={workers}: plain {row['plain_per_worker']:7.1f}  ours, cache off "
                  f"{row['ours_off_per_worker']:7.1f}  ours, cache on "
                  + (f"{row['ours_on_per_worker']:7.1f} ({row['speedup_vs_plain']:.2f}x)" if row["cached"]
                     else "   (not cached)") + " images/s per worker", flush=True)
    return rows


def bench_embedding(paths, labels, cache_dir: Path, args) -> list[dict]:
    """images/s of an evaluation embedding pass: loader (rrc_224 test transform) + resnet18 forward, no grad."""
    import torchvision

    from dml_runner.datasets.decoded_cache import cached_dataset
    from dml_runner.datasets.images import ImageListDataset
    from dml_runner.datasets.transforms import rrc_224

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).to(device).eval()
    model.fc = torch.nn.Identity()
    workers = args.workers[-1]
    rows = []
    x = torch.randn(args.batch_size, 3, 224, 224, device=device)
    fake = [x] * max(1, len(paths) // args.batch_size)  # model only: as many batches, no loading
    loaders: dict[str, object] = {"model only (random tensors)": fake}
    for cache in (False, True):
        ds = ImageListDataset(paths, labels, transform=rrc_224(False), name="cub200")
        if cache:
            ds = cached_dataset(ds, cache_dir, progress=False, tag="bench-rrc_224-test")
        loader = DataLoader(ds, batch_size=args.batch_size, shuffle=False, num_workers=workers,
                            persistent_workers=workers > 0)
        for _ in loader:  # warm-up over the loader only (page cache, worker start-up)
            pass
        loaders[f"embedding pass, cache {'on' if cache else 'off'}"] = loader
    best = dict.fromkeys(loaders, 0.0)
    with torch.no_grad():
        model(x)  # warm-up
        for _ in range(args.rounds):  # interleaved rounds, the best counts (as the loader rates)
            for name, batches in loaders.items():
                seen, start = 0, time.perf_counter()
                for batch in batches:
                    images = batch[0] if isinstance(batch, (list, tuple)) else batch
                    model(images.to(device))
                    seen += images.shape[0]
                if device.type == "cuda":
                    torch.cuda.synchronize()
                best[name] = max(best[name], seen / (time.perf_counter() - start))
    for name, rate in best.items():
        w = 0 if name.startswith("model") else workers
        rows.append({"pass": name, "images_per_s": rate, "workers": w, "threads": torch.get_num_threads()})
        print(f"  {name}: {rate:.1f} images/s ({w} worker(s), {torch.get_num_threads()} intra-op thread(s))",
              flush=True)
    return rows


def bench_training_step(args) -> dict:
    """(b): seconds per training step of the Trainer (dml-run's loop) and of a minimal PyTorch loop, same work."""
    import copy
    import itertools
    from functools import partial

    from dml_runner.backbones import torchvision_backbone
    from dml_runner.config import TrainerConfig
    from dml_runner.datasets.base import DatasetSplits, TensorLabelledDataset
    from dml_runner.devices import epoch_seed, seed_everything
    from dml_runner.evaluation import evaluate
    from dml_runner.losses.triplet import TripletLoss
    from dml_runner.methods import StandardMethod
    from dml_runner.samplers import ClassBalancedBatchSampler
    from dml_runner.training.trainer import Trainer

    steps, batch = args.steps, args.batch_size
    g = torch.Generator().manual_seed(0)
    # 8 images a class: twice what `steps` batches take, and at least the classes of one batch
    classes = max(batch // 2, steps * batch // 4)
    px = args.step_px
    images = torch.rand(classes * 8, 3, px, px, generator=g)
    labels = np.repeat(np.arange(classes), 8)
    train = TensorLabelledDataset(images, labels, name="bench")
    test = TensorLabelledDataset(images[:16], labels[:16], name="bench")  # a token evaluation (outside the loop)
    torch.manual_seed(0)
    model = torchvision_backbone(arch="resnet18", pretrained=False, embedding_dim=128)

    def sampler(labels, batch_size=None, seed=None):
        return ClassBalancedBatchSampler(labels, batch_size or batch, 0 if seed is None else seed, samples_per_class=2)

    def ours(out_dir: Path) -> dict[str, float]:
        """The Trainer's epoch loop (what dml-run runs each epoch): CPU-seconds of this process per step, and the
        wall-clock seconds per step it records itself (history.csv's data_time_s + step_time_s)."""
        settings = TrainerConfig(epochs=1, batch_size=batch, device="cpu", max_steps_per_epoch=steps, num_workers=0,
                                 eval_before_training=False, save_checkpoints=False, save_embeddings=False,
                                 progress=False)
        trainer = Trainer(settings, DatasetSplits(name="bench", train=train, test=test), copy.deepcopy(model),
                          TripletLoss(), StandardMethod(), partial(torch.optim.Adam, lr=1e-5), None, sampler,
                          partial(evaluate, recall_at=(1,), metrics=("recall",), device="cpu"), out_dir)
        seed_everything(epoch_seed(0, 1))  # as Trainer.fit before each epoch
        trainer.model.train()
        cpu = time.process_time()
        _, extra = trainer._train_epoch(1)
        cpu = time.process_time() - cpu
        trainer.release()
        return {"cpu": cpu / steps, "wall": (extra["data_time_s"] + extra["step_time_s"]) / steps}

    def minimal() -> dict[str, float]:
        net, criterion = copy.deepcopy(model).train(), TripletLoss()
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-5)
        batches = sampler(labels, batch, 0)
        batches.set_epoch(1)
        loader = DataLoader(train, batch_sampler=batches, num_workers=0)
        cpu, wall = time.process_time(), time.perf_counter()
        for x, y in itertools.islice(loader, steps):
            loss = criterion(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return {"cpu": (time.process_time() - cpu) / steps, "wall": (time.perf_counter() - wall) / steps}

    best = {(side, clock): float("inf") for side in ("ours", "minimal") for clock in ("cpu", "wall")}
    paired = []  # each timed round's ours / minimal - 1 (CPU-seconds): the two loops ran back to back
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.step_rounds + 1):  # round 0 warms both up (allocator, first Adam step) and is dropped
            times = {}
            for side in ("ours", "minimal") if r % 2 else ("minimal", "ours"):  # alternate which runs first
                times[side] = ours(Path(tmp) / f"r{r}") if side == "ours" else minimal()
            print(f"  round {r}{' (warm-up)' if r == 0 else ''}: dml-run {times['ours']['cpu']:.3f} CPU-s/step "
                  f"({times['ours']['wall']:.3f} s wall), minimal loop {times['minimal']['cpu']:.3f} CPU-s/step "
                  f"({times['minimal']['wall']:.3f} s wall)", flush=True)
            if r:
                best = {(side, clock): min(v, times[side][clock]) for (side, clock), v in best.items()}
                paired.append(times["ours"]["cpu"] / times["minimal"]["cpu"] - 1)
    out = {"model": "resnet18 (torchvision, 128-d head), triplet loss, Adam", "image_px": px, "batch_size": batch,
           "steps": steps, "rounds": args.step_rounds, "threads": torch.get_num_threads(),
           **{f"{side}_{clock}_s_per_step": v for (side, clock), v in best.items()},
           "overhead": best["ours", "cpu"] / best["minimal", "cpu"] - 1,
           "overhead_wall": best["ours", "wall"] / best["minimal", "wall"] - 1,
           "overhead_per_round": paired, "overhead_median": float(np.median(paired)),
           "overhead_worst_round": max(paired), **paired_interval(paired)}
    print(f"  dml-run {out['ours_cpu_s_per_step']:.3f} CPU-s/step, minimal loop {out['minimal_cpu_s_per_step']:.3f}: "
          f"overhead, best of each, {100 * out['overhead']:+.1f}% (wall clock {100 * out['overhead_wall']:+.1f}%); "
          f"per round (paired): median "
          f"{100 * out['overhead_median']:+.1f}%, worst {100 * out['overhead_worst_round']:+.1f}%, mean "
          f"{100 * out['overhead_mean']:+.1f}% (95% interval {100 * out['overhead_low']:+.1f}% to "
          f"{100 * out['overhead_high']:+.1f}%: the 3% target is "
          f"{'met' if out['overhead_high'] <= 0.03 else 'NOT shown'} at that confidence)", flush=True)
    return out


def bench_run_data_time(data_parent: Path, args) -> dict:
    """(d): dml-run itself, a caffe_227 run on the generated CUB tree with the cache on (``dataset.cache=auto``)
    and off (``dataset.cache=none``), same seed: results.json's ``timing.data_time_s`` of each, and whether the two
    runs' test embeddings are equal. In-process loading (``trainer.num_workers=0``): data_time_s is then the loading
    work itself, not what workers leave over. The small CNN keeps the step short; the model does not enter
    data_time_s. The cache is built before training (its build is not in data_time_s; the first round builds it)."""
    import subprocess

    paths, _ = make_tree(data_parent, args.run_images, classes=8, test_classes=4)
    common = [sys.executable, "-m", "dml_runner", "dataset=cub200", f"paths.data_dir={data_parent}",
              f"paths.cache_dir={data_parent / 'cache'}", "transform=caffe_227", "backbone=small_cnn",
              "sampler=class_balanced", "sampler.samples_per_class=4", "trainer.batch_size=32", "trainer.epochs=1",
              "trainer.eval_before_training=false", "trainer.save_checkpoints=false", "trainer.num_workers=0",
              "trainer.device=cpu", "trainer.progress=false", "logger=null", "trainer.seed=0"]
    best: dict[str, float] = {"auto": float("inf"), "none": float("inf")}
    embeddings: dict[str, np.ndarray] = {}
    for r in range(args.run_rounds):
        for mode in ("auto", "none") if r % 2 == 0 else ("none", "auto"):
            out = data_parent / f"run_{mode}_{r}"
            proc = subprocess.run(common + [f"dataset.cache={mode}", f"hydra.run.dir={out}"], capture_output=True,
                                  text=True, env={**os.environ, "OMP_NUM_THREADS": str(max(1, args.threads))})
            if proc.returncode:
                raise SystemExit(f"(d) dml-run failed ({mode}):\n{proc.stderr[-2000:]}")
            res = json.loads((out / "results.json").read_text())
            best[mode] = min(best[mode], res["timing"]["data_time_s"])
            embeddings[mode] = np.load(out / "embeddings.npz")["embeddings"]
            print(f"  round {r}, dataset.cache={mode}: data_time_s {res['timing']['data_time_s']:.3f}, "
                  f"step_time_s {res['timing']['step_time_s']:.3f}", flush=True)
    out = {"images": len(paths), "rounds": args.run_rounds, "data_time_s_cache_on": best["auto"],
           "data_time_s_cache_off": best["none"], "ratio": best["auto"] / best["none"],
           "same_embeddings": bool(np.array_equal(embeddings["auto"], embeddings["none"]))}
    print(f"  caffe_227 dml-run: data_time_s {out['data_time_s_cache_on']:.3f} s with the cache, "
          f"{out['data_time_s_cache_off']:.3f} s without: {out['ratio']:.2f}x "
          f"({'meets' if out['ratio'] <= 0.4 else 'MISSES'} the 0.4x target); test embeddings "
          f"{'identical' if out['same_embeddings'] else 'DIFFERENT'}", flush=True)
    return out


def paired_interval(ratios: list[float]) -> dict[str, float]:
    """The mean of the rounds' paired overhead ratios and its 95% Student-t interval (rounds taken as independent:
    each pairs two loops run back to back, so slow drifts of the machine cancel within a round)."""
    from scipy import stats

    x = np.asarray(ratios, dtype=float)
    mean = float(x.mean())
    half = float(stats.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else float("inf")
    return {"overhead_mean": mean, "overhead_low": mean - half, "overhead_high": mean + half}


def markdown(loader_rows: list[dict], embed_rows: list[dict], step: dict | None = None,
             run: dict | None = None) -> str:
    lines = ["images per CPU-second in-process (one core's worth) / images/s per DataLoader worker (wall clock)", "",
             "| transform | workers | plain torchvision | ours, cache off | ours, cache on | cached / plain | "
             "identical | cache build | cache size |", "|---|---|---|---|---|---|---|---|---|"] if loader_rows else []
    for r in loader_rows:
        on = (f"{r['ours_on_per_cpu_s']:.0f} / {r['ours_on_per_worker']:.0f} | {r['cpu_speedup_vs_plain']:.2f}x / "
              f"{r['speedup_vs_plain']:.2f}x | {'yes' if r['identical'] else 'NO'}"
              f" | {r['cache_build_s']:.1f} s | {r['cache_bytes'] / r['images'] / 1024:.0f} KiB/image"
              if r["cached"] else "not cached (random first step) | | | |")
        lines.append(f"| {r['transform']} | {r['workers']} | {r['plain_per_cpu_s']:.0f} / {r['plain_per_worker']:.0f}"
                     f" | {r['ours_off_per_cpu_s']:.0f} / {r['ours_off_per_worker']:.0f} | {on} |")
    if step:
        lines += ["", f"| training step (resnet18, {step['image_px']} px, batch {step['batch_size']}, CPU, "
                  f"{step['threads']} thread(s)) | CPU-s/step | wall s/step |", "|---|---|---|",
                  f"| minimal PyTorch loop | {step['minimal_cpu_s_per_step']:.3f} | "
                  f"{step['minimal_wall_s_per_step']:.3f} |",
                  f"| dml-run's Trainer | {step['ours_cpu_s_per_step']:.3f} | {step['ours_wall_s_per_step']:.3f} |",
                  f"| overhead, best of each | {100 * step['overhead']:+.1f}% | {100 * step['overhead_wall']:+.1f}% |",
                  f"| overhead per round (paired), median / worst | {100 * step['overhead_median']:+.1f}% / "
                  f"{100 * step['overhead_worst_round']:+.1f}% | |",
                  f"| overhead per round (paired), mean [95% interval] | {100 * step['overhead_mean']:+.1f}% "
                  f"[{100 * step['overhead_low']:+.1f}%, {100 * step['overhead_high']:+.1f}%] | |"]
    if run:
        lines += ["", f"| caffe_227 dml-run ({run['images']} images, 1 epoch, best of {run['rounds']}) | data_time_s |",
                  "|---|---|", f"| dataset.cache=none | {run['data_time_s_cache_off']:.3f} |",
                  f"| dataset.cache=auto | {run['data_time_s_cache_on']:.3f} |",
                  f"| ratio (target <= 0.4x) | {run['ratio']:.2f}x |",
                  f"| test embeddings identical | {'yes' if run['same_embeddings'] else 'NO'} |"]
    if embed_rows:
        lines += ["", "| evaluation pass (resnet18, 224 px, batch 32) | workers | images/s |", "|---|---|---|"]
        lines += [f"| {r['pass']} | {r['workers']} | {r['images_per_s']:.1f} |" for r in embed_rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=200, help="images in the generated tree")
    p.add_argument("--data", help="directory for the generated tree (reused when it matches; default: a temp dir)")
    p.add_argument("--cache-dir", help="where the decoded caches go (default: a temp dir, deleted at the end)")
    p.add_argument("--workers", type=int, nargs="+", default=[1], help="DataLoader workers (rates are per worker)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="timed epochs per setting, interleaved; the best counts")
    p.add_argument("--only", nargs="+", help="only transforms whose name contains one of these")
    p.add_argument("--skip-embedding", action="store_true")
    p.add_argument("--skip-loader", action="store_true", help="leave out (a), the loader rates")
    p.add_argument("--skip-step", action="store_true", help="leave out (b), the training-step overhead")
    p.add_argument("--steps", type=int, default=4, help="(b): training steps per timed epoch")
    p.add_argument("--step-rounds", type=int, default=3, help="(b): timed rounds of each loop, interleaved")
    p.add_argument("--step-px", type=int, default=224,
                   help="(b): image side; a small one (32) makes the step short, so the loop's own cost shows")
    p.add_argument("--skip-run", action="store_true", help="leave out (d), dml-run's data_time_s, cache on and off")
    p.add_argument("--run-images", type=int, default=192, help="(d): images in the run's tree (2/3 train, 1/3 test)")
    p.add_argument("--run-rounds", type=int, default=3, help="(d): runs of each setting, interleaved; the best counts")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device of the embedding pass")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads of this process (DataLoader workers always use 1); 0: torch's default")
    p.add_argument("--json", help="write the results to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from dml_runner.evaluation import cpu_info

    cpu = cpu_info().summary()
    command = "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:])
    print(f"cpu: {cpu}\nos.cpu_count()={os.cpu_count()}; torch {torch.__version__}, {torch.get_num_threads()} "
          f"intra-op threads in the main process\ncommand: {command}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else Path(tmp) / "data"
        cache_dir = Path(args.cache_dir) if args.cache_dir else Path(tmp) / "cache"
        t0 = time.perf_counter()
        paths, labels = make_tree(data, args.images)
        sizes = [os.path.getsize(p) for p in paths]
        print(f"data: {len(paths)} photo-like JPEGs (500x375 and 800x533), mean {np.mean(sizes) / 1024:.0f} KiB, "
              f"in {data} ({time.perf_counter() - t0:.1f} s)", flush=True)
        loader_rows = [] if args.skip_loader else (print("(a) loader images/s per worker", flush=True)
                                                   or bench_loaders(paths, labels, cache_dir, args))
        step = None if args.skip_step else (print("(b) training step: dml-run against a minimal loop", flush=True)
                                            or bench_training_step(args))
        embed_rows = [] if args.skip_embedding else (print("(c) evaluation embedding pass", flush=True)
                                                     or bench_embedding(paths, labels, cache_dir, args))
        run = None if args.skip_run else (print("(d) a caffe_227 dml-run, cache on and off", flush=True)
                                          or bench_run_data_time(Path(tmp) / "run", args))
    print()
    print(markdown(loader_rows, embed_rows, step, run))
    for name in ("caffe_227 train", "lifted_227 train"):
        for r in (r for r in loader_rows if r["transform"] == name and r["cached"]):
            verdict = "meets" if min(r["speedup_vs_plain"], r["cpu_speedup_vs_plain"]) >= 2.5 else "MISSES"
            print(f"{name}: cached loader {r['cpu_speedup_vs_plain']:.2f}x (per CPU-second) and "
                  f"{r['speedup_vs_plain']:.2f}x (per worker, {r['workers']} worker(s), wall clock) the plain "
                  f"torchvision pipeline ({verdict} the 2.5x target)")
            ratio = r["ours_off_per_cpu_s"] / r["ours_on_per_cpu_s"]  # time per image, cache on over off
            print(f"{name}: a training loop's data time (in-process loading, as dml-run's data_time_s with "
                  f"trainer.num_workers=0) with the cache is {ratio:.2f}x the uncached one "
                  f"({'meets' if ratio <= 0.4 else 'MISSES'} the 0.4x target)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"cpu": cpu, "command": command, "torch": torch.__version__, "args": vars(args),
                       "loader": loader_rows, "embedding": embed_rows,
                       "training_step": step, "run_data_time": run}, fh, indent=2)


if __name__ == "__main__":
    main()
