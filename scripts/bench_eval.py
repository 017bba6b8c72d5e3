"""Benchmark dml_runner.evaluation against pytorch-metric-learning's AccuracyCalculator.

Each side runs in its own subprocess on the same synthetic SOP-shaped data so peak RSS is measured separately.
  python scripts/bench_eval.py                  # SOP shape: 60,502 x 512, 11,316 classes, ours vs PML
  python scripts/bench_eval.py --quick          # 8,000 x 128, 1,500 classes (seconds)
  python scripts/bench_eval.py --scaling        # ours at N = 10k, 30k, 60k, 120k (class size as SOP)
  python scripts/bench_eval.py --device cuda    # same on a GPU (faiss-gpu / torch CUDA)
  python scripts/bench_eval.py --kmeans [--kmeans-n 30000 --dim 128]   # k-means: ours vs faiss.Kmeans, time + NMI
Every run first prints the CPU model, the instruction-set flags detected and the paths the auto settings choose
(DML_CPU_PATH / DML_KMEANS_PRECISION / DML_EVAL_SEARCH / DML_SCREEN_PRECISION force them; docs/EVALUATION.md).
An AVX2-only CPU on an AVX-512 machine: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
OPENBLAS_CORETYPE=Haswell (torch kernels, oneDNN, torch's MKL BLAS, faiss's OpenBLAS).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

SOP_N, SOP_CLASSES = 60_502, 11_316


def make_data(n: int, dim: int, classes: int, seed: int = 0, noise: float = 2.4) -> tuple[np.ndarray, np.ndarray]:
    """Clustered unit vectors: every class >= 2 items (SOP: 2-12), class centre + Gaussian noise, L2-normalised."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.repeat(np.arange(classes), 2), rng.integers(0, classes, n - 2 * classes)])
    rng.shuffle(labels)
    x = np.empty((n, dim), dtype=np.float32)
    centres = rng.standard_normal((classes, dim), dtype=np.float32)
    for s in range(0, n, 8192):  # chunked to keep the generator's memory small
        y = labels[s : s + 8192]
        x[s : s + 8192] = centres[y] + noise * rng.standard_normal((y.size, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels.astype(np.int64)


def worker(side: str, path: str, device: str, recall_at: list[int]) -> None:
    data = np.load(path)
    x, y = data["embeddings"], data["labels"]
    # "wall" includes importing the library (torch, ~3-4 s on this CPU) for both sides; "call" is the metric call only
    t0 = time.perf_counter()
    if side == "ours":
        from dml_runner.evaluation import evaluate

        t_call = time.perf_counter()
        res = evaluate(x, y, recall_at=recall_at, device=device, seed=0)
    else:
        import torch
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

        calc = AccuracyCalculator(include=("precision_at_1", "NMI", "mean_average_precision_at_r", "r_precision"),
                                  k="max_bin_count", device=torch.device(device))
        t_call = time.perf_counter()
        raw = calc.get_accuracy(torch.from_numpy(x), torch.from_numpy(y))
        res = {"recall@1": raw["precision_at_1"], "nmi": raw["NMI"],
               "map@r": raw["mean_average_precision_at_r"], "r_precision": raw["r_precision"]}
    wall, call = time.perf_counter() - t0, time.perf_counter() - t_call
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"side": side, "wall_s": wall, "call_s": call, "peak_rss_gb": peak / 2**30, "metrics": res}))


def print_cpu(device: str) -> None:
    from dml_runner.evaluation import cpu_info, describe_paths

    info = cpu_info()
    paths = describe_paths(device)
    print(f"cpu: {info.summary()}")
    env = {k: os.environ[k] for k in ("DML_CPU_PATH", "DML_KMEANS_PRECISION", "DML_EVAL_SEARCH", "DML_SCREEN_PRECISION",
                                      "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
                                      "OPENBLAS_CORETYPE", "OMP_NUM_THREADS") if k in os.environ}
    from dml_runner.evaluation import SYMMETRIC_MIN

    if "bfloat16" in paths["search"]:
        sizes = "4,096 queries x 8,192 gallery items"
    elif "symmetric" in paths["search"]:
        sizes = f"{SYMMETRIC_MIN:,} items"
    else:
        sizes = "20,000 x 20,000"
    print(f"chosen on {device}: search {paths['search']} (from {sizes}; smaller: torch_fp32), k-means "
          f"{paths['kmeans_precision']}, {paths['threads']} threads"
          + (f"; env {env}" if env else ""), flush=True)


def blobs(n: int, dim: int, k: int, seed: int = 0, sep: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    """k Gaussian blobs of unit variance whose centres are N(0, sep^2) per dimension (well separated)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    y[:k] = np.arange(k)
    return (rng.normal(size=(k, dim))[y] * sep + rng.standard_normal((n, dim))).astype(np.float32), y


def kmeans_bench(a: argparse.Namespace) -> list[dict]:
    """Ours (auto precision and forced float32) against faiss.Kmeans (random seeding; 20 iterations as
    pytorch-metric-learning runs it, and 50 = our maximum), same data, same process, one after the other."""
    import torch

    from dml_runner.evaluation import nmi_from_assignments
    from dml_runner.evaluation.kmeans import kmeans

    n = a.kmeans_n
    classes = max(2, round(n * a.classes / a.n))
    cases = [(f"SOP-shaped {n} x {a.dim}, k={classes}", *make_data(n, a.dim, classes)),
             (f"blobs {n} x 32, k=100, sep 10", *blobs(n, 32, 100)),
             (f"blobs {n} x 32, k=1000, sep 10", *blobs(n, 32, 1000))]
    runs = [("ours auto", dict(backend="auto", niter=50)), ("ours fp32", dict(backend="auto", niter=50,
                                                                                 precision="fp32")),
            ("faiss niter=20", dict(backend="faiss", niter=20)), ("faiss niter=50", dict(backend="faiss", niter=50))]
    for _, kw in runs:  # warm-up: first calls pay one-off library initialisation (oneDNN kernels, faiss)
        kmeans(cases[1][1][:2000], 20, device=a.device, **kw)
    rows = []
    for name, x, y in cases:
        k = int(np.unique(y).size)
        for label, kw in runs:
            nmis, times, cpus, iters = [], [], [], []
            for seed in range(a.kmeans_seeds):
                t0, c0 = time.perf_counter(), time.process_time()
                _, assign, it = kmeans(x, k, seed=seed, device=a.device, return_iters=True, **kw)
                if a.device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0)
                nmis.append(nmi_from_assignments(assign, y))
                iters.append(it)
            row = dict(case=name, run=label, time_s=float(np.median(times)), cpu_s=float(np.median(cpus)),
                       nmi_mean=float(np.mean(nmis)), nmi_min=float(np.min(nmis)), iters=float(np.mean(iters)))
            rows.append(row)
            print(f"{name:40s} {label:16s} time {row['time_s']:7.2f} s (CPU {row['cpu_s']:7.2f} s)  "
                  f"NMI mean {row['nmi_mean']:.4f} min {row['nmi_min']:.4f}  iterations {row['iters']:.1f}", flush=True)
    return rows


def run_side(side: str, path: str, device: str, recall_at: list[int]) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--data", path, "--device", device,
           "--recall-at", *map(str, recall_at)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{side} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=SOP_N)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--classes", type=int, default=SOP_CLASSES)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--recall-at", type=int, nargs="+", default=[1, 10, 100, 1000])
    p.add_argument("--quick", action="store_true", help="small case (8,000 x 128, 1,500 classes)")
    p.add_argument("--scaling", action="store_true", help="ours only at N = 10k, 30k, 60k, 120k")
    p.add_argument("--sizes", type=int, nargs="+", help="with --scaling: the N values (default 10k 30k 60k 120k)")
    p.add_argument("--skip-pml", action="store_true")
    p.add_argument("--kmeans", action="store_true", help="k-means only: ours vs faiss.Kmeans (time, NMI)")
    p.add_argument("--kmeans-n", type=int, default=30_000, help="with --kmeans: points (classes as SOP's ratio)")
    p.add_argument("--kmeans-seeds", type=int, default=3, help="with --kmeans: seeds per run (median time)")
    p.add_argument("--json", help="write all results to this file")
    p.add_argument("--worker", choices=["ours", "pml"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a.worker, a.data, a.device, a.recall_at)
        return
    print_cpu(a.device)
    if a.kmeans:
        rows = kmeans_bench(a)
        if a.json:
            with open(a.json, "w") as fh:
                json.dump(rows, fh, indent=2)
        return
    if a.quick:
        a.n, a.dim, a.classes = 8000, 128, 1500
    sizes = (a.sizes or [10_000, 30_000, 60_000, 120_000]) if a.scaling else [a.n]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            classes = max(2, round(n * a.classes / a.n)) if a.scaling else a.classes
            x, y = make_data(n, a.dim, classes)
            path = os.path.join(tmp, f"data_{n}.npz")
            np.savez(path, embeddings=x, labels=y)
            del x, y
            sides = ["ours"] + ([] if (a.skip_pml or a.scaling) else ["pml"])
            for side in sides:
                r = run_side(side, path, a.device, a.recall_at)
                r.update(n=n, dim=a.dim, classes=classes, device=a.device)
                rows.append(r)
                m = " ".join(f"{k}={v:.4f}" for k, v in r["metrics"].items() if not k.startswith("num_"))
                print(f"{side:4s} N={n:>7} D={a.dim} classes={classes:>6} wall={r['wall_s']:7.1f}s "
                      f"(call {r['call_s']:6.1f}s) "
                      f"peak_rss={r['peak_rss_gb']:.2f}GB  {m}", flush=True)
    if len(rows) >= 2 and rows[1]["side"] == "pml":
        ours, pml = rows[0], rows[1]
        print(f"time ratio ours/pml = {ours['wall_s'] / pml['wall_s']:.2f} with imports, "
              f"{ours['call_s'] / pml['call_s']:.2f} metric call only; "
              f"peak ours {ours['peak_rss_gb']:.2f} GB vs pml {pml['peak_rss_gb']:.2f} GB")
        for k in ("recall@1", "map@r", "r_precision", "nmi"):
            print(f"  {k}: |ours - pml| = {abs(ours['metrics'][k] - pml['metrics'][k]):.2e}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
