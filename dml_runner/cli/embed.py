"""``dml-embed RUN INPUT``: embeddings of your images, or of a dataset split, with a trained run's model.

``INPUT`` is an image folder (an image's class is its sub-folder) or a split name and/or dataset overrides
(:mod:`dml_runner.trained` says how each is read). It writes ``embeddings.npz``
(:func:`dml_runner.rundir.write_embeddings`): ``embeddings``, ``labels``, ``paths``, ``class_names`` and, for
query/gallery datasets, ``query_mask`` / ``gallery_mask``; ``dml-eval``, ``dml-search`` and numpy read it.
See docs/USING.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dml_runner import DMLRunnerError
from dml_runner.rundir import EMBEDDINGS, model_fingerprint, unwritable_reason, write_embeddings
from dml_runner.trained import dataset_split, load_trained, scan_images


def add_common_arguments(parser: argparse.ArgumentParser, device: bool = True) -> None:
    """What dml-embed, dml-search and dml-export share: the run (and the device the model runs on)."""
    parser.add_argument("run", help="run directory (best.pt, else last.pt) or checkpoint file")
    if device:
        parser.add_argument("--device", default="cpu", help="cpu (default), auto, cuda, cuda:N or mps")


def output_path(option: str, value: str) -> Path:
    """``value`` as a path whose directory exists (else a one-line error naming ``option``)."""
    out = Path(value).expanduser()
    if not out.parent.resolve().is_dir():
        raise DMLRunnerError(f"{option} {value}: the directory {out.parent.resolve()} does not exist; create it first")
    if out.is_dir():
        raise DMLRunnerError(f"{option} {value}: is a directory; give a file name")
    reason = unwritable_reason(out.parent)
    if reason:
        raise DMLRunnerError(f"{option} {value}: {reason}; choose a writable folder")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dml-embed", description="Embed an image folder or a dataset split with a trained run's model; "
                                      "writes embeddings.npz (embeddings, labels, paths, class_names).")
    add_common_arguments(parser)
    parser.add_argument("input", nargs="+",
                        help="image folder, or a split (train/val/test) and/or dataset overrides "
                             "(dataset=cub200 dataset.root=/data/CUB_200_2011)")
    parser.add_argument("--out", default="embeddings.npz", help="output .npz (default: ./embeddings.npz)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        if args.batch_size < 1:
            raise DMLRunnerError(f"--batch-size {args.batch_size}: must be >= 1")
        out = output_path("--out", args.out)
        trained = load_trained(args.run, args.device)
        if out.resolve() == (trained.run_dir / EMBEDDINGS).resolve():
            raise DMLRunnerError(f"--out {out}: is the run's own embeddings.npz; choose another file name")
        first = Path(args.input[0]).expanduser()
        masks: dict[str, np.ndarray] = {}
        if len(args.input) == 1 and (first.is_dir() or first.exists()):
            if not first.is_dir():
                raise DMLRunnerError(f"{first}: not a folder; give a folder of images (dml-search takes single "
                                     "images)")
            paths, labels, names = scan_images(first)
            dataset = trained.image_dataset(paths, labels, names)
            what = f"{len(paths)} images in {first} ({len(names)} classes)"
        else:
            dataset, splits, split = dataset_split(trained, args.input)
            if split == "test" and splits.eval_mode == "query_gallery":
                masks = {"query_mask": splits.query_mask, "gallery_mask": splits.gallery_mask}
            what = f"the {split} split of {splits.name} ({len(dataset)} images)"
        emb = trained.embed(dataset, args.batch_size, args.num_workers)
        write_embeddings(out, emb, dataset.labels, dataset, **masks, checkpoint=str(trained.checkpoint),
                         fingerprint=model_fingerprint(trained.model, trained.config))
    except DMLRunnerError as err:
        print(f"dml-embed: error: {err}", file=sys.stderr)
        return 2
    print(f"dml-embed: {what}: {emb.shape[0]} x {emb.shape[1]} embeddings from {trained.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
