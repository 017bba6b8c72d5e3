"""``dml-search RUN QUERY... --index embeddings.npz``: nearest neighbours of query images among embedded images.

The queries (image files, or folders of images) are embedded with the run's model and test transform
(:mod:`dml_runner.trained`); the index is an ``embeddings.npz`` with ``paths`` (written by ``dml-embed`` or by a run)
embedded by the same model. Prints the top-k paths with their Euclidean distances and writes the retrieval grid as a
PNG: one row per query, its top-k framed green (same class as the query), red (another class) or grey (the query's
class is unknown: it is not in a sub-folder named like a class of the index). See docs/USING.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dml_runner import DMLRunnerError
from dml_runner.cli.embed import add_common_arguments, output_path
from dml_runner.trained import check_fingerprint, load_trained, search


def load_index(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of an embeddings.npz that has ``paths`` (one-line errors otherwise)."""
    from dml_runner.rundir import EmbeddingsFileError, read_embeddings

    try:
        arrays = read_embeddings(path)
    except EmbeddingsFileError as err:
        raise DMLRunnerError(f"--index {err}") from None
    if "paths" not in arrays:
        raise DMLRunnerError(f"--index {path}: has no 'paths' (image files) to show; make the index with "
                             "`dml-embed RUN FOLDER --out index.npz`")
    if "class_names" not in arrays:
        arrays["class_names"] = np.asarray([str(c) for c in arrays["labels"]])
    return arrays


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dml-search",
                                     description="Nearest neighbours of query images in an embeddings.npz index.")
    add_common_arguments(parser)
    parser.add_argument("queries", nargs="+", help="query image file(s) or folder(s)")
    parser.add_argument("--index", required=True, help="embeddings.npz with paths (dml-embed RUN FOLDER)")
    parser.add_argument("--k", type=int, default=8, help="neighbours per query (default 8)")
    parser.add_argument("--out", default="grid.png", help="retrieval grid PNG (default ./grid.png)")
    args = parser.parse_args(argv)
    try:
        from dml_runner.plots import plot_retrieval_grid

        if args.k < 1:
            raise DMLRunnerError(f"--k {args.k}: must be >= 1")
        out = output_path("--out", args.out)
        index = load_index(args.index)
        trained = load_trained(args.run, args.device)
        unchecked = check_fingerprint(trained, index)
        if unchecked:
            print(f"dml-search: warning: {unchecked}", file=sys.stderr)
        files, labels, neighbours, distances = search(trained, args.queries, index, args.k, check=False)
        q = len(files)
        all_labels = np.concatenate([labels, index["labels"].astype(np.int64)])
        paths = files + [str(p) for p in index["paths"]]
        names = [str(index["class_names"][index["labels"] == lab][0]) if lab >= 0 else "" for lab in labels] + \
            [str(n) for n in index["class_names"]]

        def load(i: int) -> object:
            if not Path(paths[i]).is_file():
                raise DMLRunnerError(f"--index {args.index}: {paths[i]} is not an image file, so the grid cannot show "
                                     "it; make the index from image files with `dml-embed RUN FOLDER`")
            return trained.image_dataset([paths[i]]).load(0)

        plot_retrieval_grid(list(range(q)), neighbours + q, all_labels, load, out,
                            title=f"dml-search: {trained.run_dir.name}, top {neighbours.shape[1]}",
                            names=names, distances=distances)
    except DMLRunnerError as err:
        print(f"dml-search: error: {err}", file=sys.stderr)
        return 2
    for i, query in enumerate(files):
        print(f"query {query}")
        for rank, (j, dist) in enumerate(zip(neighbours[i], distances[i]), start=1):
            cls = index["class_names"][j]
            print(f"  {rank:>3}  {dist:.4f}  {index['paths'][j]}" + (f"  ({cls})" if cls else ""))
    print(f"dml-search: grid of {len(files)} queries x top {neighbours.shape[1]} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
