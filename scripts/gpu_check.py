#!/usr/bin/env python
"""GPU check (``make gpu-check``, or ``scripts/gpu_check.sh OUT`` on an offline node): every CUDA path of dml-runner
on one GPU, in a few minutes, as one table.

    python scripts/gpu_check.py --out DIR       # on a machine with a CUDA GPU (DIR/gpu_check.json, DIR/gpu_check.md)
    python scripts/gpu_check.py --dry-run       # the same code on the CPU with tiny sizes (tests/test_gpu_check.py)
    scripts/gpu_check.sh DIR                    # offline node: installs wheelhouse/ into a temporary target first

Checks, each one row of the table, each run on its own (a row that fails or cannot run says so; the others stand):
1. eval: every retrieval backend (torch_fp32, torch_screened, torch_symmetric, faiss) on the GPU against the
   certified CPU result (the screened search in float32, equal to a float64 brute force): the number of queries
   whose rank of the first positive or MAP@R differs (0 expected from the screened and symmetric searches, a few at
   most from the float32 ones), and the time of each; k-means in bf16 and float32 on the GPU against the CPU (NMI).
   faiss rows are skipped, saying so, when faiss is not installed.
2. train: a few training steps through the project's own run (``dml_runner.run.run`` on a composed config: the
   ``folder`` dataset on generated JPEGs, ``rrc_224``, the class-balanced sampler, the Trainer with bf16 autocast,
   channels_last and pinned-memory loading) of: GoogLeNet loading an ImageNet-shaped state dict from a generated
   torchvision hub cache (``backbone.pretrained=true``: the weights path and ``transform_input``), ResNet-18/50/101
   (random init), ResNet-18 with ``trainer.amp=false`` (the control), HDML (N-pair), HDML on cached features (frozen
   trunk), Divide & Conquer with 2 clusters, and a timm ViT. images/s of the second epoch (loading included), the
   data / compute split of a step when the run's history records it, peak GPU memory, and the memory still held
   after the run and a garbage collection. The weights are random (no network), so the loss values mean nothing.
3. paper: the rows ``make reproduce-*`` runs (scripts/reproduce.py's targets, composed as it composes them); for
   each distinct backbone / transform / crop among them (GoogLeNet with caffe_227 and lifted_227 at 227 px, ResNet-50
   with rrc_224 at 224 px, timm ViT-S/16 at 224 px), two epochs of ``--paper-steps`` class-balanced batches (the
   rows' batch, at most 128) on generated photo-like 500x375 JPEGs, with the row's own transform settings, once with
   the decoded-image cache (``dataset.cache=auto``) and once without (``dataset.cache=none``): images/s of the second
   epoch, its ``data_time_s`` and ``step_time_s`` from history.csv, and whether the training split was cached.
   Random init (the speed does not depend on the weights), a triplet loss and the standard method.
   From these, an estimated training time per ``make reproduce-*`` target on this GPU (printed after the table and
   written into the JSON and Markdown): per row, epochs x steps per epoch x batch images (steps per epoch = the
   dataset's official training image count // batch, or ``trainer.max_steps_per_epoch``), divided by the images/s
   measured with the cache for the row's backbone / transform / crop, times ``--seeds`` (3, as ``SEEDS``), summed.
   Evaluation, the cache's one-time build, model loading, HDML's generator and Divide & Conquer's reclustering are
   not counted, and a row's rate is measured at batch <= 128: an approximation of the order of magnitude.
4. torchrun: NCCL all-reduce in ``--nproc`` processes (2 when the machine has 2+ GPUs, else 1) and a ``dml-run``
   under torchrun with the same number of processes (a single process trains without a process group).

A row fails when its run raises, or when its numbers differ from the reference beyond the limits above (k-means:
NMI by more than 0.01). Exit code 1 when any row fails. ``--dry-run`` runs on the CPU ("cuda" side = the CPU again),
gloo instead of NCCL, tiny images and crops (the same backbones; the estimate's numbers then mean nothing). The
rows are written after each check, so a run stopped by a time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import csv
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the checkout itself, not an installed copy (an offline node installs nothing)
    sys.path.insert(0, str(ROOT))

ARCHS = ("googlenet", "resnet18", "resnet50", "resnet101")
# training runs: name -> (what the row says, extra overrides); the backbone is resnet18 unless the run names one
TRAIN_RUNS: dict[str, tuple[str, tuple[str, ...]]] = {
    "googlenet": ("googlenet, generated ImageNet-shaped hub weights (pretrained=true, transform_input)",
                  ("backbone=googlenet", "backbone.pretrained=true")),
    "resnet18": ("resnet18, random init", ("backbone=resnet18",)),
    "resnet50": ("resnet50, random init", ("backbone=resnet50",)),
    "resnet101": ("resnet101, random init", ("backbone=resnet101",)),
    "amp_off": ("resnet18, trainer.amp=false channels_last=false (control)",
                ("backbone=resnet18", "trainer.amp=false", "trainer.channels_last=false")),
    "hdml": ("HDML N-pair, resnet18", ("backbone=resnet18", "loss=hdml_npair", "method=hdml", "sampler=npair")),
    "hdml_cache": ("HDML N-pair on cached features, resnet18 frozen",
                   ("backbone=resnet18", "loss=hdml_npair", "method=hdml", "sampler=npair", "backbone.freeze=all",
                    "trainer.cache_features=true")),
    "dc": ("Divide & Conquer, 2 clusters, margin loss, resnet18",
           ("backbone=resnet18", "method=divide_conquer", "loss=margin", "method.num_clusters=2",
            "method.recluster_every=1", "method.finetune_epochs=0")),
    "timm": ("timm vit_tiny_patch16_224, random init", ("backbone=timm", "backbone.name=vit_tiny_patch16_224")),
}
RETRIEVAL_BACKENDS = ("torch_fp32", "torch_screened", "torch_symmetric", "faiss")
EXACT_BACKENDS = ("torch_screened", "torch_symmetric")  # certified: must equal the float64 result query by query
OUT_JSON, OUT_MD = "gpu_check.json", "gpu_check.md"
MAX_K = 100  # the largest Recall@K compared (faiss searches the top max(K, R) + 1)


class Sizes:
    """GPU sizes, or tiny ones for the CPU dry run."""

    def __init__(self, dry: bool, steps: int | None, n_eval: int | None, paper_steps: int | None = None):
        self.dry = dry
        self.image = 40 if dry else 288  # generated JPEG side
        self.crop = 32 if dry else 224
        self.resize = 36 if dry else 256
        # the folder split trains on half of the classes: enough images there for `steps` full batches per epoch
        self.classes, self.per_class = (8, 6) if dry else (64, 32)
        self.batch = 8 if dry else 64  # class-balanced: 4 images per class; N-pair: 2 per class
        self.steps = steps or (2 if dry else 12)
        self.workers = 0 if dry else min(8, os.cpu_count() or 1)
        self.n_eval, self.dim = (n_eval or 800, 16) if dry else (n_eval or 30_000, 128)
        # the paper rows' backbones at their own crop, on photo-like JPEGs (500x375 as CUB's; 1/10 in a dry run):
        # class-balanced batches of 4 images per class, the row's batch up to paper_batch, paper_steps an epoch
        self.photo = (50, 38) if dry else (500, 375)
        self.paper_batch = 8 if dry else 128
        self.paper_steps = paper_steps or (2 if dry else 16)
        self.paper_test = (2, 4) if dry else (4, 8)  # test classes x images: the run's evaluation, kept small


class Skip(Exception):
    """A check that cannot run here (an optional package missing); its row says why and does not fail the run."""


def row(section: str, what: str, result: str, time_s: float = float("nan"), peak_gb: float = float("nan"),
        ok: bool = True, status: str | None = None, **extra) -> dict:
    return dict(section=section, what=what, result=result, time_s=time_s, peak_gb=peak_gb, ok=ok,
                status=status or ("ok" if ok else "FAIL"), **extra)


def release(cuda: bool) -> float:
    """Garbage-collect; the GPU memory still allocated afterwards (GB), the host RSS peak on the CPU."""
    import torch

    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return torch.cuda.memory_allocated() / 2**30
    return float("nan")


def peak_gb(cuda: bool) -> float:
    import torch

    if cuda:
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # host RSS (kB on Linux)


def reset_peak(cuda: bool) -> None:
    import torch

    release(cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()


def make_images(root: Path, classes: int, per_class: int, side: int, seed: int = 0) -> Path:
    """<root>/class_XX/k.jpg: class-coloured noise, enough for the folder dataset's class split."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        colour = rng.integers(0, 256, 3)
        d = root / f"class_{c:02d}"
        d.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            img = np.clip(colour + rng.normal(0, 40, size=(side, side, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"{k}.jpg", quality=90)
    return root


def make_hub_cache(torch_home: Path) -> Path:
    """A torchvision hub cache holding GoogLeNet's ImageNet weights file name with generated values (the same keys
    and shapes, auxiliary heads included): ``backbone.pretrained=true`` then runs torchvision's own loading code,
    which sets ``transform_input``, without a network."""
    import torch
    import torchvision

    url = torchvision.models.GoogLeNet_Weights.IMAGENET1K_V1.url
    path = torch_home / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True, transform_input=True)
    torch.save(net.state_dict(), path)
    return path


def train_overrides(data: Path, sz: Sizes, device: str, extra: tuple[str, ...] = (), epochs: int = 2) -> list[str]:
    base = [
        "dataset=folder", f"dataset.root={data}", "backbone=resnet18", "backbone.pretrained=false",
        "transform=rrc_224", f"transform.train.crop={sz.crop}", f"transform.test.crop={sz.crop}",
        f"transform.test.resize={sz.resize}", "loss=triplet", "sampler=class_balanced",
        f"trainer.device={device}", "trainer.amp=true", "trainer.channels_last=true", "trainer.pin_memory=true",
        f"trainer.num_workers={sz.workers}", f"trainer.epochs={epochs}", f"trainer.max_steps_per_epoch={sz.steps}",
        f"trainer.batch_size={sz.batch}", f"trainer.eval_every={epochs}", "trainer.eval_before_training=false",
        "trainer.save_checkpoints=false", "trainer.save_embeddings=false", "trainer.progress=false",
        f"eval.device={device}", "eval.metrics=[recall]",
    ]
    keys = {o.split("=", 1)[0] for o in extra}
    if any(o.startswith("backbone=timm") for o in extra) and "backbone.img_size" not in keys:
        extra = (*extra, f"backbone.img_size={sz.crop}")  # a ViT rebuilt for the crop (tiny in a dry run)
    if "transform" in keys:  # another transform: its own sizes come with it (rrc_224's keys may not exist there)
        keys |= {o.split("=", 1)[0] for o in base if o.startswith("transform.")}
    return [o for o in base if o.split("=", 1)[0] not in keys] + list(extra)


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from dml_runner.config import conf_dir, register_configs

    register_configs()
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def step_split(history_row: dict) -> str:
    """The data / compute split of a step as the run's history records it (columns named for data and compute)."""
    parts = [f"{k} {float(v):.3g}" for k, v in history_row.items() if v not in ("", None)
             and any(word in k for word in ("data", "compute")) and k.endswith("_s")]
    return ", ".join(parts) if parts else "data/compute split not in history.csv"


def check_training(name: str, data: Path, out: Path, sz: Sizes, device: str, torch_home: Path | None) -> dict:
    import torch

    from dml_runner.run import run

    what, extra = TRAIN_RUNS[name]
    cuda = device == "cuda"
    reset_peak(cuda)
    before_home = os.environ.get("TORCH_HOME")
    if torch_home is not None:
        os.environ["TORCH_HOME"] = str(torch_home)
    try:
        t0 = time.perf_counter()
        run(compose(train_overrides(data, sz, device, extra)), out / name)
        wall = time.perf_counter() - t0
    finally:
        if torch_home is not None:
            if before_home is None:
                os.environ.pop("TORCH_HOME", None)
            else:
                os.environ["TORCH_HOME"] = before_home
    peak = peak_gb(cuda)
    held = release(cuda)
    with open(out / name / "history.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    epoch2 = float(rows[-1]["epoch_time_s"])
    rate = sz.steps * sz.batch / epoch2
    loss = float(rows[-1]["train_loss"])
    mode = "bf16 autocast" if cuda and "trainer.amp=false" not in extra else "fp32"
    mode += ", channels_last, pinned" if cuda and "trainer.channels_last=false" not in extra else ""
    if not cuda:
        mode = "CPU: fp32 (autocast/channels_last/pin are CUDA-only)"
    results = json.loads((out / name / "results.json").read_text())
    recall = (results.get("metrics") or {}).get("recall@1", float("nan"))
    return row("train", f"{what}, {sz.crop}px b{sz.batch} x{sz.steps} steps ({mode})",
               f"{rate:.0f} img/s (epoch 2), loss {loss:.3f}, R@1 {recall:.3f}; {step_split(rows[-1])}; "
               f"held after gc {held:.2f} GB" if cuda else
               f"{rate:.0f} img/s (epoch 2), loss {loss:.3f}, R@1 {recall:.3f}; {step_split(rows[-1])}",
               time_s=wall, peak_gb=peak, ok=bool(np.isfinite(loss)), torch=torch.__version__, held_gb=held)


# ------------------------------------------------------------------ the paper rows: speed and time per target

def _override_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    return str(value)


def input_size(cfg) -> int:
    """The side of a composed row's training crop: the transform's ``crop``, or the timm model's input size."""
    crop = cfg.transform.train.get("crop")
    if crop is not None:
        return int(crop)
    from dml_runner.backbones.timm_nets import data_config

    return int(data_config(str(cfg.backbone.name), cfg.backbone.get("img_size"))["input_size"][-1])


def train_images(cfg) -> int:
    """The official training image count of a row's dataset (dml_runner/datasets/registry.py), less its validation
    fraction."""
    from dml_runner.datasets.registry import SPECS

    from reproduce import dataset_name

    name = dataset_name(cfg)
    counts = next(v.official_counts for v in SPECS[name].variants if v.official_counts)
    return int(counts["train_images"] * (1.0 - float(cfg.dataset.get("val_fraction") or 0.0)))


def plan_row(name: str, cfg) -> dict:
    """What the estimate needs of one composed row, and the overrides that train its backbone and transform (the
    row's own settings of both) on the generated folder dataset."""
    from omegaconf import OmegaConf

    choices = cfg.hydra.runtime.choices
    backbone, transform = choices["backbone"], choices["transform"]
    label = str(cfg.backbone.get("arch") or cfg.backbone.get("name") or backbone)
    crop = input_size(cfg)
    over = [f"backbone={backbone}", "backbone.pretrained=false",
            f"backbone.embedding_dim={int(cfg.backbone.embedding_dim)}", f"transform={transform}"]
    if cfg.backbone.get("name") is not None:
        over.append(f"backbone.name={cfg.backbone.name}")
    for side in ("train", "test"):
        node = OmegaConf.to_container(cfg.transform[side], resolve=False)
        for key, value in node.items():
            if key != "_target_" and not (isinstance(value, str) and value.startswith("${")):
                over.append(f"transform.{side}.{key}={_override_value(value)}")
    batch = int(cfg.trainer.batch_size)
    images = train_images(cfg)
    cap = cfg.trainer.get("max_steps_per_epoch")
    steps = int(cap) if cap else max(1, images // batch)  # full batches (the last partial one dropped)
    return dict(row=name, combo=f"{label} {transform} {crop}px", backbone=label, transform=transform, crop=crop,
                batch=batch, epochs=int(cfg.trainer.epochs), steps_per_epoch=steps, train_images=images,
                images=int(cfg.trainer.epochs) * steps * batch, overrides=over,
                timm=str(cfg.backbone.get("_target_", "")).endswith("timm_backbone"))


def reproduce_plan() -> dict[str, list[dict]]:
    """Every ``make reproduce-*`` target's rows, composed as scripts/reproduce.py composes them."""
    import reproduce

    plan = {}
    for target in reproduce.TARGETS:
        cfgs, broken = reproduce.resolve_rows(reproduce.target_rows(target), [])
        if broken:
            row_name, why = next(iter(broken.items()))
            raise RuntimeError(f"{target}: row {row_name} does not compose: {why}")
        plan[target] = [plan_row(n, c) for n, c in cfgs.items()]
    return plan


def combos(plan: dict[str, list[dict]]) -> dict[str, dict]:
    """The distinct backbone / transform / crop combinations of the plan, each with its first row and the batch
    most of its rows train with."""
    out: dict[str, dict] = {}
    for rows in plan.values():
        for r in rows:
            c = out.setdefault(r["combo"], dict(r, batches=[]))
            c["batches"].append(r["batch"])
    for c in out.values():
        c["batch"] = max(set(c["batches"]), key=c["batches"].count)
    return out


def _photo_class(args) -> None:
    from bench_train import photo_like  # the benchmark's photo-like JPEGs (smooth regions, texture, noise)

    folder, images, (w, h), seed = args
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(images):
        photo_like(w, h, rng, white_background=k % 3 == 2).save(folder / f"{k}.jpg", format="JPEG", quality=90)


def make_photo_tree(root: Path, sz: Sizes) -> Path:
    """<root>/train/class_XX/k.jpg and <root>/test/...: photo-like JPEGs (every third on a white page, for
    lifted_227's crop to content), enough training images for paper_steps class-balanced batches of paper_batch."""
    train_classes = sz.paper_batch // 4
    per_class = sz.paper_steps * sz.paper_batch // train_classes
    jobs = [(root / "train" / f"class_{c:03d}", per_class, sz.photo, c) for c in range(train_classes)]
    jobs += [(root / "test" / f"class_{c:03d}", sz.paper_test[1], sz.photo, c)
             for c in range(train_classes, train_classes + sz.paper_test[0])]
    if sz.workers:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(sz.workers) as pool:
            list(pool.map(_photo_class, jobs))
    else:
        for job in jobs:
            _photo_class(job)
    return root


def paper_overrides(combo: dict, data: Path, cache_dir: Path, cache: str, sz: Sizes, device: str) -> list[str]:
    """train_overrides with the combo's backbone and transform, at the row's crop (tiny in a dry run), its batch up
    to paper_batch (4 images per class) and ``dataset.cache=<cache>``."""
    over = list(combo["overrides"])
    if sz.dry:  # the sizes shrink, nothing else: crop and resize keys, or the ViT's input size
        over = [o for o in over if o.split("=", 1)[0].rsplit(".", 1)[-1] not in ("crop", "resize")]
        keys = {o.split("=", 1)[0] for o in combo["overrides"]}
        over += [f"{k}={sz.crop if k.endswith('crop') else sz.resize}" for k in sorted(keys)
                 if k.rsplit(".", 1)[-1] in ("crop", "resize")]
    if combo["timm"]:
        over.append(f"backbone.img_size={sz.crop if sz.dry else combo['crop']}")
    paper_sz = copy.copy(sz)
    paper_sz.batch, paper_sz.steps = min(combo["batch"], sz.paper_batch) // 4 * 4, sz.paper_steps
    over += [f"dataset.cache={cache}", f"paths.cache_dir={cache_dir}"]
    return train_overrides(data, paper_sz, device, tuple(over))


def check_paper(combo: dict, cache: str, data: Path, out: Path, sz: Sizes, device: str) -> dict:
    """Two epochs of the combo's backbone and transform; images/s, data and step time of the second."""
    from dml_runner.run import run

    cuda = device == "cuda"
    reset_peak(cuda)
    name = f"paper_{combo['backbone']}_{combo['transform']}_{combo['crop']}_{cache}".replace("/", "_")
    over = paper_overrides(combo, data, out / "cache", cache, sz, device)
    batch = int(next(o for o in over if o.startswith("trainer.batch_size=")).split("=", 1)[1])
    t0 = time.perf_counter()
    run(compose(over), out / name)
    wall = time.perf_counter() - t0
    peak = peak_gb(cuda)
    release(cuda)
    with open(out / name / "history.csv", newline="") as fh:
        last = list(csv.DictReader(fh))[-1]
    epoch = float(last["epoch_time_s"])
    data_s, step_s = float(last["data_time_s"]), float(last["step_time_s"])
    rate = sz.paper_steps * batch / epoch
    results = json.loads((out / name / "results.json").read_text())
    split = (((results.get("dataset") or {}).get("info") or {}).get("decoded_cache") or {}).get("train") or {}
    if split.get("cached"):
        cached = "train split cached"
    elif cache == "none":
        cached = "train split not cached (cache off)"
    else:  # the reason without the transform's repr: "first step is random; no exact prefix to cache"
        reason = str(split.get("reason", "?"))
        head, tail = reason.split(" (", 1)[0], reason.rsplit(";", 1)[-1].strip(" )")
        cached = f"train split not cached ({head if head == tail or ';' not in reason else f'{head}; {tail}'})"
    size = f"{sz.crop}px (dry run; the rows: {combo['crop']}px)" if sz.dry else f"{combo['crop']}px"
    share = 100 * data_s / max(data_s + step_s, 1e-9)
    return row("paper", f"{combo['backbone']} {combo['transform']} {size} b{batch} x{sz.paper_steps} steps, "
               f"dataset.cache={cache}",
               f"{rate:.0f} img/s (epoch 2); data {data_s:.3g} s, step {step_s:.3g} s ({share:.0f}% waiting for "
               f"data); {cached}", time_s=wall, peak_gb=peak, ok=bool(np.isfinite(float(last["train_loss"]))),
               combo=combo["combo"], cache=cache, images_per_s=rate, data_time_s=data_s, step_time_s=step_s,
               batch=batch)


def estimate(plan: dict[str, list[dict]], rows: list[dict], seeds: int) -> list[dict]:
    """Training time per target: each row's epochs x steps per epoch x batch images at the images/s measured for
    its backbone / transform / crop with the cache (dataset.cache=auto, the default), times ``seeds``."""
    rates = {r["combo"]: r["images_per_s"] for r in rows
             if r["section"] == "paper" and r.get("cache") == "auto" and r["ok"] and r.get("images_per_s")}
    out = []
    for target, plan_rows in plan.items():
        missing = sorted({r["combo"] for r in plan_rows if r["combo"] not in rates})
        seconds = None if missing else seeds * sum(r["images"] / rates[r["combo"]] for r in plan_rows)
        out.append(dict(target=f"reproduce-{target}", rows=len(plan_rows), seeds=seeds,
                        images_per_seed=sum(r["images"] for r in plan_rows), seconds=seconds,
                        combos=sorted({r["combo"] for r in plan_rows}), missing=missing))
    return out


ESTIMATE_NOTE = ("training only, from the images/s measured above with the cache (dataset.cache=auto); per row: "
                 "epochs x steps per epoch x batch images (steps per epoch = the dataset's official training "
                 "images // batch, or trainer.max_steps_per_epoch when the row sets it), x SEEDS; not counted: "
                 "evaluation, the cache's one-time build, model loading, HDML's generator and Divide & Conquer's "
                 "reclustering passes (each row's rate is its backbone's at batch <= 128 under a triplet loss)")


def _hours(seconds) -> str:
    return "not measured" if seconds is None else f"{seconds / 3600:.2f} h"


def estimate_lines(est: list[dict], where: str) -> list[str]:
    if not est:
        return []
    lines = [f"Estimated time per make reproduce-* target on {where} (SEEDS={est[0]['seeds']}): {ESTIMATE_NOTE}",
             "| target | rows | images per seed | estimate | backbone / transform / crop |",
             "| --- | --- | --- | --- | --- |"]
    for e in est:
        combos_ = "; ".join(e["combos"]) + (f" (not measured: {'; '.join(e['missing'])})" if e["missing"] else "")
        lines.append(f"| {e['target']} | {e['rows']} | {e['images_per_seed']:,} | {_hours(e['seconds'])} | "
                     f"{combos_} |")
    return lines


def _require_faiss() -> None:
    import importlib.util

    if importlib.util.find_spec("faiss") is None:
        raise Skip("faiss is not installed (pip install faiss-cpu / faiss-gpu, or FAISS=1 make wheelhouse)")


def backend_stats(backend: str, x: np.ndarray, y: np.ndarray, device: str, max_k: int):
    """Per-query retrieval statistics (leave-one-out) of one backend on one device."""
    import torch

    from dml_runner.evaluation.retrieval import exact_retrieval, faiss_retrieval
    from dml_runner.evaluation.screened import screened_retrieval
    from dml_runner.evaluation.symmetric import symmetric_retrieval

    dev = torch.device(device)
    args = (x, y, x, y, np.arange(len(y)))
    if backend == "certified":  # the CPU reference: a float32 screen whose undecided pairs are redone in float64
        return screened_retrieval(*args, device=torch.device("cpu"), dtype=torch.float32)
    if backend == "torch_fp32":
        return exact_retrieval(*args, device=dev)
    if backend == "torch_screened":
        from dml_runner.evaluation.cpu import screen_dtype

        return screened_retrieval(*args, device=dev, dtype=screen_dtype(dev))
    if backend == "torch_symmetric":
        return symmetric_retrieval(x, y, device=dev)
    _require_faiss()
    return faiss_retrieval(*args, max_k=max_k, use_gpu=dev.type == "cuda", device=dev)


def differing_queries(ref, got, cap: int | None = None) -> tuple[int, float]:
    """Queries whose first-positive rank (both clipped at ``cap``: faiss reports ranks past its top k as k) or
    MAP@R differs; the largest Recall@1/10/100 difference."""
    ref_rank, got_rank = (ref.first_rank, got.first_rank) if cap is None else \
        (np.minimum(ref.first_rank, cap), np.minimum(got.first_rank, cap))
    differ = (ref_rank != got_rank) | (np.abs(ref.map_at_r - got.map_at_r) > 1e-12)
    recall = max(abs(float(np.mean(ref.first_rank < k)) - float(np.mean(got.first_rank < k))) for k in (1, 10, 100))
    return int(differ.sum()), recall


def check_retrieval(backend: str, x: np.ndarray, y: np.ndarray, device: str, reference, has_faiss_gpu: bool) -> dict:
    import torch

    cuda = device == "cuda"
    reset_peak(cuda)
    t0 = time.perf_counter()
    stats = backend_stats(backend, x, y, device, max_k=MAX_K)
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    differ, d_recall = differing_queries(reference["stats"], stats, cap=MAX_K if backend == "faiss" else None)
    n = len(stats.first_rank)
    allowed = 0 if backend in EXACT_BACKENDS else max(2, n // 1000)
    where = device
    if backend == "faiss" and cuda:
        where = "faiss GPU index" if has_faiss_gpu else "faiss CPU index (faiss has no GPU here)"
    return row("eval", f"{backend} on {where} vs certified cpu, {len(y)} x {x.shape[1]}",
               f"{differ} of {n} queries differ (allowed {allowed}), max |dRecall| {d_recall:.1e}; "
               f"certified cpu {reference['time_s']:.2f} s",
               time_s=wall, peak_gb=peak_gb(cuda), ok=differ <= allowed, differing_queries=differ)


def check_kmeans(backend: str, precision: str, x: np.ndarray, y: np.ndarray, classes: int, device: str) -> dict:
    import torch

    from dml_runner.evaluation import nmi_from_assignments
    from dml_runner.evaluation.kmeans import kmeans

    if backend == "faiss":
        _require_faiss()
    cuda = device == "cuda"
    nmi, times = {}, {}
    for side, dev in (("ref", "cpu"), ("dev", device)):
        reset_peak(dev == "cuda")
        t0 = time.perf_counter()
        _, a = kmeans(x, classes, niter=20, seed=0, backend=backend, device=dev, precision=precision)
        if dev == "cuda":
            torch.cuda.synchronize()
        times[side] = time.perf_counter() - t0
        nmi[side] = nmi_from_assignments(a, y)
    return row("kmeans", f"{backend} {precision if backend == 'torch' else ''} k={classes} on {device} vs cpu",
               f"NMI {nmi['dev']:.4f} vs {nmi['ref']:.4f}; cpu {times['ref']:.2f} s", time_s=times["dev"],
               peak_gb=peak_gb(cuda), ok=abs(nmi["dev"] - nmi["ref"]) <= 0.01)


def nccl_worker() -> None:
    """Under torchrun: one all-reduce over the process group (NCCL on CUDA, gloo on the CPU)."""
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available() and os.environ.get("GPU_CHECK_DRY") != "1"
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    t = torch.full((1024,), float(rank + 1), device="cuda" if cuda else "cpu")
    dist.all_reduce(t)
    want = world * (world + 1) / 2
    ok = bool((t == want).all())
    dist.destroy_process_group()
    if rank == 0:
        print(json.dumps({"backend": "nccl" if cuda else "gloo", "world": world, "ok": ok}))


def torchrun(args: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
    # this interpreter's own torch.distributed.run: the same environment (PYTHONPATH of an offline install included)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", *args], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=ROOT)


def _child_env(dry: bool) -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, GPU_CHECK_DRY="1" if dry else "0", OMP_NUM_THREADS="1", PYTHONPATH=path)


def check_allreduce(nproc: int, dry: bool) -> dict:
    t0 = time.perf_counter()
    p = torchrun([f"--nproc_per_node={nproc}", str(Path(__file__).resolve()), "--nccl-worker"], _child_env(dry), 300)
    wall = time.perf_counter() - t0
    try:
        info = json.loads(p.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        info = {"backend": "?", "world": nproc, "ok": False}
    ok = info["ok"] and p.returncode == 0
    return row("torchrun", f"{info['backend']} all_reduce, {nproc} process(es)",
               "sum correct" if ok else f"FAILED: {p.stderr.strip()[-300:]}", time_s=wall, ok=ok)


def check_torchrun_training(nproc: int, data: Path, out: Path, sz: Sizes, device: str, dry: bool) -> dict:
    run_dir = out / "torchrun"
    over = [o for o in train_overrides(data, sz, device, epochs=1) if not o.startswith("trainer.num_w")]
    t0 = time.perf_counter()
    p = torchrun([f"--nproc_per_node={nproc}", "-m", "dml_runner", *over, "trainer.num_workers=0",
                  f"hydra.run.dir={run_dir}"], _child_env(dry), 600)
    wall = time.perf_counter() - t0
    done = (run_dir / "results.json").is_file() and json.loads((run_dir / "results.json").read_text()).get(
        "status") == "completed"
    group = f"{'NCCL' if device == 'cuda' else 'gloo'} process group" if nproc > 1 else "no process group (1 process)"
    ok = done and p.returncode == 0
    return row("torchrun", f"dml-run resnet18, {nproc} process(es), {group}",
               "completed" if ok else f"FAILED: {p.stderr.strip()[-300:]}", time_s=wall, ok=ok)


def print_table(rows: list[dict], header: str) -> None:
    print(header)
    widths = (9, 74, 70, 8, 8, 7)
    cols = ("section", "check", "result", "time s", "peak GB", "status")
    print(" | ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        vals = (r["section"], r["what"], r["result"], _num(r["time_s"], 1), _num(r["peak_gb"], 2), r["status"])
        print(" | ".join(str(v)[:w].ljust(w) for v, w in zip(vals, widths)))


def _num(value, digits: int) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def markdown(rows: list[dict], header: str, total: float, est_lines: list[str] | None = None) -> str:
    lines = [f"# dml-runner GPU check", "", header, "", f"total {total:.0f} s", "",
             "| section | check | result | time s | peak GB | status |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        cells = (r["section"], r["what"], r["result"], _num(r["time_s"], 1), _num(r["peak_gb"], 2), r["status"])
        lines.append("| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in cells) + " |")
    if est_lines:
        lines += ["", "## Time per make reproduce-* target", "", est_lines[0], "", *est_lines[1:]]
    return "\n".join(lines) + "\n"


def write_outputs(rows: list[dict], header: str, total: float, out_dir: Path | None, json_path: str | None,
                  est: list[dict] | None = None, est_lines: list[str] | None = None) -> None:
    blob = json.dumps(dict(header=header, total_s=total, rows=rows, estimate=est or [], estimate_note=ESTIMATE_NOTE),
                      indent=2, default=str)
    if json_path:
        Path(json_path).write_text(blob)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / OUT_JSON).write_text(blob)
        (out_dir / OUT_MD).write_text(markdown(rows, header, total, est_lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: the same code without a GPU")
    p.add_argument("--train", nargs="*", default=list(TRAIN_RUNS), choices=list(TRAIN_RUNS),
                   help="training runs (default: all)")
    p.add_argument("--archs", nargs="+", choices=ARCHS, help="(older spelling) train only these torchvision backbones")
    p.add_argument("--steps", type=int, help="training steps per epoch (default 12; dry run 2)")
    p.add_argument("--n-eval", type=int, help="embeddings for the evaluation checks (default 30,000; dry run 800)")
    p.add_argument("--nproc", type=int, help="torchrun processes (default: 2 with 2+ GPUs, else 1)")
    p.add_argument("--paper-steps", type=int, help="training steps per epoch of the paper rows' backbones "
                   "(default 16; dry run 2)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per row in the time estimate (make reproduce-*'s "
                   "SEEDS; default 3)")
    p.add_argument("--skip", nargs="*", default=[], choices=["train", "eval", "kmeans", "paper", "torchrun"])
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="start no check after this many seconds (its row says skipped); default 420")
    p.add_argument("--out", help="folder for gpu_check.json and gpu_check.md (written after every check)")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--nccl-worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.nccl_worker:
        nccl_worker()
        return 0
    import torch

    import dml_runner
    from dml_runner.evaluation import cpu_info

    if not a.dry_run and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA GPU; run with --dry-run to exercise the same code on the CPU",
              file=sys.stderr)
        return 2
    device = "cpu" if a.dry_run else "cuda"
    sz = Sizes(a.dry_run, a.steps, a.n_eval, a.paper_steps)
    train_runs = list(a.archs) if a.archs else list(a.train)
    try:
        import faiss

        faiss_state = "faiss-gpu" if hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0 else "faiss-cpu"
    except ImportError:
        faiss_state = "no faiss"
    has_faiss_gpu = faiss_state == "faiss-gpu" and not a.dry_run
    gpus = torch.cuda.device_count() if not a.dry_run else 0
    nproc = a.nproc or (2 if gpus >= 2 else 1)
    gpu_name = torch.cuda.get_device_name(0) if gpus else "none (dry run on the CPU)"
    import torchvision

    header = (f"dml-runner GPU check: GPU {gpu_name}; torch {torch.__version__} (CUDA {torch.version.cuda}), "
              f"torchvision {torchvision.__version__}; python {sys.version.split()[0]}; CPU {cpu_info().model}, "
              f"{os.cpu_count()} cores; {faiss_state}; dml_runner from {Path(dml_runner.__file__).parent}; "
              f"backbones random-init or generated weights (no network)")
    print(header, flush=True)
    out_dir = Path(a.out) if a.out else None
    rows: list[dict] = []
    started = time.perf_counter()

    def attempt(section: str, what: str, check: Callable[[], dict]) -> None:
        elapsed = time.perf_counter() - started
        if elapsed > a.budget_s:
            rows.append(row(section, what, f"skipped: the time budget ({a.budget_s:.0f} s) was spent",
                            status="skipped"))
        else:
            try:
                rows.append(check())
            except Skip as why:
                rows.append(row(section, what, f"skipped: {why}", status="skipped"))
            except Exception as err:  # noqa: BLE001 - one failing check must not hide the others
                traceback.print_exc()
                rows.append(row(section, what, f"FAILED: {type(err).__name__}: {str(err)[:200]}", ok=False))
        r = rows[-1]
        print(f"  {section} {what}: {r['status']} ({time.perf_counter() - started:.0f} s)", flush=True)
        write_outputs(rows, header, time.perf_counter() - started, out_dir, a.json)

    sys.path.insert(0, str(ROOT / "scripts"))  # bench_eval's embeddings, bench_train's photos, reproduce's rows
    plan: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        if "eval" not in a.skip or "kmeans" not in a.skip:
            from bench_eval import make_data

            classes = max(2, sz.n_eval // 5)
            x, y = make_data(sz.n_eval, sz.dim, classes)
        if "eval" not in a.skip:
            reference: dict = {}

            def certified() -> dict:
                t0 = time.perf_counter()
                reference["stats"] = backend_stats("certified", x, y, "cpu", max_k=MAX_K)
                reference["time_s"] = time.perf_counter() - t0
                return row("eval", f"certified cpu reference (float32 screen + float64 recheck), {sz.n_eval} x "
                           f"{sz.dim}", f"R@1 {float(np.mean(reference['stats'].first_rank < 1)):.4f}",
                           time_s=reference["time_s"], peak_gb=peak_gb(False))

            attempt("eval", "certified cpu reference", certified)
            for backend in RETRIEVAL_BACKENDS:
                if "stats" in reference:
                    attempt("eval", backend, lambda b=backend: check_retrieval(b, x, y, device, reference,
                                                                               has_faiss_gpu))
        if "kmeans" not in a.skip:
            for backend, prec in (("torch", "bf16"), ("torch", "fp32"), ("faiss", "fp32")):
                attempt("kmeans", f"{backend} {prec}", lambda b=backend, pr=prec: check_kmeans(b, pr, x, y, classes,
                                                                                              device))
        if "paper" not in a.skip:
            def planned() -> dict:
                t0 = time.perf_counter()
                plan.update(reproduce_plan())
                found = combos(plan)
                return row("paper", "rows of make reproduce-* (composed as scripts/reproduce.py does)",
                           f"{sum(map(len, plan.values()))} rows in {len(plan)} targets; backbone / transform / "
                           f"crop: {'; '.join(found)}", time_s=time.perf_counter() - t0)

            attempt("paper", "rows of make reproduce-*", planned)
            if plan:
                photos = make_photo_tree(tmp_path / "photos", sz)
                for combo in combos(plan).values():
                    for cache in ("auto", "none"):
                        attempt("paper", f"{combo['combo']} dataset.cache={cache}",
                                lambda c=combo, m=cache: check_paper(c, m, photos, tmp_path / "paper", sz, device))
        if "train" not in a.skip and train_runs:
            data = make_images(tmp_path / "images", sz.classes, sz.per_class, sz.image)
            torch_home = None
            if "googlenet" in train_runs:
                torch_home = tmp_path / "torch_home"
                make_hub_cache(torch_home)
            for name in train_runs:
                attempt("train", name, lambda n=name: check_training(n, data, tmp_path / "runs", sz, device,
                                                                     torch_home if n == "googlenet" else None))
        if "torchrun" not in a.skip:
            if "train" in a.skip or not train_runs:
                data = make_images(tmp_path / "images", sz.classes, sz.per_class, sz.image)
            attempt("torchrun", "all_reduce", lambda: check_allreduce(nproc, a.dry_run))
            attempt("torchrun", "dml-run", lambda: check_torchrun_training(nproc, data, tmp_path / "runs", sz, device,
                                                                           a.dry_run))
    total = time.perf_counter() - started
    print_table(rows, f"\n{header}\ntotal {total:.0f} s")
    est = estimate(plan, rows, a.seeds)
    lines = estimate_lines(est, gpu_name if gpus else "the CPU (dry run: the numbers mean nothing)")
    if lines:
        print("\n" + "\n".join(lines))
    write_outputs(rows, header, total, out_dir, a.json, est, lines)
    return 0 if rows and all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
