"""Cost of one Divide & Conquer re-clustering pass on SOP's scale, relative to a training epoch.

A re-clustering = an embedding pass over the whole training set (no augmentation, no gradients) + faiss k-means
over the resulting (N, D) matrix + Hungarian matching + singleton-class dropping. The k-means part is timed on
synthetic L2-normalised data of SOP's size (59,551 images, 11,318 classes) at D = 2048 (pooled ResNet-50 features,
official code) and D = 128 (the embedding, paper); the embedding pass and the epoch are estimated from measured
ResNet-50 throughput (forward only vs forward + backward) on this machine's device, so no image data are needed.

    python scripts/bench_dc_clustering.py                 # K = 8, niter 100, nredo 5 and 1, both D
    python scripts/bench_dc_clustering.py --dims 128 --nredo 1 --skip-model
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from dml_runner.evaluation.kmeans import kmeans
from dml_runner.methods.divide_conquer import drop_singleton_classes, match_clusters

SOP_TRAIN_IMAGES, SOP_TRAIN_CLASSES = 59_551, 11_318


def synthetic_features(n: int, dim: int, num_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class-structured data: each class a Gaussian around one of 64 'super-class' centres, rows L2-normalised."""
    rng = np.random.default_rng(seed)
    labels = np.sort(rng.integers(0, num_classes, n))
    centres = rng.standard_normal((64, dim)).astype(np.float32)
    class_centre = centres[rng.integers(0, 64, num_classes)] + 0.5 * rng.standard_normal(
        (num_classes, dim)).astype(np.float32)
    x = class_centre[labels] + rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels


def time_clustering(x: np.ndarray, labels: np.ndarray, k: int, niter: int, nredo: int) -> dict[str, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    first = kmeans(x, k, niter=niter, nredo=nredo, seed=1, backend="faiss", tol=0.0)[1]
    t_kmeans, cpu_kmeans = time.perf_counter() - t0, time.process_time() - c0
    second = kmeans(x, k, niter=niter, nredo=nredo, seed=2, backend="faiss", tol=0.0)[1]
    t0 = time.perf_counter()
    matched = match_clusters(first, second, k)
    kept = drop_singleton_classes(matched, labels)
    t_match = time.perf_counter() - t0
    sizes = np.bincount(kept[kept >= 0], minlength=k)
    # wall time depends on the machine's load; CPU seconds (all threads) do much less
    return {"kmeans_s": round(t_kmeans, 2), "kmeans_cpu_s": round(cpu_kmeans, 2), "match_and_drop_s": round(t_match, 3),
            "dropped_images": int((kept < 0).sum()), "cluster_sizes": "|".join(map(str, sizes))}


def resnet50_throughput(device: torch.device, batch: int, steps: int) -> dict[str, float]:
    """Images/s of ResNet-50 (random weights, 224 px) + 128-d head: eval forward and a train step (fwd + bwd)."""
    import torchvision

    model = torchvision.models.resnet50()
    model.fc = torch.nn.Linear(2048, 128)
    model.to(device)
    x = torch.randn(batch, 3, 224, 224, device=device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu",
                                                                                                   enabled=False)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn) -> float:
        fn()  # warm-up
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync()
        return steps * batch / (time.perf_counter() - t0)

    def forward() -> None:
        model.eval()
        with torch.no_grad(), amp:
            model(x)

    def train_step() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        with amp:
            loss = model(x).float().pow(2).mean()
        loss.backward()
        opt.step()

    return {"embed_img_per_s": round(timed(forward), 2), "train_img_per_s": round(timed(train_step), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=SOP_TRAIN_IMAGES)
    ap.add_argument("--classes", type=int, default=SOP_TRAIN_CLASSES)
    ap.add_argument("--dims", type=int, nargs="+", default=[2048, 128])
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--niter", type=int, default=100)
    ap.add_argument("--nredo", type=int, nargs="+", default=[5, 1])
    ap.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads (0: faiss default)")
    ap.add_argument("--skip-model", action="store_true", help="do not time ResNet-50")
    ap.add_argument("--model-batch", type=int, default=8)
    ap.add_argument("--model-steps", type=int, default=3)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    import faiss

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    out: dict = {"n": args.n, "k": args.k, "niter": args.niter, "faiss_threads": faiss.omp_get_max_threads(),
                 "torch_threads": torch.get_num_threads(), "kmeans": []}
    for dim in args.dims:
        x, labels = synthetic_features(args.n, dim, args.classes)
        for nredo in args.nredo:
            row = {"dim": dim, "nredo": nredo, **time_clustering(x, labels, args.k, args.niter, nredo)}
            print(json.dumps(row), flush=True)
            out["kmeans"].append(row)
    if not args.skip_model:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        tp = resnet50_throughput(device, args.model_batch, args.model_steps)
        embed_s, epoch_s = args.n / tp["embed_img_per_s"], args.n / tp["train_img_per_s"]
        out["model"] = {"device": str(device), **tp, "embed_pass_s": round(embed_s, 1), "epoch_s": round(epoch_s, 1)}
        print(json.dumps(out["model"]), flush=True)
        for row in out["kmeans"]:
            recluster = embed_s + row["kmeans_s"] + row["match_and_drop_s"]
            row["recluster_over_epoch"] = round(recluster / epoch_s, 3)
            print(f"D={row['dim']} nredo={row['nredo']}: re-clustering {recluster:.1f} s = "
                  f"{100 * row['recluster_over_epoch']:.1f}% of one epoch ({epoch_s:.0f} s); "
                  f"k-means alone {100 * row['kmeans_s'] / epoch_s:.2f}%")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
