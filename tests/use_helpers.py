"""Helpers of the dml-embed / dml-search / dml-export tests: a tiny trained run, generated images, an oracle."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from conftest import run_dml


def entry_point(name: str) -> list[str]:
    """The installed console script ``name`` next to the interpreter, else ``python -m`` its module."""
    script = Path(sys.executable).with_name(name)
    module = {"dml-embed": "embed", "dml-search": "search", "dml-export": "export"}[name]
    return [str(script)] if script.exists() else [sys.executable, "-m", f"dml_runner.{module}"]


def run_command(name: str, args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(entry_point(name) + [str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def trained_run(base: Path, name: str, *overrides: str) -> Path:
    """A short digits run (trainer=smoke) in ``base/name``, trained once per test session."""
    run_dir = base / name
    if not (run_dir / "results.json").is_file():
        run_dml(["trainer=smoke", f"hydra.run.dir={run_dir}", *overrides], cwd=base)
    return run_dir


def write_digit_images(folder: Path, per_class: int = 2, classes: tuple[int, ...] = (1, 3, 7)) -> list[Path]:
    """PNG files of sklearn digits in ``folder/digit_<c>/``, 8 x 8 grey, pixel = round(255 * value / 16)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    files = []
    for c in classes:
        for row in np.flatnonzero(bunch.target == c)[:per_class]:
            path = folder / f"digit_{c}" / f"{row:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.round(bunch.images[row] * 255 / 16).astype(np.uint8)).save(path)
            files.append(path)
    return files


def read_digit_images(files: list[Path]) -> "torch.Tensor":  # noqa: F821
    """The files as a (N, 1, 8, 8) batch in [0, 1], read with PIL and numpy only."""
    import torch
    from PIL import Image

    return torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("L"), dtype=np.float32) / 255)[None]
                        for f in files])


def oracle_model(run_dir: Path) -> "torch.nn.Module":  # noqa: F821
    """The run's model built from config.json with Hydra and its last.pt loaded, in eval mode (no dml_runner.trained)."""
    import torch
    from hydra.utils import instantiate

    config = json.loads((run_dir / "config.json").read_text())
    model = instantiate(config["backbone"], in_channels=1)
    model.load_state_dict(torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)["model"])
    model.head.eval_normalize = bool(config["eval"]["normalize"])
    return model.eval()


def oracle_embeddings(run_dir: Path, files: list[Path]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return oracle_model(run_dir)(read_digit_images(files)).numpy()
