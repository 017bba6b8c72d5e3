"""``dml-eval FILE.npz``: compute DML metrics of saved embeddings (see docs/EVALUATION.md)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import numpy as np

from dml_runner.config import EvalBackend, EvalConfig
from dml_runner.devices import DEVICE_CHOICES, DeviceError, resolve_device
from dml_runner.evaluation import KNOWN_METRICS, estimate_memory_bytes, evaluate
from dml_runner.evaluation.per_query import per_class, per_query_values, requested_metrics
from dml_runner.rundir import (EMBEDDINGS_CONTENTS, EmbeddingsFileError, read_embeddings, write_csv_atomic,
                               write_json_atomic)


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


def format_table(results: dict[str, float]) -> str:
    width = max(len(k) for k in results)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    for key, val in results.items():
        shown = f"{int(val)}" if key.startswith("num_") else f"{val:.4f}"
        lines.append(f"{key:<{width}}  {shown}")
    return "\n".join(lines)


DEFAULTS = EvalConfig()  # dml-eval and dml-run (eval.*) share their defaults


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dml-eval", description="Recall@K, NMI, F1, MAP@R, R-Precision of embeddings.")
    p.add_argument("file", help="FILE.npz with 'embeddings', 'labels' [, 'query_mask', 'gallery_mask']")
    p.add_argument("--recall-at", type=int, nargs="+", default=DEFAULTS.recall_at, metavar="K")
    p.add_argument("--metrics", nargs="+", default=DEFAULTS.metrics, choices=list(KNOWN_METRICS))
    p.add_argument("--json", metavar="OUT", help="write the metrics as JSON to OUT")
    p.add_argument("--device", default=DEFAULTS.device, help=DEVICE_CHOICES)
    p.add_argument("--seed", type=int, default=0, help="k-means seed")
    p.add_argument("--backend", default=DEFAULTS.backend.value, choices=[b.value for b in EvalBackend],
                   help="retrieval search: auto (by problem size and CPU, docs/EVALUATION.md), torch_screened (bf16 "
                        "screen + float64 recheck), torch_fp32, torch_symmetric (leave-one-out, each product block "
                        "serves rows and columns), or faiss (flat index, GPU index on cuda)")
    p.add_argument("--kmeans-iters", type=int, default=DEFAULTS.kmeans_iters)
    p.add_argument("--max-memory-gb", type=float, default=None,
                   help="refuse to start if the estimated memory exceeds this (default: available memory)")
    extra = p.add_argument_group("metrics computed only when asked (docs/COMPARING.md)")
    extra.add_argument("--precision-at", type=int, nargs="+", default=[], metavar="K",
                       help="precision@K = positives among the K nearest / min(K, positives of the query)")
    extra.add_argument("--map-at", type=int, nargs="+", default=[], metavar="K",
                       help="MAP@K as open-metric-learning defines it")
    extra.add_argument("--mrr", action="store_true", help="mean reciprocal rank of the nearest positive")
    extra.add_argument("--cmc", type=int, default=0, metavar="N", help="the CMC curve: Recall@k for k = 1..N")
    extra.add_argument("--per-class", metavar="CSV",
                       help="write one row per class (queries, Recall@1, MAP@R, R-Precision, reciprocal rank), "
                            "worst Recall@1 first")
    return p


def check_arguments(args: argparse.Namespace) -> None:
    """Options are checked before the file is read, so an error names the option, not the file."""
    bad = [k for k in args.recall_at if k < 1]
    if bad:
        raise InputError(f"--recall-at {' '.join(map(str, bad))}: every K must be >= 1 (e.g. --recall-at 1 2 4 8)")
    if args.kmeans_iters < 1:
        raise InputError(f"--kmeans-iters {args.kmeans_iters}: must be >= 1")
    if args.max_memory_gb is not None and not args.max_memory_gb > 0:
        raise InputError(f"--max-memory-gb {args.max_memory_gb}: must be > 0")
    try:
        resolve_device(args.device, option="--device")
    except DeviceError as err:
        raise InputError(str(err)) from None
    for option, values in (("--precision-at", args.precision_at), ("--map-at", args.map_at)):
        if any(k < 1 for k in values):
            raise InputError(f"{option} {' '.join(map(str, values))}: every K must be >= 1")
    if args.cmc < 0:
        raise InputError(f"--cmc {args.cmc}: give the curve's length N >= 1 (or leave it out)")
    for option, value in (("--json", args.json), ("--per-class", args.per_class)):
        if value:
            check_output(option, value)


def check_output(option: str, value: str) -> None:
    """An output file in an existing, writable folder (checked before any work)."""
    out = os.path.abspath(value)
    parent = os.path.dirname(out)
    if os.path.isdir(out):
        raise InputError(f"{option} {value}: is a directory; give a file name")
    if not os.path.isdir(parent):
        raise InputError(f"{option} {value}: the directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise InputError(f"{option} {value}: the directory {parent} is not writable")


def check_labels(path: str, labels: np.ndarray, query_mask: np.ndarray | None,
                 gallery_mask: np.ndarray | None) -> int:
    """Refuse labels whose metrics would be meaningless; return the number of queries without a positive."""
    lab = np.asarray(labels)
    n = lab.shape[0]
    if any(m is not None and np.asarray(m).dtype != np.bool_ for m in (query_mask, gallery_mask)):
        return 0  # evaluate() refuses non-boolean masks with its own message
    queries = np.ones(n, bool) if query_mask is None else np.asarray(query_mask, bool)
    gallery = np.ones(n, bool) if gallery_mask is None else np.asarray(gallery_mask, bool)
    used = lab[queries | gallery]
    if np.unique(used).size < 2:
        raise InputError(f"{path}: all {used.size} items share one label, so every metric is trivially perfect; "
                         "evaluate embeddings of at least two classes")
    classes, inverse = np.unique(lab, return_inverse=True)
    in_gallery = np.bincount(inverse[gallery], minlength=classes.size)
    positives = in_gallery[inverse[queries]] - gallery[queries]  # same-class gallery items other than itself
    without = int((positives == 0).sum())
    if without == int(queries.sum()):
        raise InputError(f"{path}: no query has another item of its class in the gallery (every class is a "
                         "singleton), so Recall@K, MAP@R and R-Precision are undefined; each class needs >= 2 items")
    return without


def check_recall_at(path: str, ks: Sequence[int], n: int, query_mask: np.ndarray | None,
                    gallery_mask: np.ndarray | None) -> None:
    """Refuse a K that reaches the whole gallery a query searches: Recall@K would be 1.0 whatever the embeddings."""
    if any(m is not None and np.asarray(m).dtype != np.bool_ for m in (query_mask, gallery_mask)):
        return  # evaluate() refuses non-boolean masks with its own message
    if query_mask is None and gallery_mask is None:
        size = n - 1  # leave-one-out: every other item
    else:
        queries = np.ones(n, bool) if query_mask is None else np.asarray(query_mask, bool)
        gallery = np.ones(n, bool) if gallery_mask is None else np.asarray(gallery_mask, bool)
        size = int(gallery.sum()) - int((queries & gallery).any())  # a query in the gallery does not retrieve itself
    big = [k for k in ks if k >= size]
    if big:
        raise InputError(f"--recall-at {' '.join(map(str, big))}: a query of {path} searches {size} items, so "
                         f"Recall@{big[0]} is 1.0 for any embeddings; use K < {size}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_arguments(args)
        arrays = read_embeddings(args.file)
        emb, lab = arrays["embeddings"], arrays["labels"]
        qmask, gmask = arrays.get("query_mask"), arrays.get("gallery_mask")
        n, dim = emb.shape
        num_classes = int(np.unique(lab).size)
        without_positive = check_labels(args.file, lab, qmask, gmask)
        check_recall_at(args.file, args.recall_at, n, qmask, gmask)
        need = estimate_memory_bytes(n, dim, num_classes=num_classes, max_memory_gb=args.max_memory_gb)
        limit = args.max_memory_gb * 2**30 if args.max_memory_gb is not None else available_memory_bytes()
        print(f"{args.file}: {n} embeddings x {dim} dims, {num_classes} classes; "
              f"estimated memory {need / 2**30:.2f} GiB", file=sys.stderr)
        if without_positive:
            print(f"dml-eval: warning: {without_positive} queries have no other item of their class; they are left "
                  "out of Recall@K, MAP@R and R-Precision (num_queries_without_positive)", file=sys.stderr)
        if limit is not None and need > limit:
            raise InputError(f"{args.file}: estimated memory {need / 2**30:.2f} GiB exceeds the "
                             f"{'--max-memory-gb limit' if args.max_memory_gb is not None else 'available memory'} "
                             f"of {limit / 2**30:.2f} GiB; evaluate a subset or use a larger machine")
        results = evaluate(emb, lab, recall_at=args.recall_at, metrics=args.metrics, query_mask=qmask,
                           gallery_mask=gmask, device=args.device, seed=args.seed, kmeans_iters=args.kmeans_iters,
                           max_memory_gb=args.max_memory_gb, backend=str(args.backend))
        extra = requested_metrics(emb, lab, precision_at=args.precision_at, map_at=args.map_at, mrr=args.mrr,
                                  cmc=args.cmc, query_mask=qmask, gallery_mask=gmask, device=args.device)
        cmc = extra.pop("cmc", None)
        results.update(extra)
        per_class_rows = per_class(per_query_values(emb, lab, recall_at=(1,), query_mask=qmask, gallery_mask=gmask,
                                                    device=args.device), lab, arrays.get("class_names")) \
            if args.per_class else None
    except (InputError, EmbeddingsFileError) as exc:
        print(f"dml-eval: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"dml-eval: error: {args.file}: {exc}; {EMBEDDINGS_CONTENTS}", file=sys.stderr)
        return 2
    print(format_table(results))
    if cmc is not None:
        print("CMC (Recall@1.." + str(len(cmc)) + "): " + " ".join(f"{v:.4f}" for v in cmc))
    if per_class_rows is not None:
        write_csv_atomic(per_class_rows, args.per_class)
        worst = per_class_rows[0]
        print(f"per class: {args.per_class} ({len(per_class_rows)} classes; worst Recall@1: {worst['class']} "
              f"{worst['recall@1']:.4f} over {worst['queries']} queries)")
    if args.json:
        write_json_atomic({**results, **({"cmc": cmc} if cmc is not None else {})}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
