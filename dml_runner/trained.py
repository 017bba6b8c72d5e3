"""A trained run as a library: find its checkpoint, rebuild its model, embed, search and export with it.

``RUN`` is a run directory (its ``best.pt``, else ``last.pt``) or a checkpoint file. :func:`load_trained` rebuilds
the model from the run's saved resolved config (``config.json``, else the checkpoint's copy) through
:mod:`dml_runner.build`, loads the checkpoint's weights (read by :func:`dml_runner.training.checkpoint.read_checkpoint`)
and puts the model in eval mode, normalised as the run evaluates. The inputs it embeds are

- an image folder (:func:`scan_images`): every image below it (recursive, sorted paths); an image's class is its
  sub-folder (the path of its directory relative to the folder; an image directly in the folder has no class:
  label -1, name ""), read with the run's test transform (:func:`file_transform`);
- or a dataset split (:func:`dataset_split`): a split name (``train``, ``val``, ``test``; default ``test``) and/or
  overrides of the run's dataset config (``dataset.root=/data/CUB_200_2011``, or another dataset:
  ``dataset=cub200 dataset.root=...``), embedded with the run's test transform.

With the model it finds the nearest neighbours of query images in an embeddings file (:func:`search`) and exports
the model to TorchScript or ONNX, checked against the PyTorch model (:func:`export`). ``dml-embed``, ``dml-search``
and ``dml-export`` (:mod:`dml_runner.cli`) are its commands; the embeddings file is written and read by
:func:`dml_runner.rundir.write_embeddings` and :func:`dml_runner.rundir.read_embeddings`. See docs/USING.md.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dml_runner import DMLRunnerError
from dml_runner.rundir import BEST, CONFIG, LAST, RESULTS

if TYPE_CHECKING:
    import torch

    from dml_runner.datasets.base import DatasetSplits, LabelledDataset

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
CHECKPOINTS = (BEST, LAST)


def _looks_like(folder: Path) -> str:
    """", it holds image files" when ``folder`` looks like an image folder (a few entries looked at)."""
    from dml_runner.datasets.images import IMAGE_EXTENSIONS

    for seen, item in enumerate(folder.rglob("*")):
        if item.suffix.lower() in IMAGE_EXTENSIONS:
            return ", it holds image files"
        if seen > 200:
            break
    return ""


# --------------------------------------------------------------------------------------------- the trained model
def find_checkpoint(run: str | Path) -> tuple[Path, Path]:
    """``(checkpoint, run_dir)`` of a run directory (best.pt, else last.pt) or a checkpoint file."""
    path = Path(run).expanduser()
    if path.is_dir():
        for name in CHECKPOINTS:
            if (path / name).is_file():
                return path / name, path
        if not any((path / name).exists() for name in (CONFIG, RESULTS, ".hydra")):
            raise DMLRunnerError(f"{path}: not a run folder (no checkpoint, config.json or results.json in it)"
                                 f"{_looks_like(path)}; give the dml-run output folder of a trained run first (it "
                                 "holds best.pt or last.pt), then the input")
        raise DMLRunnerError(
            f"{path}: no checkpoint in this run directory (neither best.pt nor last.pt): the run ended before its "
            "first epoch or ran with trainer.save_checkpoints=false; train it again with trainer.save_checkpoints=true")
    if path.is_file():
        return path, path.parent
    raise DMLRunnerError(f"{path}: no such run directory or checkpoint; give a dml-run output directory (holding "
                         "best.pt or last.pt) or a .pt checkpoint file")


def file_transform(dataset_config: Mapping[str, Any]) -> tuple[Callable[[Any], torch.Tensor], int]:
    """``(transform, in_channels)``: how an RGB image file becomes the model input of a run on ``dataset_config``.

    The dataset module's ``file_transform(**config)`` (digits: grey 8 x 8), else, for an image dataset (a config with
    ``default_transform``), the test transform of its ``transform`` / ``default_transform`` options.
    """
    target = str(dataset_config.get("_target_", ""))
    module_name = target.rpartition(".")[0]
    kwargs = {k: v for k, v in dataset_config.items() if not str(k).startswith("_")}
    try:
        make = getattr(importlib.import_module(module_name), "file_transform", None) if module_name else None
    except ImportError:
        make = None
    if make is None and "default_transform" in dataset_config:
        from dml_runner.datasets.images import file_transform as make
    if make is None:
        raise DMLRunnerError(f"dataset {target or '?'}: the run's dataset module has no file_transform(**config), so "
                             "image files cannot be turned into its model input; embed a dataset split instead "
                             "(e.g. `dml-embed RUN test`) or add file_transform to the dataset module")
    return make(**kwargs)


def rebuild_model(config: Mapping[str, Any], in_channels: int) -> torch.nn.Module:
    """The run's model as its saved config builds it, without loading pretrained weights (the checkpoint replaces
    them), with what the run's method changes in the model."""
    from omegaconf import OmegaConf

    from dml_runner.build import build_model, instantiate

    backbone = dict(config["backbone"])
    had_weights = bool(backbone.get("pretrained") or backbone.get("weights"))
    if "pretrained" in backbone:
        backbone["pretrained"] = False
    if "weights" in backbone:
        backbone["weights"] = None
    if config.get("eval") is not None:  # build_model: the backbone group and eval.normalize, as the run built it
        model = build_model(OmegaConf.create({**config, "backbone": backbone}), in_channels)
    else:  # a run directory from before eval was recorded
        model = instantiate(OmegaConf.create(backbone), "backbone", in_channels=in_channels)
    trunk = getattr(model, "trunk", None)
    if had_weights and getattr(trunk, "arch", None) == "googlenet":
        # torchvision's GoogLeNet re-scales its input when built with ImageNet weights (transform_input); the flag is
        # not in the state dict, so it follows the saved config.
        trunk.transform_input = True
    method_cfg = config.get("method")
    if method_cfg:
        prepare = getattr(instantiate(method_cfg, "method"), "prepare_model", None)
        if prepare is not None:  # what the method changes in the model (HDML's head BN, D&C's sliced embedding)
            prepare(model)
    return model


@dataclass
class TrainedModel:
    """A run's model in eval mode with the transform that turns an image file into its input."""

    model: torch.nn.Module
    config: dict[str, Any]
    checkpoint: Path
    run_dir: Path
    transform: Callable[[Any], torch.Tensor]
    in_channels: int
    device: torch.device

    def embed(self, dataset: Any, batch_size: int = 64, num_workers: int = 0) -> np.ndarray:
        """Float32 embeddings of every item of a map-style dataset of ``(image, label)``, in order."""
        import torch
        from torch.utils.data import DataLoader

        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        chunks = []
        with torch.no_grad():
            for images, _ in loader:
                chunks.append(self.model(images.to(self.device)).float().cpu())
        if not chunks:
            return np.zeros((0, 0), dtype=np.float32)
        return torch.cat(chunks).numpy()

    def image_dataset(self, paths: Sequence[str], labels: np.ndarray | None = None,
                      class_names: Mapping[int, str] | None = None) -> LabelledDataset:
        """Image files read with the run's test transform (an unreadable file fails naming it)."""
        from dml_runner.datasets.images import ImageListDataset

        labels = np.full(len(paths), -1, dtype=np.int64) if labels is None else labels
        return ImageListDataset(paths, labels, transform=self.transform, name="images",
                                class_names={-1: "", **dict(class_names or {})},
                                fix="remove or replace that file, or move it out of the folder")


def load_trained(run: str | Path, device: str = "cpu") -> TrainedModel:
    """Rebuild a run's model from its saved config and load its checkpoint (see the module docstring)."""
    from dml_runner.training.checkpoint import read_checkpoint

    checkpoint, run_dir = find_checkpoint(run)
    state = read_checkpoint(checkpoint)
    config_file = run_dir / CONFIG
    config = json.loads(config_file.read_text()) if config_file.is_file() else state.get("config")
    if not config or "backbone" not in config or "dataset" not in config:
        raise DMLRunnerError(f"{checkpoint}: neither {config_file} nor the checkpoint holds the run's config; keep "
                             "config.json next to the checkpoint")
    transform, in_channels = file_transform(config["dataset"])
    model = rebuild_model(config, in_channels)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise DMLRunnerError(f"{checkpoint}: the weights do not fit the model rebuilt from {config_file.name} "
                             f"({str(err)[:300]}); was the config edited, or does the run's method change the "
                             "model without a prepare_model hook?") from None
    from dml_runner.devices import resolve_device

    dev = resolve_device(device, option="--device")
    model.to(dev).eval()
    return TrainedModel(model, config, checkpoint, run_dir, transform, in_channels, dev)


# --------------------------------------------------------------------------------------------- inputs
def scan_images(folder: str | Path) -> tuple[list[str], np.ndarray, dict[int, str]]:
    """``(paths, labels, class_names)`` of every image below ``folder`` (recursive, sorted, hidden files skipped).

    The class of an image is the path of its directory relative to ``folder`` (labels number the sorted class
    names); images directly in ``folder`` have no class (label -1).
    """
    from dml_runner.datasets.images import IMAGE_EXTENSIONS

    root = Path(folder).expanduser().resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise DMLRunnerError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder or below it; "
                             "point at the folder that holds your images")
    classes = [p.parent.relative_to(root).as_posix() for p in files]
    names = sorted({c for c in classes if c != "."})
    index = {name: i for i, name in enumerate(names)}
    labels = np.array([index.get(c, -1) for c in classes], dtype=np.int64)
    return [str(p) for p in files], labels, dict(enumerate(names))


def image_files(arguments: Sequence[str]) -> list[str]:
    """Image files of command-line arguments: a file as given, a folder as every image below it (sorted)."""
    files: list[str] = []
    for argument in arguments:
        path = Path(argument).expanduser()
        if path.is_dir():
            files += scan_images(path)[0]
        elif path.is_file():
            files.append(str(path))
        else:
            raise DMLRunnerError(f"{argument}: no such image file or folder")
    return files


def dataset_split(trained: TrainedModel, tokens: Sequence[str]) -> tuple[LabelledDataset, DatasetSplits, str]:
    """The dataset split named by ``tokens`` (a split name and/or dataset overrides), with the run's test transform.

    Without ``dataset=<name>`` the run's own dataset config is used (overrides ``dataset.key=value`` change it);
    with it, ``conf/dataset/<name>.yaml`` composed with the other overrides.
    """
    from omegaconf import OmegaConf

    from dml_runner.build import instantiate

    split = "test"
    overrides = []
    for token in tokens:
        if token in SPLITS:
            split = token
        elif "=" in token and token.split("=", 1)[0].lstrip("+").startswith("dataset"):
            overrides.append(token)
        else:
            raise DMLRunnerError(f"{token}: not an image folder, a split ({', '.join(SPLITS)}) or a dataset override "
                                 "(dataset=NAME, dataset.KEY=VALUE)")
    group = [o for o in overrides if o.split("=", 1)[0].lstrip("+") == "dataset"]
    if group:
        from hydra import compose, initialize_config_dir

        from dml_runner.config import conf_dir, register_configs

        register_configs()
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            node = compose("config", overrides=list(overrides), return_hydra_config=False).dataset
        node = OmegaConf.create(OmegaConf.to_container(node, resolve=True))
    else:
        node = OmegaConf.create(trained.config["dataset"])
        for token in overrides:
            key, value = token.lstrip("+").split("=", 1)
            OmegaConf.update(node, key.removeprefix("dataset."), OmegaConf.from_dotlist([f"v={value}"]).v,
                             force_add=token.startswith("+"))
    splits = instantiate(node, "dataset")
    part = getattr(splits, split)
    if part is None:
        raise DMLRunnerError(f"split {split}: the dataset has no {split} split (a val split needs "
                             "dataset.val_fraction>0)")
    if group and len(part) and hasattr(part.load(0), "convert"):
        part.transform = trained.transform  # another dataset's image files, read as the run reads an image file
    else:  # the dataset's own test transform, also for the train split (no augmentation)
        part.transform = splits.test.transform
    return part, splits, split


# --------------------------------------------------------------------------------------------- search
def nearest(queries: np.ndarray, index: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(indices, distances)`` of the ``k`` nearest index rows of every query (Euclidean, ties by index order)."""
    q, g = queries.astype(np.float64), index.astype(np.float64)
    d2 = (q ** 2).sum(1)[:, None] + (g ** 2).sum(1)[None, :] - 2.0 * q @ g.T
    order = np.argsort(d2, axis=1, kind="stable")[:, :k]
    return order, np.sqrt(np.maximum(np.take_along_axis(d2, order, axis=1), 0.0))


def check_fingerprint(trained: TrainedModel, index: dict[str, np.ndarray], option: str = "--index") -> str | None:
    """Refuse an index embedded by another model (its ``fingerprint`` differs from this model's). An index without
    one (written before fingerprints were recorded, or by other code) is accepted: the warning to show is returned."""
    from dml_runner.rundir import model_fingerprint

    ours = model_fingerprint(trained.model, trained.config)
    if "fingerprint" not in index:
        return (f"{option} records no model fingerprint, so it cannot be checked that {trained.checkpoint} "
                f"embedded it; make it with `dml-embed {trained.run_dir} FOLDER` to be sure")
    theirs = str(index["fingerprint"])
    if theirs != ours:
        raise DMLRunnerError(f"{option}: embedded by another model (fingerprint {theirs}; {trained.checkpoint} is "
                             f"{ours}), so its distances to these queries mean nothing; embed the index with this "
                             f"run: dml-embed {trained.run_dir} FOLDER --out index.npz")
    return None


def search(trained: TrainedModel, queries: Sequence[str], index: dict[str, np.ndarray], k: int,
           batch_size: int = 64, check: bool = True) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """``(query paths, query labels, neighbours, distances)``; a query's label is the index class named like its
    folder (-1 when none is). ``check``: refuse an index of another model first (:func:`check_fingerprint`)."""
    if check:
        unchecked = check_fingerprint(trained, index)
        if unchecked:
            log.warning("%s", unchecked)
    files = image_files(queries)
    names = {str(n): int(lab) for lab, n in zip(index["labels"], index["class_names"])}
    labels = np.array([names.get(Path(f).parent.name, -1) for f in files], dtype=np.int64)
    emb = trained.embed(trained.image_dataset(files), batch_size)
    if emb.shape[1] != index["embeddings"].shape[1]:
        raise DMLRunnerError(f"--index: its embeddings have {index['embeddings'].shape[1]} dimensions, this run's "
                             f"model gives {emb.shape[1]}; embed the index with the same run (dml-embed)")
    neighbours, distances = nearest(emb, index["embeddings"], min(k, len(index["labels"])))
    return files, labels, neighbours, distances


# --------------------------------------------------------------------------------------------- export
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
