"""Benchmark dml_runner.evaluation against pytorch-metric-learning's AccuracyCalculator (issue 5).

Each side runs in its own subprocess on the same synthetic SOP-shaped data so peak RSS is measured separately.
  python scripts/bench_eval.py                  # SOP shape: 60,502 x 512, 11,316 classes, ours vs PML
  python scripts/bench_eval.py --quick          # 8,000 x 128, 1,500 classes (seconds)
  python scripts/bench_eval.py --scaling        # ours at N = 10k, 30k, 60k, 120k (class size as SOP)
  python scripts/bench_eval.py --device cuda    # same on a GPU (faiss-gpu / torch CUDA)
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
    p.add_argument("--json", help="write all results to this file")
    p.add_argument("--worker", choices=["ours", "pml"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a.worker, a.data, a.device, a.recall_at)
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
