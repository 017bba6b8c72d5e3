"""``dml-eval FILE.npz``: compute DML metrics of saved embeddings (see docs/EVALUATION.md)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import zipfile
from collections.abc import Sequence

import numpy as np

from dml_runner.evaluation import BACKENDS, KNOWN_METRICS, estimate_memory_bytes, evaluate

FILE_CONTENTS = (
    "the file must be a .npz (numpy.savez) with 'embeddings' (N x D floats) and 'labels' (N integers), "
    "and optionally boolean 'query_mask' and 'gallery_mask' of length N"
)


class InputError(Exception):
    """Bad user input: reported on stderr with exit code 2."""


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def load_npz(path: str) -> dict[str, np.ndarray]:
    if not os.path.exists(path):
        raise InputError(f"{path}: file not found; {FILE_CONTENTS}")
    try:
        with np.load(path, allow_pickle=False) as data:
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise InputError(f"{path}: not an .npz archive; {FILE_CONTENTS}")
            arrays = {k: data[k] for k in data.files}
    except InputError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(f"{path}: cannot be read as .npz ({exc}); {FILE_CONTENTS}") from None
    if not isinstance(arrays, dict):
        raise InputError(f"{path}: not an .npz archive; {FILE_CONTENTS}")
    missing = [k for k in ("embeddings", "labels") if k not in arrays]
    if missing:
        raise InputError(f"{path}: missing key(s) {missing} (found {sorted(arrays)}); {FILE_CONTENTS}")
    emb, lab = arrays["embeddings"], arrays["labels"]
    if emb.ndim != 2:
        raise InputError(f"{path}: 'embeddings' has shape {emb.shape}, expected (N, D); {FILE_CONTENTS}")
    if lab.ndim != 1 or lab.shape[0] != emb.shape[0]:
        raise InputError(f"{path}: length mismatch: {emb.shape[0]} embeddings but labels of shape {lab.shape}; "
                         f"{FILE_CONTENTS}")
    for key in ("query_mask", "gallery_mask"):
        if key in arrays and arrays[key].shape != (emb.shape[0],):
            raise InputError(f"{path}: '{key}' has shape {arrays[key].shape}, expected ({emb.shape[0]},); "
                             f"{FILE_CONTENTS}")
    return arrays


def format_table(results: dict[str, float]) -> str:
    width = max(len(k) for k in results)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    for key, val in results.items():
        shown = f"{int(val)}" if key.startswith("num_") else f"{val:.4f}"
        lines.append(f"{key:<{width}}  {shown}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dml-eval", description="Recall@K, NMI, F1, MAP@R, R-Precision of embeddings.")
    p.add_argument("file", help="FILE.npz with 'embeddings', 'labels' [, 'query_mask', 'gallery_mask']")
    p.add_argument("--recall-at", type=int, nargs="+", default=[1, 2, 4, 8], metavar="K")
    p.add_argument("--metrics", nargs="+", default=list(KNOWN_METRICS), choices=list(KNOWN_METRICS))
    p.add_argument("--json", metavar="OUT", help="write the metrics as JSON to OUT")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0, help="k-means seed")
    p.add_argument("--backend", default="torch", choices=list(BACKENDS),
                   help="retrieval search: torch (auto: torch_screened on a CPU with native bf16, else torch_fp32), "
                        "torch_screened (bf16 screen + float64 recheck), torch_fp32, or faiss (flat index, GPU "
                        "index on cuda)")
    p.add_argument("--kmeans-iters", type=int, default=50)
    p.add_argument("--max-memory-gb", type=float, default=None,
                   help="refuse to start if the estimated memory exceeds this (default: available memory)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        arrays = load_npz(args.file)
        emb, lab = arrays["embeddings"], arrays["labels"]
        qmask, gmask = arrays.get("query_mask"), arrays.get("gallery_mask")
        n, dim = emb.shape
        num_classes = int(np.unique(lab).size)
        need = estimate_memory_bytes(n, dim, num_classes=num_classes, max_memory_gb=args.max_memory_gb)
        limit = args.max_memory_gb * 2**30 if args.max_memory_gb is not None else available_memory_bytes()
        print(f"{args.file}: {n} embeddings x {dim} dims, {num_classes} classes; "
              f"estimated memory {need / 2**30:.2f} GiB", file=sys.stderr)
        if limit is not None and need > limit:
            raise InputError(f"{args.file}: estimated memory {need / 2**30:.2f} GiB exceeds the "
                             f"{'--max-memory-gb limit' if args.max_memory_gb is not None else 'available memory'} "
                             f"of {limit / 2**30:.2f} GiB; evaluate a subset or use a larger machine")
        results = evaluate(emb, lab, recall_at=args.recall_at, metrics=args.metrics, query_mask=qmask,
                           gallery_mask=gmask, device=args.device, seed=args.seed, kmeans_iters=args.kmeans_iters,
                           max_memory_gb=args.max_memory_gb, backend=args.backend)
    except InputError as exc:
        print(f"dml-eval: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"dml-eval: error: {args.file}: {exc}; {FILE_CONTENTS}", file=sys.stderr)
        return 2
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
