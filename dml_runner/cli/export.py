"""``dml-export RUN --format torchscript|onnx``: the trained embedding model as a TorchScript or ONNX file.

The exported model (:func:`dml_runner.trained.export`) is the run's backbone and embedding head in eval mode,
normalised as the run evaluates: input a float32 batch ``(N, C, H, W)`` as the run's test transform makes it from an
image, output the ``(N, D)`` embeddings. After writing, the file is loaded back (``torch.jit.load``, ONNX Runtime)
and its embeddings of a few images (``--images``, else random images through the test transform) are compared with
the PyTorch model's; a maximum absolute difference above ``--atol`` fails the command and removes the file. A
``<file>.json`` next to it records the input shape, the test transform, the checkpoint and the measured difference.
ONNX needs the ``onnx`` extra (``pip install dml-runner[onnx]``). See docs/USING.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dml_runner import DMLRunnerError
from dml_runner.cli.embed import add_common_arguments, output_path
from dml_runner.trained import FORMATS, export, load_trained, require_onnx

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
    except OSError as err:  # the file could not be written after all (a full disk, a folder that refuses it)
        print(f"dml-export: error: cannot write {err.filename or args.out}: {err.strerror or err}", file=sys.stderr)
        return 2
    print(f"dml-export: {args.format} model -> {out} (input {record['input']['shape']}, output "
          f"{record['output']['shape']}); checked on {record['checked_images']} {record['checked_on']}: max abs "
          f"difference {record['max_abs_diff']:.3g} <= {args.atol:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
