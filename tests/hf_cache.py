"""An offline Hugging Face hub cache for tests: timm weight files under the names and layout timm's loader reads.

``write_timm_weights(cache, name)`` writes, for timm model ``name`` (``<arch>.<tag>``), the file
``timm.create_model(name, pretrained=True)`` downloads: ``model.safetensors`` of the hub repository
``timm/<arch>.<tag>`` with the keys and shapes of timm's own model at the pretrained config's class count (classifier
included), random values (the model's own initialisation, seeded), plus the repository's ``config.json``. The layout
is the hub cache's: ``<cache>/models--timm--<name>/blobs/<sha256>``, ``snapshots/<revision>/model.safetensors`` (a
link to the blob) and ``refs/main`` (the revision). :func:`offline_hub` points ``HF_HUB_CACHE`` there and sets
``HF_HUB_OFFLINE=1``, so timm's real loading code (``huggingface_hub.hf_hub_download`` then ``safetensors``) reads
these files without a network, in this process and in subprocesses (dml-run).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch

REVISION = "0123456789abcdef0123456789abcdef01234567"  # a made-up 40-hex commit of every written repository


def repo_dir(cache: Path, name: str) -> Path:
    """``<cache>/models--timm--<name>``: where the hub cache keeps repository ``timm/<name>``."""
    return Path(cache) / f"models--timm--{name}"


def random_state_dict(name: str, seed: int | None = None) -> dict[str, torch.Tensor]:
    """timm's ``name`` built at its pretrained class count (so the classifier is in the file), seeded random init."""
    import timm
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    seed = zlib.crc32(name.encode()) % 10_000 if seed is None else seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = timm.create_model(name, pretrained=False, num_classes=cfg.num_classes)
        for p in net.parameters():  # every tensor differs from a fresh init (ViT init leaves zeros and ones)
            with torch.no_grad():
                p.add_(0.02 * torch.randn_like(p))
    return {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}


def write_timm_weights(cache: Path, name: str, seed: int | None = None) -> Path:
    """Write ``name``'s weight file into the hub cache ``cache`` (kept if already there); returns the snapshot file."""
    from safetensors.torch import save_file
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    assert cfg is not None and cfg.hf_hub_id == f"timm/{name}", f"{name}: not a timm hub model ({cfg})"
    repo = repo_dir(cache, name)
    snapshot = repo / "snapshots" / REVISION
    target = snapshot / "model.safetensors"
    if target.is_file():
        return target
    for sub in ("blobs", "refs"):
        (repo / sub).mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    tmp = repo / "blobs" / f".tmp-{os.getpid()}"
    save_file(random_state_dict(name, seed), str(tmp), metadata={"format": "pt"})
    config = {"architecture": cfg.architecture, "num_classes": cfg.num_classes, "num_features": None,
              "pretrained_cfg": {k: v for k, v in cfg.to_dict().items() if k not in ("url", "hf_hub_id")}}
    for data_name, write in (("model.safetensors", None), ("config.json", json.dumps(config, default=list))):
        if write is None:
            blob = repo / "blobs" / hashlib.sha256(tmp.read_bytes()).hexdigest()
            os.replace(tmp, blob)  # LFS files are stored under their sha256
        else:
            blob = repo / "blobs" / hashlib.sha1(write.encode()).hexdigest()
            blob.write_text(write)
        link = snapshot / data_name
        if not link.exists():
            link.symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs" / "main").write_text(REVISION)
    return target


def set_offline_hub(cache: Path | None) -> dict[str, str | None]:
    """Point ``HF_HUB_CACHE`` at ``cache`` and set ``HF_HUB_OFFLINE=1`` (``None``: restore nothing, read only);
    returns the old environment values. huggingface_hub reads both once at import, so its constants are set too."""
    from huggingface_hub import constants

    old = {key: os.environ.get(key) for key in ("HF_HUB_CACHE", "HF_HUB_OFFLINE")}
    if cache is not None:
        os.environ["HF_HUB_CACHE"] = str(cache)
        os.environ["HF_HUB_OFFLINE"] = "1"
        constants.HF_HUB_CACHE = str(cache)
        constants.HF_HUB_OFFLINE = True
    return old


def restore_hub(old: dict[str, str | None]) -> None:
    from huggingface_hub import constants

    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    constants.HF_HUB_CACHE = os.environ.get("HF_HUB_CACHE", constants.default_cache_path)
    constants.HF_HUB_OFFLINE = constants._is_true(os.environ.get("HF_HUB_OFFLINE"))


@contextlib.contextmanager
def offline_hub(cache: Path) -> Iterator[Path]:
    """``HF_HUB_CACHE=cache`` and ``HF_HUB_OFFLINE=1`` inside the block (environment and huggingface_hub)."""
    old = set_offline_hub(cache)
    try:
        yield Path(cache)
    finally:
        restore_hub(old)
