"""``dml-export RUN --format torchscript|onnx``: the trained embedding model as a TorchScript or ONNX file.

The exported model is the run's backbone and embedding head in eval mode (:func:`dml_runner.trained.load_trained`),
normalised as the run evaluates: input a float32 batch ``(N, C, H, W)`` as the run's test transform makes it from an
image, output the ``(N, D)`` embeddings. After writing, the file is loaded back (``torch.jit.load``, ONNX Runtime)
and its embeddings of a few images (``--images``, else random images through the test transform) are compared with
the PyTorch model's; a maximum absolute difference above ``--atol`` fails the command and removes the file. A
``<file>.json`` next to it records the input shape, the test transform, the checkpoint and the measured difference.
ONNX needs the ``onnx`` extra (``pip install dml-runner[onnx]``). See docs/USING.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from dml_runner import DMLRunnerError
from dml_runner.cli.embed import add_common_arguments, output_path
from dml_runner.trained import TrainedModel, image_files, load_trained

FORMATS = {"torchscript": ".torchscript.pt", "onnx": ".onnx"}
ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")


def require_onnx() -> None:
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise DMLRunnerError(f"--format onnx needs {', '.join(missing)}: pip install dml-runner[onnx]")


def check_images(trained: TrainedModel, images: Sequence[str], count: int = 4, seed: int = 0) -> np.ndarray:
    """Model inputs ``(N, C, H, W)``: the given image files (or folders) through the run's test transform, else
    ``count`` random RGB images (64 x 80 pixels, seeded) through it."""
    import torch
    from PIL import Image

    if images:
        dataset = trained.image_dataset(image_files(images))
        return torch.stack([dataset[i][0] for i in range(len(dataset))]).numpy()
    rng = np.random.default_rng(seed)
    pictures = [Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)) for _ in range(count)]
    return torch.stack([trained.transform(p) for p in pictures]).numpy()


def compare(reference: np.ndarray, exported: np.ndarray, atol: float, what: str) -> float:
    """The maximum absolute difference of two embedding batches; above ``atol`` a one-line error."""
    if reference.shape != exported.shape:
        raise DMLRunnerError(f"{what}: gives embeddings of shape {exported.shape}, the PyTorch model "
                             f"{reference.shape}")
    diff = float(np.abs(reference.astype(np.float64) - exported.astype(np.float64)).max()) if reference.size else 0.0
    if not diff <= atol:
        raise DMLRunnerError(f"{what}: its embeddings differ from the PyTorch model's by {diff:.3g} (max abs) on "
                             f"{len(reference)} images, above --atol {atol:g}; the exported file was removed")
    return diff


def export_torchscript(model: Callable, example: object, out: Path) -> Callable[[np.ndarray], np.ndarray]:
    """Trace to TorchScript, save, and return the reloaded file as a numpy function."""
    import torch

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch marks TorchScript deprecated; the format is asked for
        # shape tests (e.g. repeating a grey channel) are fixed by the run's input, which the check then exercises
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, example, check_trace=False)
        traced.save(str(out))
        loaded = torch.jit.load(str(out), map_location="cpu")

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return loaded(torch.from_numpy(x)).numpy()

    return run


def export_onnx(model: Callable, example: object, out: Path) -> Callable[[np.ndarray], np.ndarray]:
    """torch.onnx (the torch.export-based exporter) with a dynamic batch dimension; returns an ONNX Runtime
    session on the file as a numpy function."""
    import onnxruntime
    import torch

    torch.onnx.export(model, (example,), str(out), input_names=["images"], output_names=["embeddings"],
                      dynamic_shapes={"images": {0: torch.export.Dim("batch")}}, dynamo=True, external_data=False,
                      verbose=False)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(["embeddings"], {"images": x.astype(np.float32)})[0]

    return run


def export(trained: TrainedModel, fmt: str, out: Path, images: Sequence[str] = (), atol: float = 1e-4) -> dict:
    """Write ``out`` in ``fmt``, check it against the PyTorch model and write ``<out>.json``; returns that record."""
    import torch

    if fmt == "onnx":
        require_onnx()
    model = trained.model.cpu().eval()
    inputs = check_images(trained, images)
    example = torch.from_numpy(inputs[:2])
    with torch.no_grad():
        reference = model(torch.from_numpy(inputs)).numpy()
    run = (export_onnx if fmt == "onnx" else export_torchscript)(model, example, out)
    try:
        diff = compare(reference, run(inputs), atol, f"{out} ({fmt})")
    except DMLRunnerError:
        out.unlink(missing_ok=True)
        raise
    record = {"format": fmt, "file": str(out), "checkpoint": str(trained.checkpoint),
              "input": {"name": "images", "shape": ["N", *inputs.shape[1:]], "dtype": "float32"},
              "output": {"name": "embeddings", "shape": ["N", int(reference.shape[1])]},
              "normalized": bool(np.allclose(np.linalg.norm(reference, axis=1), 1.0, atol=1e-4)),
              "test_transform": repr(trained.transform), "checked_images": len(inputs),
              "checked_on": "given images" if images else "random images through the test transform",
              "max_abs_diff": diff, "atol": atol}
    out.with_name(out.name + ".json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dml-export", description="Export a run's embedding model to TorchScript "
                                     "or ONNX and check that it gives the same embeddings.")
    add_common_arguments(parser, device=False)  # exported and checked on the CPU
    parser.add_argument("--format", required=True, choices=sorted(FORMATS))
    parser.add_argument("--out", help="output file (default: <run dir>/embedding_model.torchscript.pt or .onnx)")
    parser.add_argument("--images", nargs="*", default=[], help="image files or folders to check the export on "
                                                                  "(default: 4 random images)")
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="largest max-abs difference of the embeddings accepted (default 1e-4)")
    args = parser.parse_args(argv)
    try:
        if not args.atol >= 0:
            raise DMLRunnerError(f"--atol {args.atol}: must be >= 0")
        if args.format == "onnx":
            require_onnx()
        trained = load_trained(args.run)
        out = output_path("--out", args.out or str(trained.run_dir / f"embedding_model{FORMATS[args.format]}"))
        record = export(trained, args.format, out, args.images, args.atol)
    except DMLRunnerError as err:
        print(f"dml-export: error: {err}", file=sys.stderr)
        return 2
    print(f"dml-export: {args.format} model -> {out} (input {record['input']['shape']}, output "
          f"{record['output']['shape']}); checked on {record['checked_images']} {record['checked_on']}: max abs "
          f"difference {record['max_abs_diff']:.3g} <= {args.atol:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
