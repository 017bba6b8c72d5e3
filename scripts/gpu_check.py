#!/usr/bin/env python
"""GPU check (``make gpu-check``): every CUDA path of dml-runner on one GPU, in a few minutes, as one table.

    python scripts/gpu_check.py                 # on a machine with a CUDA GPU (about 3-5 minutes on one H200)
    python scripts/gpu_check.py --dry-run       # the same code on the CPU with tiny sizes (tests/test_gpu_check.py)
    python scripts/gpu_check.py --json out.json # also write the rows

Checks, each one row of the table:
1. train: a few training steps of every backbone (googlenet, resnet18, resnet50, resnet101) through the project's
   own run (``dml_runner.run.run`` on a composed config: the ``folder`` dataset on generated JPEGs, the ``rrc_224``
   transform, the class-balanced sampler, triplet loss, the Trainer with bf16 autocast, channels_last and pinned-
   memory loading); images/s of the second epoch (loading included), peak GPU memory. Weights: random init
   (``backbone.pretrained=false``: the GPU machine has no network), so the loss values mean nothing.
2. eval: every retrieval backend (torch_fp32, torch_screened, torch_symmetric, faiss) on the GPU against the CPU
   result on the same embeddings (largest difference of Recall@K / MAP@R / R-Precision, NMI difference, time of
   each), and k-means in bf16 and float32 on the GPU against the CPU; faiss's GPU index and GPU k-means when
   faiss-gpu is installed.
3. torchrun: NCCL all-reduce in ``--nproc`` processes (2 when the machine has 2+ GPUs, else 1) and a ``dml-run``
   under torchrun with the same number of processes (a single process trains without a process group).

A row fails when a run raises, or when the GPU result differs from the CPU one by more than 1e-4 (retrieval) or
0.01 (NMI). Exit code 1 when any row fails. ``--dry-run`` runs on the CPU ("cuda" side = the CPU again), gloo
instead of NCCL.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("googlenet", "resnet18", "resnet50", "resnet101")
RETRIEVAL_KEYS = ("recall@1", "recall@10", "recall@100", "map@r", "r_precision")


class Sizes:
    """GPU sizes, or tiny ones for the CPU dry run."""

    def __init__(self, dry: bool, steps: int | None, n_eval: int | None):
        self.image = 40 if dry else 288  # generated JPEG side
        self.crop = 32 if dry else 224
        self.resize = 36 if dry else 256
        # the folder split trains on half of the classes: enough images there for `steps` full batches per epoch
        self.classes, self.per_class = (8, 6) if dry else (64, 32)
        self.batch = 8 if dry else 64  # class-balanced: 4 images per class
        self.steps = steps or (2 if dry else 12)
        self.workers = 0 if dry else min(8, os.cpu_count() or 1)
        self.n_eval, self.dim = (n_eval or 800, 16) if dry else (n_eval or 30_000, 128)


def peak_gb(cuda: bool) -> float:
    import torch

    if cuda:
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # host RSS (kB on Linux)


def reset_peak(cuda: bool) -> None:
    import torch

    if cuda:
        torch.cuda.synchronize()
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


def train_overrides(arch: str, data: Path, sz: Sizes, device: str, epochs: int = 2) -> list[str]:
    return [
        "dataset=folder", f"dataset.root={data}", f"backbone={arch}", "backbone.pretrained=false",
        "transform=rrc_224", f"transform.train.crop={sz.crop}", f"transform.test.crop={sz.crop}",
        f"transform.test.resize={sz.resize}", "loss=triplet", "sampler=class_balanced",
        f"trainer.device={device}", "trainer.amp=true", "trainer.channels_last=true", "trainer.pin_memory=true",
        f"trainer.num_workers={sz.workers}", f"trainer.epochs={epochs}", f"trainer.max_steps_per_epoch={sz.steps}",
        f"trainer.batch_size={sz.batch}", f"trainer.eval_every={epochs}", "trainer.eval_before_training=false",
        "trainer.save_checkpoints=false", "trainer.save_embeddings=false", "trainer.progress=false",
        f"eval.device={device}", "eval.metrics=[recall]",
    ]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from dml_runner.config import conf_dir, register_configs

    register_configs()
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def check_training(arch: str, data: Path, out: Path, sz: Sizes, device: str) -> dict:
    import torch

    from dml_runner.run import run

    cuda = device == "cuda"
    reset_peak(cuda)
    t0 = time.perf_counter()
    run(compose(train_overrides(arch, data, sz, device)), out / arch)
    wall = time.perf_counter() - t0
    with open(out / arch / "history.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    epoch2 = float(rows[-1]["epoch_time_s"])
    rate = sz.steps * sz.batch / epoch2
    amp = "bf16 autocast, channels_last, pinned" if cuda else "CPU: fp32 (autocast/channels_last/pin are CUDA-only)"
    return dict(section="train", what=f"{arch} {sz.crop}px b{sz.batch} x{sz.steps} steps ({amp})",
                result=f"{rate:.0f} img/s (epoch 2), loss {float(rows[-1]['train_loss']):.3f}", time_s=wall,
                peak_gb=peak_gb(cuda), ok=bool(np.isfinite(float(rows[-1]["train_loss"]))), torch=torch.__version__)


def _diff(a: dict, b: dict) -> tuple[float, float]:
    ret = max(abs(a[k] - b[k]) for k in RETRIEVAL_KEYS if k in a)
    return ret, abs(a.get("nmi", 0.0) - b.get("nmi", 0.0))


def check_evaluation(sz: Sizes, device: str, has_faiss_gpu: bool) -> list[dict]:
    import torch

    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_eval import make_data

    from dml_runner.evaluation import evaluate, nmi_from_assignments
    from dml_runner.evaluation.kmeans import kmeans

    cuda = device == "cuda"
    classes = max(2, sz.n_eval // 5)
    x, y = make_data(sz.n_eval, sz.dim, classes)
    rows = []
    for backend in ("torch_fp32", "torch_screened", "torch_symmetric", "faiss"):
        res, times, peak = {}, {}, 0.0
        for side, dev in (("ref", "cpu"), ("dev", device)):  # the CPU reference, then the device under test
            reset_peak(dev == "cuda")
            t0 = time.perf_counter()
            res[side] = evaluate(x, y, recall_at=(1, 10, 100), metrics=("recall", "map_at_r", "r_precision", "nmi"),
                                 backend=backend, device=dev, seed=0)
            if dev == "cuda":
                torch.cuda.synchronize()
                peak = peak_gb(True)
            times[side] = time.perf_counter() - t0
        d_ret, d_nmi = _diff(res["ref"], res["dev"])
        where = ("faiss GPU index" if has_faiss_gpu else "faiss CPU index (faiss-gpu not installed)") \
            if backend == "faiss" and cuda else device
        rows.append(dict(section="eval", what=f"{backend} on {where} vs cpu, {sz.n_eval} x {sz.dim}",
                         result=f"max |dRet| {d_ret:.1e}, |dNMI| {d_nmi:.1e}, R@1 {res['dev']['recall@1']:.4f}; "
                                f"cpu {times['ref']:.2f} s",
                         time_s=times["dev"], peak_gb=peak if cuda else peak_gb(False),
                         ok=d_ret <= 1e-4 and d_nmi <= 0.01))
    km_backends = [("torch", "bf16"), ("torch", "fp32")] + ([("faiss", "fp32")] if has_faiss_gpu or not cuda else [])
    for backend, prec in km_backends:
        nmi, times = {}, {}
        for side, dev in (("ref", "cpu"), ("dev", device)):
            reset_peak(dev == "cuda")
            t0 = time.perf_counter()
            _, a = kmeans(x, classes, niter=20, seed=0, backend=backend, device=dev, precision=prec)
            if dev == "cuda":
                torch.cuda.synchronize()
            times[side] = time.perf_counter() - t0
            nmi[side] = nmi_from_assignments(a, y)
        rows.append(dict(section="kmeans", what=f"{backend} {prec if backend == 'torch' else ''} k={classes} on "
                                                 f"{device} vs cpu",
                         result=f"NMI {nmi['dev']:.4f} vs {nmi['ref']:.4f}; cpu {times['ref']:.2f} s",
                         time_s=times["dev"], peak_gb=peak_gb(cuda), ok=abs(nmi["dev"] - nmi["ref"]) <= 0.01))
    return rows


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
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    return subprocess.run([exe, "--standalone", *args], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=ROOT)


def check_torchrun(nproc: int, data: Path, out: Path, sz: Sizes, device: str, dry: bool) -> list[dict]:
    env = dict(os.environ, GPU_CHECK_DRY="1" if dry else "0", OMP_NUM_THREADS="1")
    rows = []
    t0 = time.perf_counter()
    p = torchrun([f"--nproc_per_node={nproc}", str(Path(__file__).resolve()), "--nccl-worker"], env, 300)
    wall = time.perf_counter() - t0
    try:
        info = json.loads(p.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        info = {"backend": "?", "world": nproc, "ok": False}
    rows.append(dict(section="torchrun", what=f"{info['backend']} all_reduce, {nproc} process(es)",
                     result="sum correct" if info["ok"] else f"FAILED: {p.stderr.strip()[-300:]}", time_s=wall,
                     peak_gb=float("nan"), ok=info["ok"] and p.returncode == 0))
    run_dir = out / "torchrun"
    over = [o for o in train_overrides("resnet18", data, sz, device, epochs=1) if not o.startswith("trainer.num_w")]
    t0 = time.perf_counter()
    p = torchrun([f"--nproc_per_node={nproc}", "-m", "dml_runner", *over, "trainer.num_workers=0",
                  f"hydra.run.dir={run_dir}"], env, 600)
    wall = time.perf_counter() - t0
    done = (run_dir / "results.json").is_file() and json.loads((run_dir / "results.json").read_text()).get(
        "status") == "completed"
    group = f"{'NCCL' if device == 'cuda' else 'gloo'} process group" if nproc > 1 else "no process group (1 process)"
    rows.append(dict(section="torchrun", what=f"dml-run resnet18, {nproc} process(es), {group}",
                     result="completed" if done and p.returncode == 0 else f"FAILED: {p.stderr.strip()[-300:]}",
                     time_s=wall, peak_gb=float("nan"), ok=done and p.returncode == 0))
    return rows


def print_table(rows: list[dict], header: str) -> None:
    print(header)
    widths = (9, 74, 60, 8, 8, 4)
    cols = ("section", "check", "result", "time s", "peak GB", "ok")
    print(" | ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        pk = "-" if not np.isfinite(r.get("peak_gb", float("nan"))) else f"{r['peak_gb']:.2f}"
        vals = (r["section"], r["what"], r["result"], f"{r['time_s']:.1f}", pk, "ok" if r["ok"] else "FAIL")
        print(" | ".join(str(v)[:w].ljust(w) for v, w in zip(vals, widths)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: the same code without a GPU")
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    p.add_argument("--steps", type=int, help="training steps per epoch (default 12; dry run 2)")
    p.add_argument("--n-eval", type=int, help="embeddings for the evaluation checks (default 30,000; dry run 800)")
    p.add_argument("--nproc", type=int, help="torchrun processes (default: 2 with 2+ GPUs, else 1)")
    p.add_argument("--skip", nargs="*", default=[], choices=["train", "eval", "torchrun"])
    p.add_argument("--json", help="write the rows to this file")
    p.add_argument("--nccl-worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.nccl_worker:
        nccl_worker()
        return 0
    import torch

    from dml_runner.evaluation import cpu_info

    if not a.dry_run and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA GPU; run with --dry-run to exercise the same code on the CPU",
              file=sys.stderr)
        return 2
    device = "cpu" if a.dry_run else "cuda"
    sz = Sizes(a.dry_run, a.steps, a.n_eval)
    try:
        import faiss

        has_faiss_gpu = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0 and not a.dry_run
    except ImportError:
        has_faiss_gpu = False
    gpus = torch.cuda.device_count() if not a.dry_run else 0
    nproc = a.nproc or (2 if gpus >= 2 else 1)
    gpu_name = torch.cuda.get_device_name(0) if gpus else "none (dry run on the CPU)"
    header = (f"dml-runner GPU check: GPU {gpu_name}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
              f"CPU {cpu_info().model}, {os.cpu_count()} cores; faiss-gpu: {'yes' if has_faiss_gpu else 'no'}; "
              f"backbones random-init (no pretrained weights: no network)")
    print(header, flush=True)
    rows: list[dict] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        data = make_images(tmp_path / "images", sz.classes, sz.per_class, sz.image)
        steps = [("train", arch) for arch in a.archs] + [("eval", None), ("torchrun", None)]
        for section, arch in steps:
            if section in a.skip:
                continue
            try:
                if section == "train":
                    rows.append(check_training(arch, data, tmp_path / "runs", sz, device))
                elif section == "eval":
                    rows.extend(check_evaluation(sz, device, has_faiss_gpu))
                else:
                    rows.extend(check_torchrun(nproc, data, tmp_path / "runs", sz, device, a.dry_run))
            except Exception as err:  # noqa: BLE001 - one failing check must not hide the others
                traceback.print_exc()
                rows.append(dict(section=section, what=arch or section, result=f"FAILED: {type(err).__name__}: "
                                 f"{str(err)[:200]}", time_s=float("nan"), peak_gb=float("nan"), ok=False))
            print(f"  {section} {arch or ''} done ({time.perf_counter() - started:.0f} s)", flush=True)
    total = time.perf_counter() - started
    print_table(rows, f"\n{header}\ntotal {total:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(dict(header=header, total_s=total, rows=rows), indent=2, default=str))
    return 0 if rows and all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
