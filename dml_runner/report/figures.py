"""Figures of a table: learning curves per row, an embedding-size sweep, t-SNE panels and retrieval grids.

Everything reads what the runs saved (history.csv, embeddings.npz); nothing is re-evaluated. The t-SNE sees a
class-balanced subsample (``tsne_points``) of each row's first run; a retrieval grid shows one query from each of
``grid_queries`` different classes. Images for the grids come from the run's dataset config, rebuilt once per
distinct dataset config.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from dml_runner.report.group import CHECKPOINTS, metric_values
from dml_runner.rundir import EMBEDDINGS, HISTORY, read_results

log = logging.getLogger(__name__)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name).strip("_")[:80]


def write_figures(table: dict[str, Any], out: Path, tsne_points: int = 300, grid_queries: int = 5,
                  grid_k: int = 5) -> list[tuple[Path, str]]:
    """PNG files of one table with captions: ``[(path, caption), ...]``."""
    from dml_runner.plots import plot_curves_by_group, plot_sweep, plot_tsne_panels

    written: list[tuple[Path, str]] = []
    ours = [e for e in table["rows"] if e["kind"] == "ours"]
    histories = {}
    for e in ours:
        frames = [pd.read_csv(Path(d) / HISTORY) for d in e["dirs"] if (Path(d) / HISTORY).is_file()]
        if frames:
            histories[e["row"]] = frames
    metric = "recall@1" if "recall@1" in table["metrics"] else table["metrics"][0]
    if histories:
        png = plot_curves_by_group(histories, out / f"{table['slug']}_curves.png", metrics=(metric, "nmi"),
                                   title=table["title"])
        if png:
            written.append((png, f"test {metric} and NMI per epoch, one line per row (band: ± std over seeds)"))
    source = CHECKPOINTS[table["checkpoint"]]
    frame = pd.DataFrame([{"embedding_dim": r["embedding_dim"], "row": r["row"], "status": "completed",
                           **{m: metric_values(r, m, source) for m in table["metrics"]}} for r in table["runs"]])
    if frame["embedding_dim"].nunique() > 1:  # e.g. the Lifted Structure embedding-size sweep
        png = plot_sweep(frame, "embedding_dim", out / f"{table['slug']}_sweep_embedding_dim.png",
                         metrics=[m for m in (metric, "nmi") if m in frame], group_by="row")
        if png:
            written.append((png, f"{metric} against the embedding size"))
    panels, loaders = [], {}
    for e in ours:
        run_dir = Path(e["dirs"][0])
        npz = run_dir / EMBEDDINGS
        if not npz.is_file():
            continue
        data = np.load(npz)
        panels.append((e["row"], data["embeddings"], data["labels"]))
        png = out / f"{table['slug']}_{_safe(e['row'])}_retrieval.png"
        grid = retrieval_grid(run_dir, png, n_queries=grid_queries, k=grid_k, title=e["row"], loaders=loaders,
                              data=data)
        if grid:
            written.append((grid, f"{e['row']}: queries from {grid_queries} classes and their top {grid_k} "
                                  f"(green = same class), seed {e['seeds'].split()[0]}"))
    if panels:
        try:
            png = plot_tsne_panels(panels, out / f"{table['slug']}_tsne.png", max_points=tsne_points,
                                   title=f"t-SNE of test embeddings: {table['title']}")
            written.insert(1 if histories else 0, (png, "t-SNE of each row's test embeddings (first seed)"))
        except Exception as err:  # noqa: BLE001 - a figure never fails the report
            log.warning("t-SNE of %s failed: %s", table["title"], err)
    return written


def query_per_class(labels: np.ndarray, candidates: np.ndarray, n_queries: int, seed: int = 0) -> np.ndarray:
    """``n_queries`` query indices from ``candidates``, each from a different class, classes spread over the label
    range (fewer classes than queries: round-robin over them)."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels[candidates])
    if len(classes) == 0:
        return np.zeros(0, dtype=int)
    picked_classes = classes[np.linspace(0, len(classes) - 1, min(n_queries, len(classes))).round().astype(int)]
    queries = []
    for i in range(min(n_queries, len(candidates))):
        c = picked_classes[i % len(picked_classes)]
        pool = np.setdiff1d(candidates[labels[candidates] == c], queries)
        if len(pool):
            queries.append(int(rng.choice(pool)))
    return np.asarray(queries, dtype=int)


def retrieval_grid(run_dir: Path, out_png: Path, n_queries: int = 5, k: int = 5, seed: int = 0, title: str = "",
                   loaders: dict[str, Any] | None = None, data: Any = None) -> Path | None:
    """Queries (one per class) and their top-k neighbours from a run's embeddings.npz; images from the dataset."""
    from dml_runner.plots import plot_retrieval_grid

    data = np.load(Path(run_dir) / EMBEDDINGS) if data is None else data
    emb, labels = data["embeddings"].astype(np.float32), data["labels"]
    loader = _test_image_loader(Path(run_dir), loaders if loaders is not None else {})
    if loader is None:
        return None
    n = len(labels)
    query_pool = np.flatnonzero(data["query_mask"]) if "query_mask" in data else np.arange(n)
    gallery = np.flatnonzero(data["gallery_mask"]) if "gallery_mask" in data else np.arange(n)
    queries = query_per_class(labels, query_pool, n_queries, seed)
    k = min(k, len(gallery) - 1)
    if k < 1 or len(queries) == 0:
        return None
    g = emb[gallery]
    d = (emb[queries] ** 2).sum(1)[:, None] + (g ** 2).sum(1)[None, :] - 2 * emb[queries] @ g.T
    d[gallery[None, :] == queries[:, None]] = np.inf  # a query is never its own neighbour
    neighbours = gallery[np.argsort(d, axis=1, kind="stable")[:, :k]]
    try:
        names = [str(n) for n in data["class_names"]] if "class_names" in data else None
        return plot_retrieval_grid(list(queries), neighbours, labels, loader, out_png, names=names,
                                   title=f"retrieval: {title or Path(run_dir).name} (green = same class, red = wrong)")
    except Exception as err:  # noqa: BLE001
        log.warning("retrieval grid of %s failed: %s", run_dir, err)
        return None


def _test_image_loader(run_dir: Path, cache: dict[str, Any]) -> Callable[[int], np.ndarray] | None:
    """index -> image array of the run's test set, rebuilt from the dataset config in results.json (or None)."""
    from dml_runner.build import instantiate

    res = read_results(run_dir)
    try:
        if res.get("results_missing"):
            raise ValueError(res["error"])
        cfg = res["config"]["dataset"]
        key = json.dumps(cfg, sort_keys=True)
        if key not in cache:
            cache[key] = instantiate(cfg, "dataset").test
    except Exception as err:  # noqa: BLE001 - data moved or unavailable: skip the figure
        log.warning("no retrieval grid for %s: cannot rebuild its test set (%s)", run_dir, err)
        return None
    test = cache[key]

    def load(index: int) -> np.ndarray:
        img = test.load(index)
        if hasattr(img, "convert"):  # PIL image from an image-list dataset
            img = img.convert("RGB")
            img.thumbnail((128, 128))
            return np.asarray(img)
        arr = np.asarray(img.detach().cpu() if hasattr(img, "detach") else img, dtype=np.float32)
        if arr.ndim == 3:  # C x H x W tensor
            arr = arr[0] if arr.shape[0] == 1 else np.transpose(arr, (1, 2, 0))
        return arr

    return load
